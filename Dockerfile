# fastadapt: the same `fastadapt` command the tests run, as a non-root container.
#   docker build -t fastadapt .
#   docker run -p 8000:8000 -v fastadapt-data:/data fastadapt
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, from the CPU wheel index: the largest layer and the one that changes least.
ARG TORCH=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "$TORCH_INDEX" "$TORCH"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY models ./models
COPY service ./service
COPY migrations ./migrations
RUN pip install . && rm -rf build *.egg-info

RUN useradd --create-home --uid 10001 fastadapt \
    && mkdir -p /data \
    && chown fastadapt /data
USER fastadapt

# The artifacts are read from the copied source tree (they are data, not package files).
# API keys everywhere (`docker compose run --rm api keys create --tenant acme`).
ENV FASTADAPT_DATA_DIR=/data \
    FASTADAPT_MODELS_DIR=/app/models/artifacts \
    FASTADAPT_PORT=8000 \
    FASTADAPT_AUTH=required
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ['FASTADAPT_PORT']}/readyz\", timeout=2)"]

ENTRYPOINT ["fastadapt"]
CMD ["serve", "--host", "0.0.0.0"]
