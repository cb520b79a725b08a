# One image for the step-1 Job, the Ray cluster (feast-ray), the TrainJob and the
# KServe predictor: Ray 2.58.0 on Python 3.11 (CPU), the pinned requirements with
# CPU-only torch, and the project under /app. Runs as the base image's user `ray` (uid 1000).
#   docker build -t sales-forecast:0.1.0 .
# The Ray version must equal `ray[default]==` in requirements.txt and RayCluster
# spec.rayVersion; the Python tag must equal the drivers' Python (tests/test_manifests.py).
FROM rayproject/ray:2.58.0-py311-cpu

USER root
RUN mkdir -p /app /mnt/shared && chown 1000:100 /app /mnt/shared
USER 1000
WORKDIR /app

# Dependencies first, so code edits do not invalidate this layer: the same pins as the
# tests (requirements.txt, transitive ones in constraints.txt). The extra index provides
# torch==2.13.0+cpu, which pip prefers over PyPI's CUDA build of 2.13.0.
COPY --chown=1000:100 requirements.txt constraints.txt /app/
RUN pip install --no-cache-dir \
        --extra-index-url https://download.pytorch.org/whl/cpu \
        -r /app/requirements.txt -c /app/constraints.txt

COPY --chown=1000:100 sales_forecast/ /app/sales_forecast/
COPY --chown=1000:100 feature_repo/ /app/feature_repo/
COPY --chown=1000:100 0[0-9]_*.py /app/

ENV PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    FEAST_REPO_PATH=/app/feature_repo

USER 1000
