"""The server's background work, off the request path: a daemon thread that every ``period`` seconds
(``SERVING_RELOAD_SECONDS``; 0 turns it off)

1. checks whether the model source points at another model (the MLflow alias at another version, or the model
   directory's ``current`` at another bundle folder) and if so loads it and swaps it in (``SalesModel.swap``);
   a failed check or load keeps the old model, logs why and counts ``sales_model_reload_failures_total``;
2. refreshes the realized-accuracy gauges from ``forecast_accuracy`` (also once at start, even with period 0);
3. re-reads the Feast registry (the serving store's cache never expires by itself).

Requests never wait for any of it: loading runs in this thread, and the swap is one reference assignment.
"""

from __future__ import annotations

import threading

from kserve.logging import logger as log

from sales_forecast.errors import first_line
from sales_forecast.serving import accuracy
from sales_forecast.serving.metrics import MODEL_RELOAD_FAILURES, MODEL_RELOADS
from sales_forecast.serving.model import SalesModel
from sales_forecast.serving.model_source import current_marker, load_forecaster


class BackgroundRefresh:
    def __init__(self, model: SalesModel, period: float):
        self.model = model
        self.period = period
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_accuracy_error = ""

    def start(self) -> None:
        self.refresh_accuracy()
        if self.period > 0:
            self._thread = threading.Thread(target=self._run, name="model-refresh", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.check_model()
            self.refresh_accuracy()
            self.refresh_registry()

    def check_model(self) -> bool:
        """Swap in the source's model if it is another one; True when it did."""
        model = self.model
        old = model.served
        try:
            marker = current_marker(model.source)
            if marker == old.marker:
                return False
            served = model.swap(load_forecaster(model.source))
        except Exception as exc:  # anything: the old model keeps serving
            MODEL_RELOAD_FAILURES.inc()
            log.warning("model %s: still serving version %s; the check for a new model at %s failed: %s",
                        model.name, old.version, model.source.description, first_line(exc))
            return False
        MODEL_RELOADS.inc()
        log.info("model %s: now serving version %s (%s), was version %s", model.name, served.version,
                    served.origin, old.version)
        return True

    def refresh_accuracy(self) -> None:
        try:
            accuracy.refresh(self.model.settings)
            self._last_accuracy_error = ""
        except Exception as exc:  # the gauges keep their last values; say so once per distinct error
            message = first_line(exc)
            if message != self._last_accuracy_error:
                log.warning("realized-accuracy gauges not refreshed: %s", message)
            self._last_accuracy_error = message

    def refresh_registry(self) -> None:
        try:
            self.model.lookup.refresh_registry()
        except Exception as exc:
            log.info("Feast registry not refreshed: %s", first_line(exc))
