"""``SalesModel``: the kserve.Model behind ``/v1/models/sales-model:predict`` and ``/v2/models/sales-model/infer``.

preprocess validates the request and fetches the Feast online rows off the event loop; predict runs
``Forecaster.predict`` on them (the same preprocessing as training: ``Forecaster.inputs``).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import numpy as np
import pandas as pd
from kserve import InferOutput, InferRequest, InferResponse, Model
from kserve.logging import logger

from sales_forecast.config import Settings
from sales_forecast.forecaster import Forecaster
from sales_forecast.serving.http_errors import FeaturesUnavailable
from sales_forecast.serving.instances import Instance, parse_v1, parse_v2
from sales_forecast.serving.metrics import FEATURE_LOOKUP_SECONDS
from sales_forecast.serving.model_source import ModelSource, load_forecaster
from sales_forecast.serving.online_features import OnlineFeatureLookup

LOOKUP_TIMEOUT_SECONDS = 10.0


class SalesModel(Model):
    def __init__(self, name: str, settings: Settings, source: ModelSource, max_instances: int | None = None):
        super().__init__(name)
        self.settings = settings
        self.source = source
        self.max_instances = max_instances or settings.max_instances
        self.forecaster: Forecaster | None = None
        self.lookup: OnlineFeatureLookup | None = None

    def load(self) -> bool:
        loaded = load_forecaster(self.source)
        self.forecaster = loaded.forecaster
        self.lookup = OnlineFeatureLookup.open(self.settings, self.forecaster.features)
        logger.info("model %s: %s; features from %s", self.name, loaded.origin, self.lookup.where)
        self.ready = True
        return self.ready

    def instances(self, payload: Any) -> list[Instance]:
        if isinstance(payload, InferRequest):
            return parse_v2({i.name: (i.datatype, _flat(i.data)) for i in payload.inputs}, self.max_instances)
        return parse_v1(payload, self.max_instances)

    async def feature_rows(self, instances: list[Instance]) -> pd.DataFrame:
        try:
            with FEATURE_LOOKUP_SECONDS.time():
                # Feast's read is blocking I/O (psycopg): run it in the loop's thread pool.
                return await asyncio.wait_for(asyncio.to_thread(self.lookup.rows, instances), LOOKUP_TIMEOUT_SECONDS)
        except TimeoutError:
            raise FeaturesUnavailable(f"the online feature lookup took over {LOOKUP_TIMEOUT_SECONDS:.0f} s "
                                      f"(PostgreSQL at {self.lookup.where}); retry shortly") from None

    async def preprocess(self, payload: Any, headers: dict[str, str] | None = None) -> dict[str, Any]:
        rows = await self.feature_rows(self.instances(payload))
        request_id = (payload.id or str(uuid.uuid4())) if isinstance(payload, InferRequest) else None
        return {"rows": rows, "v2": isinstance(payload, InferRequest), "id": request_id}

    def predict(self, payload: dict[str, Any], headers: dict[str, str] | None = None) -> dict | InferResponse:
        # A forward pass of a small MLP: well under a millisecond, not worth a thread hop.
        predictions = self.forecaster.predict(payload["rows"]).tolist()
        if payload["v2"]:
            output = InferOutput(name="predictions", shape=[len(predictions)], datatype="FP64", data=predictions)
            return InferResponse(model_name=self.name, response_id=payload["id"], infer_outputs=[output])
        return {"predictions": predictions}


def _flat(data: Any) -> list:
    return data.reshape(-1).tolist() if isinstance(data, np.ndarray) else list(data)
