"""Feast imported through this package (sales_forecast/feast_import.py) against Feast imported alone: typeguard's
checks instrumented at a method's first lookup, with the same errors and signatures, and torch imported at the first
``get_torch()``, with the same answers.

Each side runs in a fresh interpreter: "upstream" imports Feast alone, "deferred" imports this package first.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import typeguard

from sales_forecast import feast_import

REPO = Path(__file__).resolve().parents[1]

_COUNT_INSTRUMENTATIONS = """
import typeguard._decorators as decorators
instrumented = []
_instrument = decorators.instrument
def counting(function):
    instrumented.append(function.__qualname__)
    return _instrument(function)
decorators.instrument = counting
"""

_MISUSES = """
from datetime import timedelta
from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
from feast.infra.offline_stores.contrib.postgres_offline_store.postgres_source import PostgreSQLSource
from feast.protos.feast.core.Entity_pb2 import Entity as EntityProto
from feast.types import Float64

source = FileSource(path="sales.parquet", timestamp_field="event_timestamp")
store = Entity(name="store", join_keys=["store"], value_type=ValueType.INT64)
misuses = {
    "Entity name": lambda: Entity(name=1),
    "Entity name again": lambda: Entity(name=1),
    "Field dtype": lambda: Field(name="sales", dtype=int),
    "FeatureView ttl": lambda: FeatureView(name="v", entities=[store], source=source, ttl="1d"),
    "FeatureView.from_proto (classmethod)": lambda: FeatureView.from_proto(EntityProto()),
    "FeatureService features": lambda: FeatureService(name="s", features=[1]),
    "FileSource path": lambda: FileSource(path=3, timestamp_field="event_timestamp"),
    "PostgreSQLSource name": lambda: PostgreSQLSource(name=1, query="SELECT 1", timestamp_field="event_timestamp"),
}
answers = {}
for label, misuse in misuses.items():
    try:
        answers[label] = f"accepted {type(misuse()).__name__}"
    except Exception as error:
        answers[label] = f"{type(error).__module__}.{type(error).__name__}: {error}"
view = FeatureView(name="v", entities=[store], schema=[Field(name="sales", dtype=Float64)], source=source,
                   ttl=timedelta(days=7))
import warnings
with warnings.catch_warnings(record=True) as caught:  # Feast's warnings name the caller's line, as before
    warnings.simplefilter("always")
    Entity(name="no_value_type", join_keys=["key"])
answers["warnings"] = [[w.category.__name__, str(w.message), w.filename, w.lineno] for w in caught]
def spec(proto):  # without the source's created and updated timestamps
    proto.spec.batch_source.ClearField("meta")
    return proto.spec.SerializeToString().hex()
answers["valid FeatureView, spec"] = spec(view.to_proto())
answers["valid FeatureView, round trip"] = spec(FeatureView.from_proto(view.to_proto()).to_proto())
"""

_SIGNATURES = """
import importlib, inspect
modules = ["feast.entity", "feast.field", "feast.feature_view", "feast.on_demand_feature_view",
           "feast.stream_feature_view", "feast.feature_service", "feast.data_source", "feast.project",
           "feast.infra.offline_stores.contrib.postgres_offline_store.postgres_source"]
import warnings
answers = {}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for name in modules:
        module = importlib.import_module(name)
        for cls in vars(module).values():
            if inspect.isclass(cls) and cls.__module__ == name:
                for attribute in list(vars(cls)):
                    getattr(cls, attribute)  # the first lookup, which instruments
answers["warnings"] = [str(w.message) for w in caught]
for name in modules:
    module = importlib.import_module(name)
    for cls in vars(module).values():
        if not inspect.isclass(cls) or cls.__module__ != name:
            continue
        answers[f"{cls.__qualname__} abstract"] = sorted(getattr(cls, "__abstractmethods__", ()))
        for attribute, value in vars(cls).items():
            answers[f"{cls.__qualname__}.{attribute} type"] = type(value).__name__
            function = value.__func__ if isinstance(value, classmethod | staticmethod) else value
            if isinstance(value, property):
                function = value.fget
            if not callable(function):
                continue
            try:
                signature = str(inspect.signature(function))
            except (TypeError, ValueError) as error:
                signature = f"no signature: {error}"
            answers[f"{cls.__qualname__}.{attribute}"] = [
                type(value).__name__ if isinstance(value, classmethod | staticmethod | property) else "function",
                signature, inspect.iscoroutinefunction(function), inspect.isgeneratorfunction(function),
                getattr(function, "__doc__", None), getattr(function, "__name__", None)]
"""


_TORCH = """
import sys
from feast.infra.offline_stores.offline_store import RetrievalJob  # noqa: F401  the module that imports torch
answers = {"torch imported": "torch" in sys.modules}
from feast.infra.offline_stores import offline_store
try:
    answers["get_torch"] = offline_store.get_torch().__name__
except ImportError as error:
    answers["get_torch"] = f"ImportError: {error}"
import feast.torch_wrapper
answers["wrapper"] = feast.torch_wrapper.__file__.split("site-packages/")[-1]
answers["TORCH_AVAILABLE"] = feast.torch_wrapper.TORCH_AVAILABLE
answers["torch imported after get_torch"] = "torch" in sys.modules
"""

_FIRST_LOOKUPS_AT_ONCE = """
import threading
from feast import FeatureService, FileSource
barrier, results, lock = threading.Barrier(8), [], threading.Lock()
def first_use(i):
    barrier.wait()  # eight threads look up methods no one has looked up yet, at once
    try:
        FeatureService(name=i, features=[])
        answer = "accepted"
    except Exception as error:
        answer = f"{type(error).__name__}: {error}"
    path = FileSource(path=f"sales_{i}.parquet", timestamp_field="event_timestamp").path
    with lock:
        results.append([answer, path])
threads = [threading.Thread(target=first_use, args=(i,)) for i in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
answers = {"results": sorted(results), "FeatureService.__init__": type(vars(FeatureService)["__init__"]).__name__,
           "FileSource.__init__": type(vars(FileSource)["__init__"]).__name__}
"""


def _run(side: str, body: str, before: str = "") -> dict:
    imports = "import sales_forecast, feast\n" if side == "deferred" else "import feast\n"  # the same line numbers
    code = textwrap.dedent(_COUNT_INSTRUMENTATIONS) + before + imports + \
        "at_import = len(instrumented)\n" + textwrap.dedent(body) + \
        "import json\nprint(json.dumps({'at_import': at_import, 'instrumented': sorted(set(instrumented)), " \
        "'answers': answers}))\n"
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _both(body: str, before: str = "") -> tuple[dict, dict]:
    with ThreadPoolExecutor(2) as pool:
        upstream, deferred = pool.map(lambda side: _run(side, body, before), ("upstream", "deferred"))
    return upstream, deferred


def test_feasts_type_errors_are_upstreams_and_nothing_is_instrumented_at_import():
    upstream, deferred = _both(_MISUSES)
    assert upstream["at_import"] > 100, upstream["at_import"]  # what the deferral removes: typeguard#468
    assert deferred["at_import"] <= 5  # Feast builds a dummy Entity and Field at import: those two are called
    assert deferred["answers"] == upstream["answers"]
    answers = deferred["answers"]
    assert answers["Entity name"].startswith("typeguard.TypeCheckError: argument \"name\" (int)")
    assert answers["Entity name again"] == answers["Entity name"]  # the instrumented method, called again
    assert answers["FeatureView.from_proto (classmethod)"].startswith("typeguard.TypeCheckError")
    assert answers["PostgreSQLSource name"].startswith("typeguard.TypeCheckError")
    # only what was called got instrumented, each method once
    assert "Entity.__init__" in deferred["instrumented"]
    assert "FeatureView.from_proto" in deferred["instrumented"]
    assert len(deferred["instrumented"]) < upstream["at_import"] // 4


def test_every_decorated_method_keeps_its_signature_kind_and_docstring():
    upstream, deferred = _both(_SIGNATURES)
    assert len(upstream["answers"]) > 150  # 209 methods, class methods and properties in Feast 0.67
    assert upstream["answers"]["warnings"] == []
    assert deferred["answers"] == upstream["answers"]  # no stand-in left after the first lookups, no warning


def test_torch_is_imported_at_feasts_first_get_torch_with_feasts_answers():
    upstream, deferred = _both(_TORCH)
    assert upstream["answers"]["torch imported"] is True
    assert deferred["answers"]["torch imported"] is False
    for answers in (upstream["answers"], deferred["answers"]):
        answers.pop("torch imported")
    assert deferred["answers"] == upstream["answers"] == {
        "get_torch": "torch", "wrapper": "feast/torch_wrapper.py", "TORCH_AVAILABLE": True,
        "torch imported after get_torch": True}


def test_a_torch_that_cannot_be_imported_gets_feasts_error():
    upstream, deferred = _both(_TORCH, before="import sys\nsys.modules['torch'] = None\n")
    assert deferred["answers"] == upstream["answers"]
    assert deferred["answers"]["get_torch"].startswith("ImportError: Torch is not available or failed to import.")
    assert deferred["answers"]["TORCH_AVAILABLE"] is False


def test_first_lookups_from_many_threads_at_once_get_upstreams_answers():
    upstream, deferred = _both(_FIRST_LOOKUPS_AT_ONCE)
    assert deferred["answers"] == upstream["answers"]
    assert len(deferred["answers"]["results"]) == 8
    assert all(answer.startswith("TypeCheckError") for answer, _ in deferred["answers"]["results"])
    assert deferred["answers"]["FeatureService.__init__"] == "function"


def test_a_class_outside_feast_is_instrumented_at_once_as_typeguard_does():
    assert typeguard.typechecked is feast_import.typechecked_on_first_use  # this package is imported

    @typeguard.typechecked
    class Doubler:
        def double(self, value: int) -> int:
            return value * 2

    assert type(vars(Doubler)["double"]).__name__ == "function"
    assert Doubler().double(2) == 4
    with pytest.raises(typeguard.TypeCheckError):
        Doubler().double("2")
