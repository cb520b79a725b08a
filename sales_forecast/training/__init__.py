"""Step 2: a point-in-time-correct training set from Feast, a PyTorch model that beats naive forecasts,
MLflow tracking and registration, and the Kubeflow TrainJob / LocalProcess submission of the same function.

``train.train_sales_model`` is the one entry point every backend runs; ``pipeline.run_training`` does the work.
"""
