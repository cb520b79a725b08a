"""The names the code, the feature repo and the Kubernetes manifests must agree on: their one home.

Manifests are YAML and cannot import this module; ``tests/test_manifests.py`` checks that the rendered
manifests use exactly these values, so a rename here that the manifests do not follow fails the tests.
"""

from __future__ import annotations

# ---------------------------------------------------------------- Feast
FEAST_PROJECT = "sales_forecast"
FEATURE_VIEW = "sales_features"
FEATURE_SERVICE = "sales_forecast_v1"
ENTITY_KEYS = ("store", "dept")  # the two Feast entities, each a single INT64 join key
RAW_TABLE = "weekly_sales"  # the raw history (labels, seasonal-naive baseline)
FEATURE_TABLE = "sales_features"  # the feature view's source
RAW_INDEX = ("store", "dept", "date")  # each loaded table's (keys, timestamp) index
FEATURE_INDEX = ("store", "dept", "event_timestamp")
DATASET_TABLE = "sales_dataset"  # the generator's seed and shape of the loaded history (read by appends)
LOADS_TABLE = "offline_loads"  # what each bulk-loaded table holds (features/load.py: a re-run keeps unchanged ones)
FORECASTS_TABLE = "sales_forecasts"  # batch forecasts: every series' next week, with model version and as-of week
ACCURACY_TABLE = "forecast_accuracy"  # realized accuracy of each week's forecasts, scored when its actuals arrive
DRIFT_TABLE = "feature_drift"  # PSI of each week's features against the champion's training window
OFFLINE_STORE_TYPE = "sales_forecast.ray_offline_store.RayPostgreSQLOfflineStore"

# ---------------------------------------------------------------- MLflow and the served model
REGISTERED_MODEL = "sales-forecast"
CHAMPION_ALIAS = "champion"
CHAMPION_URI = f"models:/{REGISTERED_MODEL}@{CHAMPION_ALIAS}"
NETWORK_ARTIFACT = "model"  # mlflow.pytorch.log_model(name=...)
FORECASTER_ARTIFACT = "forecaster"  # the Forecaster bundle the server loads
MODEL_NAME = "sales-model"  # the KServe model name and the InferenceService's

# ---------------------------------------------------------------- the cluster
NAMESPACE = "mlops"
PROJECT_IMAGE = "sales-forecast:0.1.0"
IMAGE_UID, IMAGE_GID = 1000, 100  # the project image's user `ray` (Dockerfile)
PART_OF_LABEL = {"app.kubernetes.io/part-of": "sales-forecast"}
POSTGRES_CLIENT_LABEL = "sales-forecast/postgres-client"  # the PostgreSQL NetworkPolicy admits pods with it
MLFLOW_CLIENT_LABEL = "sales-forecast/mlflow-client"  # the MLflow NetworkPolicy admits pods with it
RAY_CLIENT_LABEL = "sales-forecast/ray-client"  # the Ray job-submission NetworkPolicy admits pods with it
MLFLOW_CREDENTIALS_SECRET = "mlflow-credentials"  # basic-auth overlay: what MLflow clients authenticate with
MLFLOW_CREDENTIAL_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
PIPELINE_CONFIG = "pipeline-config"  # ConfigMap: the non-secret settings, as environment variables
POSTGRES_SECRET = "postgres-credentials"
POSTGRES_SECRET_KEYS = ("POSTGRES_USER", "POSTGRES_PASSWORD")
MLFLOW_DB_SECRET = "mlflow-db-credentials"  # MLflow's own PostgreSQL role: the MLflow server only
MLFLOW_DB_SECRET_KEYS = ("MLFLOW_DB_USER", "MLFLOW_DB_PASSWORD")
POSTGRES_SUPERUSER_SECRET = "postgres-superuser"  # PostgreSQL's superuser: the PostgreSQL server only
WEEKLY_CYCLE = "weekly-cycle"  # the CronJob running `04_weekly_cycle.py --catch-up`, and its ServiceAccount
FEATURE_REPO_CONFIGMAP = "feature-repo"
FEATURE_REPO_FILES = ("feature_store.yaml", "features.py")
APP_DIR = "/app"  # where the image holds the project
FEATURE_REPO_MOUNT = f"{APP_DIR}/feature_repo"
SHARED_PVC, SHARED_VOLUME, SHARED_MOUNT = "mlops-shared", "shared", "/mnt/shared"
CLUSTER_MODEL_DIR = f"{SHARED_MOUNT}/models"
TRAINING_RUNTIME = "torch-distributed"  # Kubeflow Trainer's ClusterTrainingRuntime
TRAINER_NODE = "node"  # that runtime's replicated job and its trainer container
SERVING_PORT = 8080
POSTGRES_SERVICE, POSTGRES_PORT = "postgres", 5432
MLFLOW_SERVICE, MLFLOW_PORT = "mlflow", 5000
RAY_CLUSTER = "feast-ray"
RAY_WORKER_REPLICAS = 2
RAY_HEAD_SERVICE = f"{RAY_CLUSTER}-head-svc"
RAY_DASHBOARD_PORT = 8265

# The settings every pipeline pod gets from ConfigMap pipeline-config (keys are config.py's variables).
CLUSTER_CONFIG = {
    "POSTGRES_HOST": POSTGRES_SERVICE,
    "POSTGRES_PORT": str(POSTGRES_PORT),
    "POSTGRES_DB": "feast",
    "MLFLOW_TRACKING_URI": f"http://{MLFLOW_SERVICE}:{MLFLOW_PORT}",
    "MODEL_DIR": CLUSTER_MODEL_DIR,
    "FEAST_REPO_PATH": FEATURE_REPO_MOUNT,
    "RAY_JOBS_ADDRESS": f"http://{RAY_HEAD_SERVICE}:{RAY_DASHBOARD_PORT}",
}
IN_POD_CONFIG_KEYS = tuple(key for key in CLUSTER_CONFIG if key != "RAY_JOBS_ADDRESS")  # only step 1 submits
