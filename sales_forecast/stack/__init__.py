"""The embedded local stack: PostgreSQL, MLflow server and model server on loopback."""
