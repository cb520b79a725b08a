"""What the weekly cycle tells the serving side after a promotion: on Kubernetes it rolls the InferenceService to
the new version; locally it starts the model server on the shared model directory and waits, after each
promotion, until the server (which reloads new champions by itself) answers with the new version."""

from __future__ import annotations

from sales_forecast.config import Settings

PROMOTION_WAIT_SECONDS = 60  # the local server checks every LOCAL_RELOAD_SECONDS
LOCAL_RELOAD_SECONDS = "2"


def roll_inference_service(settings: Settings):
    """On Kubernetes: a promotion rolls the InferenceService step 3 created to the new version."""
    from sales_forecast.errors import PipelineError
    from sales_forecast.serving.kserve_import import hidden_argv

    with hidden_argv():
        from kserve import KServeClient
        from kubernetes.config import ConfigException

        from sales_forecast.serving.kubernetes import roll_to

    try:
        client = KServeClient()  # in-cluster credentials in the CronJob's pod, else the kubeconfig
    except ConfigException as exc:
        raise PipelineError(f"INFERENCE_BACKEND=kubernetes but no Kubernetes configuration ({exc})") from exc

    def roll(version: str) -> None:
        if not roll_to(client, settings.namespace, version):
            print("no InferenceService sales-model yet (step 3 creates it): nothing to roll")

    return roll


def follow_local_server(settings: Settings, port: int, name: str | None = None):
    """The local model server (``name``: a stack folder of its own) on the shared model directory, checking for a
    new champion every 2 s; returns (on_promotion: wait until it serves the new version, served_version)."""
    from sales_forecast.errors import PipelineError
    from sales_forecast.serving.client import served_version, wait_for_version
    from sales_forecast.stack import model_server

    name = name or model_server.DEFAULT_NAME
    url = model_server.start(settings, port, model_dir=settings.model_dir, name=name,
                             extra_env={"SERVING_RELOAD_SECONDS": LOCAL_RELOAD_SECONDS})
    log = model_server.log_file(settings.stack_dir, name)
    print(f"model server {url} (log {log}), reloading new champions")

    def follow(version: str) -> None:
        if not wait_for_version(url, version, PROMOTION_WAIT_SECONDS):
            raise PipelineError(f"the model server at {url} did not switch to version {version} within "
                                f"{PROMOTION_WAIT_SECONDS} s: see {log}")

    return follow, lambda: served_version(url)
