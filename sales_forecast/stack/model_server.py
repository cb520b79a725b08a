"""The local model server on loopback (``python -m sales_forecast.serving.server``), pid file in the stack folder.

The server reads its settings from the environment; ``start`` passes the given Settings through
``Settings.environment()``, so tests and the benchmark can point it at their own database and MLflow.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sales_forecast.config import Settings
from sales_forecast.contract import MODEL_NAME
from sales_forecast.errors import PipelineError
from sales_forecast.stack import processes

DEFAULT_NAME = "model-server"


def _paths(stack_dir: Path, name: str) -> tuple[Path, Path, Path]:
    root = stack_dir / name
    return root, root / "server.log", root / "server.pid"


def url_of(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def is_ready(url: str) -> bool:
    return processes.http_ok(f"{url}/v1/models/{MODEL_NAME}")


def start(settings: Settings, port: int, *, model_dir: Path | None = None, name: str = DEFAULT_NAME,
          extra_args: list[str] | None = None, extra_env: dict[str, str] | None = None,
          timeout: float = 180.0) -> str:
    """Start a fresh server (stopping the one this pid file tracks: it may serve an older model); returns its URL."""
    root, log, pid_file = _paths(settings.stack_dir, name)
    stop(settings.stack_dir, name)
    url = url_of(port)
    if processes.http_ok(f"{url}/"):
        raise PipelineError(f"port {port} is taken by another server; pick another port")
    root.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    command = [sys.executable, "-m", "sales_forecast.serving.server", "--host", "127.0.0.1",
               "--http_port", str(port), "--model_name", MODEL_NAME, *(extra_args or [])]
    if model_dir is not None:
        command += ["--model-dir", str(model_dir)]
    pid = processes.start_background(command, log, pid_file, env={**settings.environment(), **(extra_env or {})})
    if not processes.wait_until(lambda: is_ready(url), timeout, lambda: processes.running(pid, pid_file)):
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        stop(settings.stack_dir, name)
        raise PipelineError(f"the model server did not become ready on port {port}; log tail:\n{tail}")
    return url


def stop(stack_dir: Path, name: str = DEFAULT_NAME, timeout: float = 15.0) -> bool:
    """Stop the server (SIGTERM, SIGKILL after ``timeout``); True when one was running."""
    return processes.stop(_paths(stack_dir, name)[2], timeout)


def stop_all(stack_dir: Path) -> int:
    """Stop every model server this stack folder tracks (the demo's and any named ones); returns how many ran."""
    return sum(processes.stop(pid_file) for pid_file in sorted(stack_dir.glob("*/server.pid")))


def log_file(stack_dir: Path, name: str = DEFAULT_NAME) -> Path:
    return _paths(stack_dir, name)[1]
