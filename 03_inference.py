#!/usr/bin/env python
"""Step 3: serve the champion model with KServe (features from the Feast online store) and query it.

--backend local (default): start the model server on 127.0.0.1 as part of the local stack (it keeps running;
`python -m sales_forecast.stack down` stops it), send the sample request, print predictions and latency.
--backend kubernetes: create or replace the InferenceService (Standard mode), wait until it is ready, send the
sample request to its cluster address (run this inside the cluster: manifests/steps/job-inference.yaml).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sales_forecast.cli import from_environment, positive_int, run_cli
from sales_forecast.config import EMBEDDED_MODEL_SERVER_PORT, INFERENCE_BACKENDS, Settings, load_settings
from sales_forecast.contract import CHAMPION_URI
from sales_forecast.errors import PipelineError
from sales_forecast.timing import PhaseTimer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    settings = from_environment(parser, load_settings)
    parser.set_defaults(settings=settings)
    parser.add_argument("--backend", choices=INFERENCE_BACKENDS, default=settings.inference_backend,
                        help="(INFERENCE_BACKEND)")
    parser.add_argument("--model-dir", default=None,
                        help="serve the Forecaster bundle in this folder (on the shared volume for kubernetes) "
                             "instead of the MLflow registry's champion")
    parser.add_argument("--model-uri", default=None,
                        help="registry alias to serve, models:/<name>@<alias> "
                             "(default: models:/sales-forecast@champion)")
    parser.add_argument("--requests", type=positive_int, default=200,
                        help="sample requests timed for the latency summary")
    parser.add_argument("--port", type=positive_int, default=EMBEDDED_MODEL_SERVER_PORT,
                        help="local backend: loopback port of the model server")
    parser.add_argument("--stop", action="store_true", help="local backend: stop the model server afterwards")
    parser.add_argument("--timeout", type=positive_int, default=600,
                        help="kubernetes backend: seconds to wait for the InferenceService to be ready")
    return parser.parse_args(argv)


def start_local(settings: Settings, args: argparse.Namespace, timer: PhaseTimer) -> str:
    from sales_forecast import stack
    from sales_forecast.serving.model_source import champion_version
    from sales_forecast.stack import model_server

    with timer.phase("start PostgreSQL / MLflow"):
        settings = stack.ensure_services(settings, mlflow=args.model_dir is None)
        if args.model_dir is None:
            model_uri = args.model_uri or CHAMPION_URI
            version = champion_version(settings.tracking_uri, model_uri)  # fails here, not in the server's log
            timer.note("start PostgreSQL / MLflow", f"{model_uri} = version {version}")
    with timer.phase("start model server"):
        model_dir = Path(args.model_dir) if args.model_dir else None
        extra = ["--model-uri", args.model_uri] if args.model_uri else []
        url = model_server.start(settings, args.port, model_dir=model_dir, extra_args=extra)
        timer.note("start model server", f"{url}, log {model_server.log_file(settings.stack_dir)}")
    return url


def deploy_kubernetes(settings: Settings, args: argparse.Namespace, timer: PhaseTimer) -> str:
    from sales_forecast.serving.kserve_import import hidden_argv
    from sales_forecast.serving.model_source import champion_version

    with hidden_argv():
        from kserve import KServeClient
        from kubernetes.config import ConfigException

        from sales_forecast.serving import kubernetes as isvc_ops

    try:
        client = KServeClient()  # in-cluster credentials in a pod, else the kubeconfig
    except ConfigException as exc:
        raise PipelineError(f"no Kubernetes configuration ({exc}); run this inside the cluster "
                            "(manifests/steps/job-inference.yaml) or with a kubeconfig") from exc
    with timer.phase("resolve model"):
        model_uri = args.model_uri or CHAMPION_URI
        version = None if args.model_dir else champion_version(settings.mlflow_tracking_uri, model_uri)
        timer.note("resolve model", args.model_dir or f"{model_uri} = version {version}")
    with timer.phase("create or replace InferenceService"):
        isvc = isvc_ops.build_inference_service(settings, model_dir=args.model_dir, model_uri=args.model_uri,
                                                model_version=version)
        applied = isvc_ops.create_or_replace(client, isvc)
    with timer.phase("wait until ready"):
        ready = isvc_ops.wait_ready(client, applied, args.timeout)
        url = isvc_ops.cluster_url(ready)
        timer.note("wait until ready", url)
    return url


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import httpx

    from sales_forecast.serving.client import SAMPLE_REQUEST, predict, time_requests

    settings = args.settings
    timer = PhaseTimer(f"step 3: inference ({args.backend})")
    url = (start_local if args.backend == "local" else deploy_kubernetes)(settings, args, timer)
    try:
        with httpx.Client(base_url=url, timeout=30.0) as client:
            with timer.phase("sample request"):
                predictions = predict(client, SAMPLE_REQUEST)
            with timer.phase("latency"):
                stats = time_requests(client, SAMPLE_REQUEST, args.requests)
                timer.note("latency", f"{args.requests} sequential requests")
    finally:
        if args.backend == "local" and args.stop:
            from sales_forecast.stack import model_server

            model_server.stop(settings.stack_dir)
    timer.print_summary()
    print(f"POST {url}/v1/models/sales-model:predict {json.dumps(SAMPLE_REQUEST)}")
    print(json.dumps({"predictions": predictions}))
    for instance, value in zip(SAMPLE_REQUEST["instances"], predictions, strict=True):
        print(f"  store {instance['store']:>3} dept {instance['dept']:>3}: next week's sales {value:,.2f}")
    print(f"latency (2 instances, client side): {stats.line()}")


if __name__ == "__main__":
    run_cli(main)
