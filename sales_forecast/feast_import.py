"""Import Feast without two import-time costs this project pays nothing for: typeguard and PyTorch.

- **typeguard.** Feast decorates its API classes (``FeatureView``, ``Entity``, ``Field``, the data sources, ...)
  with typeguard's ``@typechecked``. typeguard instruments a class by parsing, transforming and compiling the
  class's whole module once for every method of the class (agronholm/typeguard#468): about 7 of the 12 s of
  ``import feast`` in each process on this project's reference machine. Here ``typeguard.typechecked`` puts a stand-in
  in a Feast class for each method, class method, static method and property typeguard would instrument. At its
  first lookup the stand-in has typeguard's own ``typechecked`` instrument the original and replaces itself in the
  class with the result: the checks, their errors and the class afterwards are typeguard's, no call goes through an
  extra frame, and what is never used is never instrumented.
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
    typeguard.typechecked = typechecked_on_first_use
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


def typechecked_on_first_use(target: Any = None, **options: Any) -> Any:
    """typeguard's ``typechecked``, except on a Feast class: each attribute typeguard would instrument is left as a
    ``_Deferred`` descriptor, which instruments it with typeguard's own ``typechecked`` when it is first looked up
    and puts the instrumented one in the class. No call goes through an extra frame."""
    if target is None:
        return functools.partial(typechecked_on_first_use, **options)
    if not __debug__ or not inspect.isclass(target) or not target.__module__.startswith("feast."):
        return _INSTRUMENT_NOW(target, **options)
    for name, attribute in list(vars(target).items()):
        if _instrumented_by_typeguard(attribute, target):
            deferred = _DeferredProperty if isinstance(attribute, property) else _Deferred
            setattr(target, name, deferred(target, name, attribute, options))
    return target


class _Deferred:
    """A method, class method or static method of a Feast class, until it is first looked up."""

    def __init__(self, owner: type, name: str, attribute: Any, options: dict[str, Any]):
        self.owner, self.name, self.attribute, self.options = owner, name, attribute, options

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        return self.instrumented().__get__(instance, owner)

    def instrumented(self) -> Any:
        current = vars(self.owner).get(self.name)
        if current is not self:  # another thread got here first
            return current
        instrumented = _instrument(self.attribute, self.owner, self.options)
        setattr(self.owner, self.name, instrumented)
        return instrumented


class _DeferredProperty(_Deferred):
    def __set__(self, instance: Any, value: Any) -> None:
        self.instrumented().__set__(instance, value)

    def __delete__(self, instance: Any) -> None:
        self.instrumented().__delete__(instance)


def _instrumented_by_typeguard(attribute: Any, owner: type) -> bool:
    """What typeguard's class branch instruments: methods, class and static methods, and properties whose accessors
    the class defines."""
    if isinstance(attribute, property):
        return any(_defined_in(function, owner) for function in (attribute.fget, attribute.fset, attribute.fdel))
    return _defined_in(getattr(attribute, "__func__", attribute), owner)


def _instrument(attribute: Any, owner: type, options: dict[str, Any]) -> Any:
    """typeguard's class branch, for one attribute."""
    if isinstance(attribute, property):
        return type(attribute)(**{name: _instrument_function(getattr(attribute, name), owner, options)
                                  for name in ("fget", "fset", "fdel")}, doc=attribute.__doc__)
    if isinstance(attribute, classmethod | staticmethod):
        return type(attribute)(_instrument_function(attribute.__func__, owner, options))
    return _instrument_function(attribute, owner, options)


def _instrument_function(function: Callable[..., Any] | None, owner: type, options: dict[str, Any]) -> Any:
    return _INSTRUMENT_NOW(function, **options) if _defined_in(function, owner) else function


def _defined_in(function: Any, owner: type) -> bool:
    return (
        inspect.isfunction(function)
        and function.__module__ == owner.__module__
        and function.__qualname__.startswith(owner.__qualname__ + ".")
    )
