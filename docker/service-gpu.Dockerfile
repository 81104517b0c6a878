# The recommendation service on an NVIDIA GPU: CUDA 12 + cuDNN 9 runtime, the `serve` and `gpu` extras
# (onnxruntime-gpu with the CUDA execution provider, faiss-gpu-cu12). Still no torch.
#   docker build -f docker/service-gpu.Dockerfile -t mmrec-service-gpu .
#   docker run --gpus all -v bundles:/bundles:ro -p 8000:8000 mmrec-service-gpu
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /app
COPY pyproject.toml README.md ./
COPY bundle_format ./bundle_format
COPY service ./service
# `serve` names the CPU wheels (onnxruntime, faiss-cpu), which ship the same import packages as the GPU ones:
# install both extras, drop the CPU wheels, then reinstall the GPU wheels so none of their files is missing.
RUN pip install ".[serve,gpu]" \
    && pip uninstall -y onnxruntime faiss-cpu \
    && pip install --force-reinstall --no-deps onnxruntime-gpu faiss-gpu-cu12

RUN useradd --system --uid 10001 --home-dir /var/lib/mmrec --create-home mmrec
USER mmrec

ENV MMREC_BUNDLE_DIR=/bundles/current \
    MMREC_STATE_DIR=/var/lib/mmrec/state \
    MMREC_DEVICE=cuda
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
CMD ["mmrec-serve", "--host", "0.0.0.0", "--port", "8000"]
