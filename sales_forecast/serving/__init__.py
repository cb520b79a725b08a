"""Step 3: the KServe model server (Feast online features -> Forecaster), its clients and its deployment.

- ``instances``: request validation (v1 and v2 bodies -> (store, dept) instances, or 400/413).
- ``online_features``: the Feast lookup, its completeness/ttl checks (404) and database fault handling (503).
- ``model_source``: the Forecaster from the MLflow alias ``champion`` or a bundle folder.
- ``model``: ``SalesModel``, the ``kserve.Model``; ``server``: ``python -m sales_forecast.serving.server``.
- ``errors`` and ``metrics``: HTTP answers and the server's Prometheus metrics.
- ``latency``, ``benchmark``, ``quick_model``: client-side timing and the benchmark with its stand-in model.
- ``kubernetes``: the InferenceService and KServeClient calls of ``03_inference.py --backend kubernetes``.

Only ``model``, ``server`` and ``kubernetes`` import kserve, which parses ``sys.argv`` when first imported
(see ``kserve_import``).
"""
