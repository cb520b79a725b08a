"""The model server: ``python -m sales_forecast.serving.server [--host H] [--http_port P] [--model-dir DIR]``.

Serves ``SalesModel`` with kserve's REST server (v1, v2, health and Prometheus ``/metrics`` routes), REST only.
It listens on 127.0.0.1 unless ``--host`` says otherwise (the InferenceService passes 0.0.0.0). kserve's own
flags (``--http_port``, ``--model_name``, ``--workers``...) are accepted too; kserve parses them when imported.
Request bodies over ``SERVING_MAX_BODY_BYTES`` get 413 before they are read; every ``SERVING_RELOAD_SECONDS`` a
background thread looks for a new model and refreshes the accuracy gauges (``refresh``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import warnings
from http import HTTPStatus
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import FastAPIDeprecationWarning, RequestValidationError
from fastapi.responses import JSONResponse
from kserve import Model, ModelServer, model_server
from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING, INFERENCE_CONTENT_LENGTH_HEADER, PredictorProtocol
from kserve.errors import InvalidInput
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.rest.server import RESTServer
from kserve.protocol.rest.v2_datamodels import InferenceRequest
from pydantic import ValidationError

from sales_forecast.cli import positive_float, positive_int, run_cli
from sales_forecast.config import Settings, load_settings, set_library_defaults
from sales_forecast.contract import CHAMPION_URI, MODEL_NAME
from sales_forecast.serving.body_limit import BodyLimitMiddleware
from sales_forecast.serving.http_errors import ServingError
from sales_forecast.serving.metrics import ERROR_RESPONSES
from sales_forecast.serving.model import LOOKUP_TIMEOUT_SECONDS, SalesModel
from sales_forecast.serving.model_source import ModelSource
from sales_forecast.serving.refresh import BackgroundRefresh

DEFAULT_HOST = "127.0.0.1"
SERVER_LIBRARY_DEFAULTS = {
    "PGCONNECT_TIMEOUT": "3",  # libpq waits forever for an unreachable host; 3 s turns an outage into a prompt 503
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # a progress bar in a server log is noise
    # MLflow retries a failed call 7 times with growing back-off (minutes when it is down); the reload check
    # runs again after SERVING_RELOAD_SECONDS anyway.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


class SalesDataPlane(DataPlane):
    """kserve's data plane, with the served model's version in the v2 model metadata (``versions``), and v2 JSON
    bodies sent without a Content-Type accepted (see ``decode``)."""

    def decode(self, body, headers, protocol_version: str = PredictorProtocol.REST_V1.value,
               model_name: str | None = None):
        """FastAPI does not parse a body without a Content-Type as JSON (``strict_content_type``) and hands the v2
        route its bytes, which kserve reads only as the binary tensor extension (with an
        Inference-Header-Content-Length header). Triton's HTTP client, a common Open Inference Protocol client,
        sends no Content-Type: such bytes without that header are parsed here as the JSON request they are."""
        if (isinstance(body, bytes) and protocol_version.lower() == PredictorProtocol.REST_V2.value
                and INFERENCE_CONTENT_LENGTH_HEADER not in headers):
            try:
                body = InferenceRequest.model_validate_json(body)
            except ValidationError as exc:
                raise InvalidInput(f"invalid request: {_first_error(exc)}") from None
        return super().decode(body, headers, protocol_version=protocol_version, model_name=model_name)

    async def model_metadata(self, model_name: str) -> dict:
        metadata = await super().model_metadata(model_name)
        served = getattr(self.get_model_from_registry(model_name), "served", None)
        if served is not None:
            metadata.update(versions=[served.version], platform="pytorch")
        return metadata


class HostModelServer(ModelServer):
    """kserve's ModelServer with the REST listener on a chosen host (kserve 0.21 hard-codes 0.0.0.0).

    One uvicorn worker and no gRPC: ``start`` is kserve's single-process path with the host set before the
    listener binds.
    """

    def __init__(self, host: str, http_port: int, **kwargs):
        super().__init__(http_port=http_port, workers=1, enable_grpc=False, **kwargs)
        self.host = host
        self.dataplane = SalesDataPlane(model_registry=self.registered_models)

    def start(self, models: list[Model]) -> None:
        self._register_and_check_atleast_one_model_is_ready(models)
        self._rest_server = RESTServer(
            FASTAPI_APP_IMPORT_STRING, self.dataplane, self.model_repository_extension, self.http_port,
            access_log_format=self.access_log_format, workers=1, grace_period=self.grace_period,
            event_loop=self.event_loop, timeout_keep_alive=self.timeout_keep_alive)
        self._rest_server.config.host = self.host
        self.servers.append(self._rest_server.start())
        self.setup_event_loop()
        self.register_signal_handler()
        asyncio.run(self._serve())


async def serving_error_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServingError)
    ERROR_RESPONSES.labels(status=str(int(exc.status))).inc()
    return JSONResponse(status_code=exc.status, content=exc.body())


def _first_error(exc: RequestValidationError | ValidationError, skip: int = 0) -> str:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid"}
    where = ".".join(str(part) for part in first.get("loc", ())[skip:]) or "body"
    return f"{where}: {first['msg']}"


async def invalid_request_handler(_: Request, exc: Exception) -> JSONResponse:
    """FastAPI's schema check of v2 bodies answers 422 with its own shape; answer like every other bad input."""
    assert isinstance(exc, RequestValidationError)
    message = f"invalid request: {_first_error(exc, skip=1)}"
    ERROR_RESPONSES.labels(status=str(int(HTTPStatus.BAD_REQUEST))).inc()
    return JSONResponse(status_code=HTTPStatus.BAD_REQUEST, content={"error": message})


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServingError, serving_error_handler)
    app.add_exception_handler(RequestValidationError, invalid_request_handler)


def install_body_limit(app: FastAPI, max_bytes: int) -> None:
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_bytes)


def quiet_request_logs() -> None:
    """Silence the per-request lines of uvicorn's access log and kserve's timing middleware."""
    for name in ("uvicorn.access", "kserve.trace"):
        logging.getLogger(name).setLevel(logging.WARNING)


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def parse_args(settings: Settings, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sales_forecast.serving.server", description=__doc__,
                                     parents=[model_server.parser],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (0.0.0.0 in a pod)")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="serve the Forecaster bundle in this folder instead of the MLflow registry's")
    parser.add_argument("--model-uri", default=CHAMPION_URI, help="registry alias to serve (models:/name@alias)")
    parser.add_argument("--max-instances", type=positive_int, default=settings.max_instances,
                        help="larger requests get 413 (default: $SERVING_MAX_INSTANCES or 1000)")
    parser.add_argument("--max-body-bytes", type=positive_int, default=settings.max_body_bytes,
                        help="larger request bodies get 413 before they are read (default: $SERVING_MAX_BODY_BYTES "
                             "or 1 MiB)")
    parser.add_argument("--reload-seconds", type=non_negative_float, default=float(settings.reload_seconds),
                        help="how often to look for a new model and refresh the accuracy gauges; 0: never "
                             "(default: $SERVING_RELOAD_SECONDS or 30)")
    parser.add_argument("--lookup-timeout", type=positive_float, default=LOOKUP_TIMEOUT_SECONDS,
                        help="seconds a feature lookup may take before the answer is 503 (default: %(default)s)")
    parser.add_argument("--request-logs", action="store_true",
                        help="log every request (access log, kserve timings); off by default: it costs about a "
                             "millisecond per request, and /metrics has the same latencies as histograms")
    parser.set_defaults(model_name=MODEL_NAME)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    settings = load_settings()
    args = parse_args(settings, argv)
    set_library_defaults(SERVER_LIBRARY_DEFAULTS)
    # kserve's routes use ORJSONResponse, which FastAPI deprecates once per route at start-up: noise, not news.
    warnings.filterwarnings("ignore", message="ORJSONResponse is deprecated", category=FastAPIDeprecationWarning)
    # Requests are a few rows each: one intra-op thread avoids pool hand-offs and leaves a core to the loop.
    torch.set_num_threads(1)
    # kserve configures logging when the server object is made: make it first, so loading is logged.
    server = HostModelServer(args.host, args.http_port, event_loop=args.event_loop,
                             timeout_keep_alive=args.timeout_keep_alive, access_log_format=args.access_log_format,
                             enable_latency_logging=args.request_logs and args.enable_latency_logging)
    if not args.request_logs:
        quiet_request_logs()
    source = ModelSource(model_dir=args.model_dir, model_uri=args.model_uri, tracking_uri=settings.tracking_uri)
    model = SalesModel(args.model_name, settings, source, max_instances=args.max_instances,
                       lookup_timeout=args.lookup_timeout)
    model.load()
    install_error_handlers(model_server.app)
    install_body_limit(model_server.app, args.max_body_bytes)
    BackgroundRefresh(model, args.reload_seconds).start()
    server.start([model])


if __name__ == "__main__":
    run_cli(main)
