# The project's image for Ray clusters (deploy/cluster.yaml, deploy/rayjob.yaml): code and pinned
# dependencies only; data are read or downloaded on the cluster, never baked in.
#
#   docker build -t ghcr.io/rarn-project/rarn:0.1.0 .
#   docker run --rm ghcr.io/rarn-project/rarn:0.1.0 python pipeline/run.py --smoke
FROM python:3.11-slim

# rsync/ssh: the Ray cluster launcher syncs files and runs commands inside the container.
RUN apt-get update \
    && apt-get install -y --no-install-recommends rsync openssh-client git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY rarn ./rarn
COPY pipeline ./pipeline
RUN pip install --no-cache-dir .          # versions pinned in pyproject.toml (torch, ray, mlflow)
COPY configs ./configs

ENV RAY_USAGE_STATS_ENABLED=0 \
    MLFLOW_DISABLE_TELEMETRY=true \
    PYTHONUNBUFFERED=1
ARG RARN_CODE_VERSION=unknown
ENV RARN_CODE_VERSION=${RARN_CODE_VERSION}
CMD ["python", "pipeline/run.py", "--help"]
