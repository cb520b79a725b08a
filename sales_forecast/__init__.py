"""Weekly sales forecasting pipeline: Feast on PostgreSQL, Ray, PyTorch, MLflow, Kubeflow Trainer, KServe."""

from sales_forecast import feast_import

feast_import.install()

__version__ = "0.1.0"
