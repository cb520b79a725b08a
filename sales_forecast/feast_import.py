"""Import Feast without two import-time costs this project pays nothing for: typeguard and PyTorch.

- **typeguard.** Feast decorates its API classes (``FeatureView``, ``Entity``, ``Field``, the data sources, ...)
  with typeguard's ``@typechecked``. typeguard instruments a class by parsing, transforming and compiling the
  class's whole module once for every method of the class (agronholm/typeguard#468): about 7 of the 12 s of
  ``import feast`` in each process on this project's reference machine. Here ``typeguard.typechecked``, for
  Feast's modules only, wraps each method so that typeguard's own ``typechecked`` instruments it when it is first
  called. The checks and their errors are typeguard's; a method that is never called is never instrumented.
  Coroutines, generators and already-wrapped functions are instrumented at once, as before.
- **PyTorch.** Feast's offline store imports ``feast.torch_wrapper``, which imports torch (about 2 s) for
  ``to_tensor``. Here the module is Feast's own, imported at the first ``get_torch()`` or at the first other name
  read from it.

Every step, Ray worker and server here imports Feast. ``install()`` has to run before Feast is imported, so the
package's ``__init__`` calls it; a process that imported Feast first keeps Feast's eager imports.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
import threading
import types
from collections.abc import Callable
from typing import Any

import typeguard

_INSTRUMENT_NOW = typeguard.typechecked
_TORCH_WRAPPER = "feast.torch_wrapper"
_torch_wrapper_lock = threading.Lock()


def install() -> None:
    typeguard.typechecked = typechecked_on_first_call
    if "feast" not in sys.modules:
        sys.modules.setdefault(_TORCH_WRAPPER, _DeferredTorchWrapper(_TORCH_WRAPPER))


class _DeferredTorchWrapper(types.ModuleType):
    """Stands in for ``feast.torch_wrapper`` until a name of it is used, then hands over to Feast's module."""

    @staticmethod
    def get_torch() -> types.ModuleType:
        return _feasts_torch_wrapper().get_torch()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # what tools that scan sys.modules ask (__file__, __path__, ...): not Feast's names
            raise AttributeError(name)
        return getattr(_feasts_torch_wrapper(), name)


def _feasts_torch_wrapper() -> types.ModuleType:
    with _torch_wrapper_lock:
        if isinstance(sys.modules.get(_TORCH_WRAPPER), _DeferredTorchWrapper):
            del sys.modules[_TORCH_WRAPPER]
        return importlib.import_module(_TORCH_WRAPPER)


def typechecked_on_first_call(target: Any = None, **options: Any) -> Any:
    if target is None:
        return functools.partial(typechecked_on_first_call, **options)
    if not __debug__ or not _is_feasts(target):
        return _INSTRUMENT_NOW(target, **options)
    if inspect.isclass(target):
        for name, attribute in list(vars(target).items()):
            deferred = _deferred_attribute(attribute, target, options)
            if deferred is not attribute:
                setattr(target, name, deferred)
        return target
    if isinstance(target, classmethod | staticmethod):
        return type(target)(_deferred_function(target.__func__, options))
    return _deferred_function(target, options)


def _is_feasts(target: Any) -> bool:
    module = getattr(getattr(target, "__func__", target), "__module__", None) or ""
    return module.partition(".")[0] == "feast"


def _deferred_attribute(attribute: Any, owner: type, options: dict[str, Any]) -> Any:
    """What typeguard's class branch instruments (methods, class and static methods, properties), deferred."""
    if _defined_in(attribute, owner):
        return _deferred_function(attribute, options)
    if isinstance(attribute, classmethod | staticmethod) and _defined_in(attribute.__func__, owner):
        return type(attribute)(_deferred_function(attribute.__func__, options))
    if isinstance(attribute, property):
        accessors = {
            name: _deferred_function(function, options) if _defined_in(function, owner) else function
            for name, function in (("fget", attribute.fget), ("fset", attribute.fset), ("fdel", attribute.fdel))
        }
        return type(attribute)(**accessors, doc=attribute.__doc__)
    return attribute


def _defined_in(function: Any, owner: type) -> bool:
    return (
        inspect.isfunction(function)
        and function.__module__ == owner.__module__
        and function.__qualname__.startswith(owner.__qualname__ + ".")
    )


def _deferred_function(function: Callable[..., Any], options: dict[str, Any]) -> Callable[..., Any]:
    plain = not (
        inspect.iscoroutinefunction(function)
        or inspect.isgeneratorfunction(function)
        or inspect.isasyncgenfunction(function)
        or hasattr(function, "__wrapped__")
    )
    if not plain:
        return _INSTRUMENT_NOW(function, **options)
    instrumented: Callable[..., Any] | None = None

    @functools.wraps(function)
    def instrument_then_call(*args: Any, **kwargs: Any) -> Any:
        nonlocal instrumented
        if instrumented is None:
            instrumented = _INSTRUMENT_NOW(function, **options)
        return instrumented(*args, **kwargs)

    return instrument_then_call
