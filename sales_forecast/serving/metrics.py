"""The server's own Prometheus metrics, exposed on ``GET /metrics`` next to kserve's ``request_*_seconds``."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

FEATURE_LOOKUP_SECONDS = Histogram(
    "sales_feature_lookup_seconds", "Feast online feature lookup per request (successful or not)",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))
ERROR_RESPONSES = Counter(
    "sales_error_responses_total", "Requests answered with an error by the sales model, by HTTP status",
    ["status"])
FEATURE_STORE_RECONNECTS = Counter(
    "sales_feature_store_reconnects_total", "Broken online store connections (or pools) dropped after a database error")
