"""Compatibility name for tests/test_step2_point_in_time.py, which imports the job from here; the job lives in
store.py. Delete this module once that test imports ``sales_forecast.ray_offline_store.store``."""

from sales_forecast.ray_offline_store.store import RayPostgreSQLRetrievalJob

__all__ = ["RayPostgreSQLRetrievalJob"]
