"""Operating the pipeline week after week: batch forecasts for every series, scoring them when the actuals
arrive, feature drift, the retraining policy, and the weekly cycle that ties them together (04_weekly_cycle.py).
"""
