"""Step 3: the KServe model server (Feast online features -> Forecaster), its clients and its deployment.

- ``instances``: request validation (v1 and v2 bodies -> (store, dept) instances and options, or 400/413).
- ``body_limit``: the request-body limit (413 before a body is read).
- ``online_features``: the Feast lookup, its completeness/ttl checks (404), its connection keeper and database
  fault handling (503).
- ``model_source``: the Forecaster from the MLflow alias ``champion`` or a bundle folder, and what it points at now.
- ``model``: ``SalesModel``, the ``kserve.Model`` (v1/v2 answers, quantiles, the served version, the swap).
- ``refresh``: the background thread (hot reload of a new model, accuracy gauges, Feast registry).
- ``accuracy``: realized-accuracy gauges from ``forecast_accuracy``.
- ``server``: ``python -m sales_forecast.serving.server``; ``http_errors`` and ``metrics``: HTTP answers and the
  server's Prometheus metrics; ``client``: what ``03_inference.py`` sends and times.
- ``kubernetes``: the InferenceService and KServeClient calls of ``03_inference.py --backend kubernetes``.

``model``, ``refresh``, ``server`` and ``kubernetes`` import kserve, which parses ``sys.argv`` when first imported
(see ``kserve_import``).
"""
