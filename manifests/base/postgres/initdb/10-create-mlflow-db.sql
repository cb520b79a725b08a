-- Runs once, when the data directory is empty. POSTGRES_DB (feast) is created by the image.
CREATE DATABASE mlflow;
