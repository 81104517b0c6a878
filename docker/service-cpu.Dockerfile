# The recommendation service on CPU: python slim + the `serve` extra only (onnxruntime, faiss-cpu, FastAPI, redis).
# No torch, no training code: the image holds service/ and reads a bundle from a (read-only) volume.
#   docker build -f docker/service-cpu.Dockerfile -t mmrec-service-cpu .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# libgomp1: the OpenMP runtime faiss and onnxruntime link against (not in the slim image).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY bundle_format ./bundle_format
COPY service ./service
RUN pip install ".[serve]"

RUN useradd --system --uid 10001 --home-dir /var/lib/mmrec --create-home mmrec
USER mmrec

ENV MMREC_BUNDLE_DIR=/bundles/current \
    MMREC_STATE_DIR=/var/lib/mmrec/state \
    MMREC_DEVICE=cpu
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
CMD ["mmrec-serve", "--host", "0.0.0.0", "--port", "8000"]
