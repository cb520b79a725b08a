"""``SalesModel``: the kserve.Model behind ``/v1/models/sales-model:predict`` and ``/v2/models/sales-model/infer``.

preprocess validates the request and fetches the Feast online rows off the event loop; predict runs
``Forecaster.predict_quantiles`` on them (the same preprocessing as training: ``Forecaster.inputs``).

Answers. v1: ``{"predictions": [P50 per instance]}``; with ``"parameters": {"quantiles": true}`` also
``"quantiles": {"p10": [...], "p50": [...], "p90": [...]}`` (every level the model forecasts). v2: the output
``predictions`` (the P50) plus one output ``p<level>`` per other quantile (``p10``, ``p90``), FP64 of shape [n], or
the outputs the request names. The served model's version is in the ``x-model-version`` header of every answer
and in v2's ``model_version``.

The served model (``Served``) is one reference, swapped whole by ``swap`` (the background reload): a request uses
the model it started with from preprocess to predict, so a swap during a request never mixes two models.
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from kserve import InferOutput, InferRequest, InferResponse, Model
from kserve.logging import logger
from kserve.protocol.infer_type import RequestedOutput

from sales_forecast.config import Settings
from sales_forecast.errors import PipelineError
from sales_forecast.forecaster import ID_COLUMNS, POINT_QUANTILE, Forecaster
from sales_forecast.serving.http_errors import BadRequest, FeaturesUnavailable
from sales_forecast.serving.instances import Instance, parse_v1_request, parse_v2
from sales_forecast.serving.metrics import FEATURE_LOOKUP_SECONDS, MODEL_LOADED_AT, SERVED_MODEL
from sales_forecast.serving.model_source import LoadedModel, ModelSource, load_forecaster
from sales_forecast.serving.online_features import FeatureRows, NoConnection, OnlineFeatureLookup, ReadTicket

LOOKUP_TIMEOUT_SECONDS = 4.0  # then 503: below the 5 s a client should wait for an answer during an outage
MODEL_VERSION_HEADER = "x-model-version"
POINT_OUTPUT = "predictions"
INPUTS = ("store", "dept")
DATATYPE = "FP64"


def quantile_name(level: float) -> str:
    """The name of a quantile's output: p10 for 0.1, p50 for 0.5, p2.5 for 0.025."""
    return f"p{round(level * 100, 6):g}"


@dataclass(frozen=True)
class Served:
    """The model being served, with what the answers need about it."""

    forecaster: Forecaster
    version: str
    origin: str
    marker: str  # what the source pointed at when it was loaded (the reload check compares it)
    levels: tuple[tuple[str, int], ...]  # (p10, column) for every quantile level, in the forecaster's order
    outputs: tuple[tuple[str, int], ...]  # v2 outputs: predictions (the P50's column), then the other levels
    point: int  # the P50's column

    @classmethod
    def of(cls, loaded: LoadedModel) -> Served:
        forecaster = loaded.forecaster
        if POINT_QUANTILE not in forecaster.quantiles:
            raise PipelineError(f"{loaded.origin} forecasts quantiles {forecaster.quantiles} without the median "
                                f"({POINT_QUANTILE}), which the answers' predictions are")
        levels = tuple((quantile_name(q), column) for column, q in enumerate(forecaster.quantiles))
        if len({name for name, _ in levels}) != len(levels):
            raise PipelineError(f"{loaded.origin} has quantile levels that share a name: {forecaster.quantiles}")
        point = forecaster.quantiles.index(POINT_QUANTILE)
        outputs = ((POINT_OUTPUT, point), *((name, column) for name, column in levels if column != point))
        return cls(forecaster, loaded.version or "unknown", loaded.origin, loaded.marker, levels, outputs, point)

    def output_types(self) -> list[dict[str, Any]]:
        return [{"name": name, "datatype": DATATYPE, "shape": [-1]} for name, _ in self.outputs]

    def select_outputs(self, requested: Sequence[RequestedOutput] | None) -> tuple[tuple[str, int], ...]:
        if not requested:
            return self.outputs
        columns = dict(self.outputs)
        unknown = [output.name for output in requested if output.name not in columns]
        if unknown:
            raise BadRequest(f"unknown output {', '.join(repr(n) for n in unknown)}; this model's outputs are "
                             f"{', '.join(columns)} (GET /v2/models/<name> lists them)")
        return tuple((output.name, columns[output.name]) for output in requested)


@dataclass
class Prepared:
    """preprocess -> predict: the feature rows and what the answer must hold."""

    rows: FeatureRows
    served: Served
    v2: bool = False
    request_id: str | None = None
    quantiles: bool = False  # v1: add every quantile to the answer
    outputs: tuple[tuple[str, int], ...] = ()  # v2: (name, column) to answer
    requested: list[RequestedOutput] | None = None  # v2: the request's outputs (their binary_data parameters)
    binary_outputs: bool = False  # v2: the request's binary_data_output parameter


class SalesModel(Model):
    def __init__(self, name: str, settings: Settings, source: ModelSource, max_instances: int | None = None,
                 lookup_timeout: float = LOOKUP_TIMEOUT_SECONDS):
        super().__init__(name, return_response_headers=True)
        self.settings = settings
        self.source = source
        self.max_instances = max_instances or settings.max_instances
        self.lookup_timeout = lookup_timeout
        self.served: Served | None = None
        self.lookup: OnlineFeatureLookup | None = None

    @property
    def forecaster(self) -> Forecaster:
        return self.served.forecaster

    def load(self) -> bool:
        loaded = load_forecaster(self.source)
        self.lookup = OnlineFeatureLookup.open(self.settings, loaded.forecaster.features, self.lookup_timeout)
        served = self.swap(loaded)
        logger.info("model %s: %s (version %s); features from %s", self.name, served.origin, served.version,
                    self.lookup.where)
        self.ready = True
        return self.ready

    def swap(self, loaded: LoadedModel) -> Served:
        """Check a loaded model and make it the served one (one reference assignment: atomic for requests)."""
        self.lookup.check_features(loaded.forecaster.features)
        served = Served.of(loaded)
        warm = served.forecaster.predict_quantiles({**{name: np.ones(1) for name in served.forecaster.features},
                                                    **{name: np.ones(1, dtype="int64") for name in ID_COLUMNS}})
        if warm.shape != (1, len(served.forecaster.quantiles)) or not np.isfinite(warm).all():
            raise PipelineError(f"{loaded.origin} answers a test row with {warm!r}, not "
                                f"{len(served.forecaster.quantiles)} finite forecasts")
        self.served = served
        SERVED_MODEL.info({"version": served.version, "source": self.source.description})
        MODEL_LOADED_AT.set_to_current_time()
        return served

    def validate(self, payload: Any) -> Any:
        return payload  # preprocess validated the request; kserve's generic check expects a dict or InferRequest

    def get_input_types(self) -> list[dict[str, Any]]:
        return [{"name": name, "datatype": "INT64", "shape": [-1]} for name in INPUTS]

    def get_output_types(self) -> list[dict[str, Any]]:
        return self.served.output_types() if self.served else []

    async def feature_rows(self, instances: list[Instance], features: Sequence[str]) -> FeatureRows:
        """Feast's read is blocking I/O (psycopg), well under a millisecond on an open connection.

        With an open connection it runs right here on the event loop, bounded by the lookup's watchdog (which ends
        it after ``lookup_timeout`` by shutting its connection's socket down): a thread hand-off costs about as much
        as the read itself. Without one (at start, after a database error) it runs in the loop's thread pool, which
        may connect (up to PGCONNECT_TIMEOUT); a lookup there that takes over ``lookup_timeout`` is answered 503
        and abandoned: its connection is retired and its query cancelled."""
        start = time.perf_counter()
        if self.lookup.can_read_inline():
            try:
                return self.lookup.rows_inline(instances, features, self.lookup_timeout)
            except NoConnection:
                pass  # the open connection failed and was retired: connect from a worker thread
            finally:
                FEATURE_LOOKUP_SECONDS.observe(time.perf_counter() - start)
            start = time.perf_counter()
        ticket = ReadTicket()
        read = functools.partial(self.lookup.rows, instances, features, ticket)
        try:
            async with asyncio.timeout(self.lookup_timeout):
                return await asyncio.get_running_loop().run_in_executor(None, read)
        except TimeoutError:
            self.lookup.abandon(ticket)
            raise FeaturesUnavailable(f"the online feature lookup took over {self.lookup_timeout:g} s "
                                      f"(PostgreSQL at {self.lookup.where}); retry shortly") from None
        finally:
            FEATURE_LOOKUP_SECONDS.observe(time.perf_counter() - start)

    async def preprocess(self, payload: Any, headers: dict[str, str] | None = None) -> Prepared:
        served = self.served
        if isinstance(payload, InferRequest):
            instances = parse_v2({i.name: (i.datatype, _flat(i.data)) for i in payload.inputs}, self.max_instances)
            prepared = Prepared({}, served, v2=True, request_id=payload.id or str(uuid.uuid4()),
                                outputs=served.select_outputs(payload.request_outputs),
                                requested=payload.request_outputs, binary_outputs=payload.use_binary_outputs)
        else:
            request = parse_v1_request(payload, self.max_instances)
            instances = request.instances
            prepared = Prepared({}, served, quantiles=request.quantiles)
        prepared.rows = await self.feature_rows(instances, served.forecaster.features)
        return prepared

    def predict(self, payload: Prepared, headers: dict[str, str] | None = None,
                response_headers: dict[str, str] | None = None) -> dict | InferResponse:
        # A forward pass of a small MLP on a few rows: tens of microseconds, not worth a thread hop.
        served = payload.served
        forecasts = served.forecaster.predict_quantiles(payload.rows)
        if response_headers is not None:
            response_headers[MODEL_VERSION_HEADER] = served.version
        if payload.v2:
            count = len(forecasts)
            outputs = [InferOutput(name=name, shape=[count], datatype=DATATYPE, data=forecasts[:, column].tolist())
                       for name, column in payload.outputs]
            return InferResponse(model_name=self.name, response_id=payload.request_id, infer_outputs=outputs,
                                 model_version=served.version, use_binary_outputs=payload.binary_outputs,
                                 requested_outputs=payload.requested)
        answer: dict[str, Any] = {"predictions": forecasts[:, served.point].tolist()}
        if payload.quantiles:
            answer["quantiles"] = {name: forecasts[:, column].tolist() for name, column in served.levels}
        return answer


def _flat(data: Any) -> list:
    return data.reshape(-1).tolist() if isinstance(data, np.ndarray) else list(data)
