"""Training parameters: a typed object, and its one encoding for the Kubeflow boundary.

Kubeflow's SDK writes ``train_sales_model(**func_args)`` (the dict's repr) into an unquoted bash heredoc: ``$(...)``,
backticks, ``$VAR`` and backslashes in a value would be run or changed by the shell in the pod. So the parameters
cross that boundary as one base64 string of their JSON (letters, digits, ``-``, ``_``, ``=``: nothing a shell
reads), and every value reaches the training exactly as given.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from sales_forecast.contract import REGISTERED_MODEL
from sales_forecast.errors import ConfigError, PipelineError

ENCODED = "encoded"  # the one key of the func_args dict Kubeflow ships
MAX_NAME_LENGTH = {"registered_model": 256, "run_name": 250, "experiment": 500}  # MLflow's database columns


def check_mlflow_name(field_name: str, value: str | None) -> str | None:
    """MLflow's rules for the names the run uses, checked before anything is submitted (ConfigError)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{field_name} must be a non-empty string")
    limit = MAX_NAME_LENGTH[field_name]
    if len(value) > limit:
        raise ConfigError(f"{field_name} is {len(value)} characters; MLflow stores at most {limit}")
    if "\x00" in value:
        raise ConfigError(f"{field_name} must not contain a NUL character")
    if field_name == "registered_model":
        from mlflow.exceptions import MlflowException
        from mlflow.utils.validation import _validate_model_name

        try:
            _validate_model_name(value)
        except MlflowException as exc:
            raise ConfigError(f"registered_model: {exc.message}") from None
        if "@" in value:  # models:/<name>@<alias> could not name it
            raise ConfigError(f"registered_model {value!r} must not contain '@' (models:/<name>@<alias> URIs)")
    return value


@dataclass(frozen=True)
class TrainingParams:
    epochs: int = 8  # the one-cycle schedule spans them all
    patience: int = 4  # epochs without a better validation score before stopping
    learning_rate: float = 2e-3  # the schedule's peak
    batch_size: int = 2048  # global: each of N distributed processes takes batch_size // N
    hidden: tuple[int, ...] = (64, 32)
    dropout: float = 0.1
    weight_decay: float = 1e-3
    # Embedding sizes of the store and department ids. 0 by default: measured, they cost accuracy at every shape
    # (20x10x52: skill 0.077-0.084 without, 0.049-0.055 with 4/8), the series level and the department x event
    # uplift table carry the identity that helps.
    store_dim: int = 0
    dept_dim: int = 0
    id_dropout: float = 0.05  # share of training rows whose ids are replaced by 'unknown'
    rows_per_epoch: int = 0  # rows drawn per epoch; 0: the training rows clipped to [200K, 600K]
    time_budget: float = 40.0  # CPU seconds of training; no new epoch starts after them
    test_weeks: int = 8
    validation_weeks: int = 4
    backtest: int = 0  # K > 0: also K rolling origins, each a model trained only on the weeks before its cutoff
    backtest_weeks: int = 4  # holdout weeks of a backtest origin (origins are this many weeks apart)
    statsforecast: bool = True  # the statsforecast baselines (SES; MSTL + AutoETS with two years of history)
    # Start from the champion in MODEL_DIR (its preprocessing and weights) when it has these features and this
    # architecture, else from scratch: the weekly cycle's challengers fine-tune last week's champion.
    warm_start: bool = False
    warm_epochs: int = 3  # the schedule's epochs when continuing a champion (one more week of data)
    seed: int = 42
    # CPU threads per process. This small MLP gains nothing from more, and on busy cores OpenMP threads that wait
    # for each other cost 10x (2.5 s vs 26 s for 3 epochs at the default shape on a loaded 2-core machine).
    threads: int = 1
    registered_model: str = REGISTERED_MODEL
    experiment: str | None = None  # None: Settings.mlflow_experiment
    run_name: str | None = None
    trainjob: str | None = None  # the submitting TrainJob's name, kept as a run tag
    plot_series: int = 4
    tags: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> TrainingParams:
        """From plain values, or from the Kubeflow encoding ``{ENCODED: "<base64 of JSON>"}``."""
        values = dict(values or {})
        if ENCODED in values:
            values = {**_decode(values.pop(ENCODED)), **values}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise PipelineError(f"unknown training parameter(s) {unknown}; known: {sorted(known)}")
        if "hidden" in values:
            values["hidden"] = tuple(int(size) for size in values["hidden"])
        params = cls(**values)
        params.check()
        return params

    def check(self) -> None:
        problems = []
        if self.epochs < 0 or self.warm_epochs < 0:
            problems.append("epochs and warm_epochs must be >= 0")
        if self.patience < 1:
            problems.append("patience must be >= 1")
        if not self.learning_rate > 0:
            problems.append("learning_rate must be > 0")
        if self.batch_size < 1:
            problems.append("batch_size must be >= 1")
        if self.test_weeks < 1 or self.validation_weeks < 1:
            problems.append("test_weeks and validation_weeks must be >= 1")
        if not 0 <= self.dropout < 1 or not 0 <= self.id_dropout < 1:
            problems.append("dropout and id_dropout must be in [0, 1)")
        if self.store_dim < 0 or self.dept_dim < 0 or self.rows_per_epoch < 0:
            problems.append("store_dim, dept_dim and rows_per_epoch must be >= 0")
        if not self.time_budget > 0:
            problems.append("time_budget must be > 0")
        if self.backtest < 0 or self.backtest_weeks < 1:
            problems.append("backtest must be >= 0 and backtest_weeks >= 1")
        if self.threads < 1:
            problems.append("threads must be >= 1")
        if not self.hidden or min(self.hidden) < 1:
            problems.append("hidden needs at least one layer of size >= 1")
        if problems:
            raise PipelineError("invalid training parameters: " + "; ".join(problems))
        for name in MAX_NAME_LENGTH:
            check_mlflow_name(name, getattr(self, name))

    def changed(self) -> dict[str, Any]:
        """Only the values that differ from the defaults."""
        defaults = TrainingParams()
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(defaults, f.name)}

    def as_func_args(self) -> dict[str, str]:
        """The func_args Kubeflow ships: one shell-inert base64 string (see the module's docstring)."""
        text = json.dumps(self.changed(), ensure_ascii=False, sort_keys=True)
        return {ENCODED: base64.urlsafe_b64encode(text.encode()).decode("ascii")}

    def loggable(self) -> dict[str, str]:
        skip = {"tags", "run_name", "trainjob"}
        return {f.name: str(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name not in skip}


def _decode(encoded: Any) -> dict[str, Any]:
    try:
        values = json.loads(base64.urlsafe_b64decode(str(encoded).encode("ascii")).decode())
    except (ValueError, binascii.Error, UnicodeError) as exc:
        raise PipelineError(f"the encoded training parameters are not base64 JSON: {exc}") from None
    if not isinstance(values, dict):
        raise PipelineError("the encoded training parameters are not a JSON object")
    return values
