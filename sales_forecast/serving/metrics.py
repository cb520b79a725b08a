"""The server's own Prometheus metrics, exposed on ``GET /metrics`` next to kserve's ``request_*_seconds``."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

FEATURE_LOOKUP_SECONDS = Histogram(
    "sales_feature_lookup_seconds", "Feast online feature lookup per request (successful or not)",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))
ERROR_RESPONSES = Counter(
    "sales_error_responses_total", "Requests answered with an error by the sales model, by HTTP status",
    ["status"])
FEATURE_STORE_RECONNECTS = Counter(
    "sales_feature_store_reconnects_total",
    "Online store connections retired after a database error or an abandoned (timed-out) lookup")
FEATURE_LOOKUP_TIMEOUTS = Counter(
    "sales_feature_lookup_timeouts_total", "Feature lookups abandoned after the lookup timeout (answered 503)")

# The served model and its hot reload.
SERVED_MODEL = Info("sales_served_model", "The model being served: version and where it came from")
MODEL_LOADED_AT = Gauge("sales_model_loaded_timestamp_seconds", "When the served model was loaded (Unix time)")
MODEL_RELOADS = Counter("sales_model_reloads_total", "New models loaded and swapped in without a restart")
MODEL_RELOAD_FAILURES = Counter(
    "sales_model_reload_failures_total",
    "Failed checks for, or loads of, a new model (the old one keeps serving; the log says why)")

# Realized accuracy of the latest scored week (table forecast_accuracy, scope 'overall'), refreshed in the
# background; absent until the table has a row. (name, help, the accuracy row's attribute)
ACCURACY_METRICS = (
    ("sales_forecast_realized_wmae", "WMAE of the model's forecasts for the latest scored week", "wmae"),
    ("sales_forecast_realized_wape", "WAPE of the model's forecasts for the latest scored week", "wape"),
    ("sales_forecast_naive_wmae", "WMAE of the naive forecast for the latest scored week", "naive_wmae"),
    ("sales_forecast_naive_wape", "WAPE of the naive forecast for the latest scored week", "naive_wape"),
    ("sales_forecast_interval_coverage",
     "Share of actuals inside the forecast interval for the latest scored week (absent without an interval)",
     "coverage"),
    ("sales_forecast_scored_week_timestamp_seconds", "The latest scored week (its date at 00:00 UTC, Unix time)",
     "week_timestamp"),
    ("sales_forecast_scored_rows", "Forecasts scored for the latest scored week", "rows"),
)


class AccuracyCollector(Collector):
    """The realized-accuracy gauges, one label set per model version, from rows replaced all at once: a scrape sees
    one refresh's rows, never the next week's versions beside the last week's or half of a refresh."""

    def __init__(self) -> None:
        self._rows: tuple = ()

    def publish(self, rows: Iterable) -> None:
        self._rows = tuple(rows)

    def describe(self) -> list[GaugeMetricFamily]:
        return [GaugeMetricFamily(name, text, labels=["model_version"]) for name, text, _ in ACCURACY_METRICS]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        rows = self._rows
        for name, text, attribute in ACCURACY_METRICS:
            family = GaugeMetricFamily(name, text, labels=["model_version"])
            for row in rows:
                value = getattr(row, attribute)
                if value is not None:
                    family.add_metric([row.model_version], value)
            yield family


ACCURACY = AccuracyCollector()
REGISTRY.register(ACCURACY)
