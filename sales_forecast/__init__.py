"""Weekly sales forecasting pipeline: Feast on PostgreSQL, Ray, PyTorch, MLflow, Kubeflow Trainer, KServe."""

__version__ = "0.1.0"
