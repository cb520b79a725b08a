"""Step 1: Walmart-like weekly sales -> leakage-free features -> PostgreSQL -> feast apply -> Ray materialization.

- ``generator``: the synthetic sales history; ``derive``: the model's features and what a feature row means.
- ``staging``: the data made and staged in a child process (``child`` starts it); ``load``: bulk load (binary COPY)
  into the offline store; ``store``: Feast apply, materialize, prune, verify online.
- ``pipeline``: the step from end to end; ``ray_job``: the same step submitted as a Ray job (Kubernetes).
"""
