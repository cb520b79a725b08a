"""Run ``train_sales_model`` through TrainerClient's LocalProcess backend: the same submission call as on
Kubernetes, executed on this machine with torchrun in a throw-away venv.

How its quirks (kubeflow 0.5.0) are handled:

- The venv is fresh and made by the first ``python`` on PATH: this interpreter's folder is put first on PATH while
  the job is created, and PYTHONPATH gives the job this environment's site-packages plus the repository, so
  nothing heavy is installed.
- It pip-installs only when packages_to_install is non-empty (and then always ``torch``); without it, the venv
  has no ``torchrun`` and the job exits 127. ``torch`` is already satisfied through PYTHONPATH, so what must be
  installed is just the ``torchrun`` console script: a code-free wheel, written here, that declares
  ``torchrun = torch.distributed.run:main`` (torch's own entry point). With PIP_NO_INDEX the install is offline
  and takes about a second. (``torch==2.13.0`` alone is "already satisfied" too and leaves no torchrun; forcing
  its reinstall copies 0.8 GB into every job venv, 11 s here.)
- Through PYTHONPATH ensurepip finds pip "already satisfied" and leaves the venv without a ``pip`` command, so the
  script's bare ``pip`` would be another environment's pip, installing there. The job's PATH therefore starts
  with a folder whose ``pip`` runs ``$VIRTUAL_ENV/bin/python -m pip``, which installs into the job's venv.
- The parent environment is not inherited: ``env=`` carries every variable the job needs.
- func_args arrive as one positional dict (train_sales_model accepts both forms).
- wait_for_job_status never raises on Failed, so Complete and Failed are both awaited (jobs.follow_job).
- The job chdirs this whole process while it runs: only absolute paths are used meanwhile.
- A failed job leaves its venv in the temp folder: it is removed here.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import shutil
import site
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

from sales_forecast.config import REPO_ROOT, Settings, process_environment
from sales_forecast.contract import TRAINING_RUNTIME
from sales_forecast.errors import PipelineError
from sales_forecast.timing import console
from sales_forecast.training.params import TrainingParams
from sales_forecast.training.pipeline import train_sales_model
from sales_forecast.training.trainjob import follow_job

SHIM_NAME, SHIM_VERSION = "sales_forecast_torchrun", "0.1.0"


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def torchrun_wheel(folder: Path) -> Path:
    """A wheel with no code whose only content is the ``torchrun`` console script."""
    dist_info = f"{SHIM_NAME}-{SHIM_VERSION}.dist-info"
    files = {
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {SHIM_NAME}\nVersion: {SHIM_VERSION}\n"
                                 "Summary: the torchrun command for a venv that sees torch through PYTHONPATH\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: sales_forecast\nRoot-Is-Purelib: true\n"
                              "Tag: py3-none-any\n",
        f"{dist_info}/entry_points.txt": "[console_scripts]\ntorchrun = torch.distributed.run:main\n",
    }
    record = "".join(f"{name},{_record_hash(text.encode())},{len(text.encode())}\n" for name, text in files.items())
    files[f"{dist_info}/RECORD"] = record + f"{dist_info}/RECORD,,\n"
    wheel = folder / f"{SHIM_NAME}-{SHIM_VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return wheel


PIP_WRAPPER = '#!/bin/sh\nexec "${VIRTUAL_ENV:?pip outside the job venv}/bin/python" -m pip "$@"\n'


def pip_wrapper(folder: Path) -> Path:
    """A ``pip`` command that installs into the activated venv whichever pip module it imports."""
    folder.mkdir(parents=True, exist_ok=True)
    wrapper = folder / "pip"
    wrapper.write_text(PIP_WRAPPER)
    wrapper.chmod(0o755)
    return folder


def job_env(settings: Settings, tools: Path) -> dict[str, str]:
    """Everything the job reads, explicitly: the LocalProcess child gets this and nothing else."""
    return {
        **process_environment(),
        **settings.environment(),
        "PATH": os.pathsep.join([str(tools), "/usr/local/bin", "/usr/bin", "/bin"]),
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), *site.getsitepackages()]),
        "PYTHONUNBUFFERED": "1",
        "PIP_NO_INDEX": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }


@contextlib.contextmanager
def _this_python_first() -> Iterator[None]:
    """The backend makes its venv with shutil.which('python'), evaluated in this process."""
    saved = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), saved])
    try:
        yield
    finally:
        os.environ["PATH"] = saved


def _remove_leftover_venvs(name: str) -> None:
    for folder in Path(tempfile.gettempdir()).glob(f"{name}*"):
        if (folder / "pyvenv.cfg").exists():
            shutil.rmtree(folder, ignore_errors=True)


def run_local_process(params: TrainingParams, settings: Settings, timeout_s: int) -> str:
    """Submit with LocalProcessBackendConfig, stream the log until Complete or Failed; returns the job name.

    ``settings`` must be resolved (stack.ensure_services): the job gets exactly them."""
    from kubeflow.trainer import CustomTrainer, LocalProcessBackendConfig, TrainerClient
    from kubeflow.trainer.options import Name

    if not params.trainjob:
        raise ValueError("params.trainjob must name the job")
    params.check()
    client = TrainerClient(LocalProcessBackendConfig(cleanup_venv=True))
    with tempfile.TemporaryDirectory(prefix="sales-torchrun-") as folder:
        wheel = torchrun_wheel(Path(folder))
        tools = pip_wrapper(Path(folder) / "bin")
        trainer = CustomTrainer(func=train_sales_model, func_args=params.as_func_args(),
                                packages_to_install=[f"{SHIM_NAME} @ {wheel.as_uri()}"],
                                env=job_env(settings, tools))
        with _this_python_first():
            name = client.train(runtime=TRAINING_RUNTIME, trainer=trainer, options=[Name(params.trainjob)])
        console.print(f"started LocalProcess TrainJob {name} (torchrun in a fresh venv)")
        try:
            follow_job(client, name, timeout_s, polling_s=1)
        except PipelineError:
            with contextlib.suppress(ValueError):
                client.delete_job(name)  # stops a job that timed out
            _remove_leftover_venvs(name)
            raise
    return name
