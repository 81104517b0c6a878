# One-shot trainer: prepares a dataset, trains a model and exports a bundle into a shared volume
# (`mmrec pipeline ... --bundle-out /bundles/current`), then exits. CPU torch 2.13.0 + the `train` extra.
#   docker build -f docker/trainer.Dockerfile -t mmrec-trainer .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*

# The CPU build of torch first, from PyTorch's CPU index: the `train` extra's looser pin would pull a CUDA build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /app
COPY pyproject.toml README.md ./
COPY bundle_format ./bundle_format
COPY models ./models
COPY training ./training
RUN pip install ".[train]"

# Not root, like the service images (same uid, so the api reads what the trainer writes). The volume mount points
# exist and belong to it before VOLUME: a fresh named volume takes their ownership, so it can write there.
RUN useradd --system --uid 10001 --home-dir /var/lib/mmrec --create-home mmrec \
    && mkdir -p /bundles \
    && chown mmrec:mmrec /bundles /var/lib/mmrec
USER mmrec

ENV MMREC_DATA_ROOT=/data \
    MMREC_HOME=/var/lib/mmrec
VOLUME ["/bundles", "/var/lib/mmrec"]
ENTRYPOINT ["mmrec"]
CMD ["pipeline", "--dataset", "ml100k", "--model", "lightgcn", "--bundle-out", "/bundles/current"]
