"""Connecting to Ray the way Feast's Ray engine does, minus Ray Client.

An already-initialized Ray is used as is (a Ray job's driver, or Feast's engine in the same process).
Otherwise FEAST_RAY_EXECUTION_MODE decides (local / remote), then ``ray_address`` or RAY_ADDRESS (set
for a Ray job's driver on the cluster) means remote, and anything else starts a local Ray.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from sales_forecast.errors import PipelineError


class RayConnectionError(PipelineError):
    pass


def ray_target(ray_address: str | None) -> str:
    """``local``, or the address of the cluster to join."""
    mode = os.environ.get("FEAST_RAY_EXECUTION_MODE", "").strip().lower()
    if mode == "kuberay":
        raise RayConnectionError("FEAST_RAY_EXECUTION_MODE=kuberay is not supported by the Ray offline store: "
                                 "run the step as a Ray job on the cluster (RAY_ADDRESS is then set)")
    address = ray_address or os.environ.get("RAY_ADDRESS") or None
    if mode == "local" or (mode != "remote" and not address):
        return "local"
    if not address:
        raise RayConnectionError("FEAST_RAY_EXECUTION_MODE=remote needs ray_address or RAY_ADDRESS")
    if address.startswith("ray://"):
        raise RayConnectionError(f"Ray Client ({address}) is not supported (every result would cross the client "
                                 "proxy, and Feast's Ray engine fails through it on Ray 2.58): run the step as a "
                                 "Ray job, where RAY_ADDRESS is the cluster's GCS address")
    return address


def ensure_ray(ray_address: str | None, ray_conf: dict[str, Any] | None) -> None:
    import ray
    from ray.util.client import ray as ray_client

    if ray_client.is_connected():
        raise RayConnectionError("this process is connected through Ray Client (ray://), which the Ray offline "
                                 "store does not support: run the step as a Ray job on the cluster")
    if ray.is_initialized():
        return
    target = ray_target(ray_address)
    options: dict[str, Any] = {"address": target, "include_dashboard": False, "logging_level": logging.WARNING,
                               "ignore_reinit_error": True}
    if target != "local":  # a local Ray counts the CPUs itself, within a container's CPU quota
        options.pop("include_dashboard")
    options.update(ray_conf or {})
    ray.init(**options)


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))
