"""Feast's Ray compute engine whose online writes hand the online store Arrow batches instead of protos.

feature_store.yaml: ``batch_engine: type: sales_forecast.ray_engine.BulkRayComputeEngine`` with the keys of
``type: ray.engine``. Everything is Feast's engine (plan, read, filter, dedup) except the write node: Feast's
converts each batch to one proto per value (``_convert_arrow_to_proto``: at 10x, 3.7M values, about 12 s of CPU),
then logs and drops any error. This one passes each Arrow batch to the online store's ``online_write_arrow`` when it
has one (``BulkPostgreSQLOnlineStore``: the same table rows from column arithmetic), converts to protos for any other
store, hands a view with ``offline=True`` the Arrow batch (Feast's went through pandas), and lets any write error
fail the materialization (online rows of earlier batches stay written, as with Feast's engine).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Literal

import pyarrow as pa
from feast.infra.common.materialization_job import MaterializationJobStatus, MaterializationTask
from feast.infra.common.serde import SerializedArtifacts
from feast.infra.compute_engines.dag.context import ExecutionContext
from feast.infra.compute_engines.dag.model import DAGFormat
from feast.infra.compute_engines.dag.value import DAGValue
from feast.infra.compute_engines.ray.compute import RayComputeEngine
from feast.infra.compute_engines.ray.config import RayComputeEngineConfig
from feast.infra.compute_engines.ray.feature_builder import RayFeatureBuilder
from feast.infra.compute_engines.ray.job import RayMaterializationJob
from feast.infra.compute_engines.ray.nodes import RayWriteNode
from feast.infra.registry.base_registry import BaseRegistry

from sales_forecast.online_store import feast_type, write_as_protos
from sales_forecast.ray_offline_store.driver import write_concurrency

logger = logging.getLogger(__name__)

ENGINE_TYPE = "sales_forecast.ray_engine.BulkRayComputeEngine"  # what feature_store.yaml names
DATA_CONTEXT_DEPRECATIONS = r"`(use_push_based_shuffle|use_polars|use_arrow_tensor_v2)` is deprecated"


class BulkRayComputeEngineConfig(RayComputeEngineConfig):
    """The ``ray.engine`` keys, unchanged."""

    type: Literal["ray.engine"] = "ray.engine"  # type: ignore[assignment]
    _ray_engine = feast_type(ENGINE_TYPE, "ray.engine")


def write_online(online_store: Any, config: Any, view: Any, table: pa.Table) -> None:
    """Write ``table`` (rows of ``view``) to the online store in ``online_write_batch_size`` batches, as Feast's
    engine does; errors are raised."""
    batch_rows = config.materialization_config.online_write_batch_size
    table = table.combine_chunks()
    for part in table.to_batches(max_chunksize=batch_rows) if batch_rows else table.to_batches():
        batch = pa.Table.from_batches([part])
        if hasattr(online_store, "online_write_arrow"):
            online_store.online_write_arrow(config, view, batch)
        else:
            write_as_protos(online_store, config, view, batch)


class ArrowWriteNode(RayWriteNode):
    """Feast's RayWriteNode with the online write of ``write_online`` and no error swallowed."""

    def execute(self, context: ExecutionContext) -> DAGValue:
        input_value = self.get_single_input_value(context)
        input_value.assert_format(DAGFormat.RAY)
        artifacts = SerializedArtifacts.serialize(feature_view=self.feature_view, repo_config=context.repo_config)

        def write(batch: pa.Table) -> pa.Table:
            if batch.num_rows == 0:
                return batch
            view, online_store, offline_store, repo_config = artifacts.unserialize()
            if getattr(view, "online", False):
                write_online(online_store, repo_config, view, batch)
            if getattr(view, "offline", False):
                offline_store.offline_write_batch(config=repo_config, feature_view=view, table=batch,
                                                  progress=lambda _: None)
            return batch

        mapped = input_value.data.map_batches(write, batch_format="pyarrow", concurrency=write_concurrency(self.config))
        # Ray Data raises a UDF's error as "UDF failed to process a data block", the error itself only in the
        # traceback's text; raised as it is, the step can report it (a database error: one line, `cli.run_cli`).
        # The context object is shared by the datasets this one derives from (Feast's read of this materialization),
        # not the process's current one; the flag only changes which exception a failed task raises.
        mapped.context.raise_original_map_exception = True
        written = mapped.materialize()
        source = getattr(self.feature_view, "batch_source", None)
        return DAGValue(data=written, format=DAGFormat.RAY, metadata={
            "written": True, "feature_view": self.feature_view.name,
            "online": getattr(self.feature_view, "online", False),
            "offline": getattr(self.feature_view, "offline", False),
            "batch_source_path": getattr(source, "path", "unknown")})


class BulkRayComputeEngine(RayComputeEngine):
    def __init__(self, *args: Any, **kwargs: Any):
        with warnings.catch_warnings():
            # Ray 2.58's first DataContext of a process (which Feast's engine makes) sets each of its fields through
            # its __setattr__, which warns about three deprecated ones whatever their value; Feast's import shows
            # every DeprecationWarning once (warnings.simplefilter("once")), so each step 1 printed them
            warnings.filterwarnings("ignore", message=DATA_CONTEXT_DEPRECATIONS, category=DeprecationWarning)
            super().__init__(*args, **kwargs)

    def _materialize_one(self, registry: BaseRegistry, task: MaterializationTask, from_offline_store: bool = False,
                         **kwargs: Any) -> RayMaterializationJob:
        if from_offline_store:  # Feast's legacy path, deprecated: Feast's own writes
            return super()._materialize_one(registry, task, from_offline_store, **kwargs)
        job_id = f"{task.feature_view.name}-{task.start_time}-{task.end_time}"
        try:
            context = self.get_execution_context(registry, task)
            plan = RayFeatureBuilder(registry, task.feature_view, task, self.config).build()
            for node in plan.nodes:
                if type(node) is RayWriteNode:
                    # the same node (its inputs, and the later nodes that depend on it, keep pointing at it) with
                    # ArrowWriteNode's execute: Feast's builder constructs RayWriteNode by name
                    node.__class__ = ArrowWriteNode
            result = plan.execute(context)
        except Exception as exc:
            logger.error("Materialization failed for %s: %s", task.feature_view.name, exc)
            return RayMaterializationJob(job_id=job_id, status=MaterializationJobStatus.ERROR, error=exc)
        return RayMaterializationJob(job_id=job_id, status=MaterializationJobStatus.SUCCEEDED, result=result)


__all__ = ["ENGINE_TYPE", "ArrowWriteNode", "BulkRayComputeEngine", "BulkRayComputeEngineConfig"]
