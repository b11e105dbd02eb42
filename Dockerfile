# The project's image for Ray clusters (deploy/cluster.yaml, deploy/rayjob.yaml): code and pinned
# dependencies on Ray's own image; data are read or downloaded on the cluster, never baked in.
#
#   docker build -t ghcr.io/rarn-project/rarn:0.1.0 .                       # CPU
#   docker build --build-arg BASE=rayproject/ray:2.60.0-py311-gpu \
#       -t ghcr.io/rarn-project/rarn:0.1.0-gpu .                            # CUDA (GPU nodes)
#   docker run --rm ghcr.io/rarn-project/rarn:0.1.0 python pipeline/run.py --help
#
# Layers: the dependencies are installed from pyproject.toml alone, so a code change rebuilds
# only the last (small) layers. The image runs as Ray's non-root user `ray` (uid 1000).
# Checked by tests/test_pipeline_deploy.py (base tag = the pinned Ray, layer order, user).
ARG BASE=rayproject/ray:2.60.0-py311
FROM ${BASE}

# rsync/ssh: the Ray cluster launcher syncs files and runs commands inside the container.
USER root
RUN apt-get update \
    && apt-get install -y --no-install-recommends rsync openssh-client \
    && rm -rf /var/lib/apt/lists/*
USER ray
WORKDIR /home/ray/rarn

# 1. Dependencies only (pinned in pyproject.toml): cached until pyproject.toml changes.
COPY --chown=1000:100 pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# 2. The code: no dependency is reinstalled when it changes.
COPY --chown=1000:100 README.md ./
COPY --chown=1000:100 rarn ./rarn
COPY --chown=1000:100 pipeline ./pipeline
COPY --chown=1000:100 configs ./configs
RUN pip install --no-cache-dir --no-deps .

ENV RAY_USAGE_STATS_ENABLED=0 \
    MLFLOW_DISABLE_TELEMETRY=true \
    PYTHONUNBUFFERED=1
ARG RARN_CODE_VERSION=unknown
ENV RARN_CODE_VERSION=${RARN_CODE_VERSION}
USER ray
CMD ["python", "pipeline/run.py", "--help"]
