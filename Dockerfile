# fastadapt: the same `fastadapt` command the tests run, as a small non-root image.
#
#   docker build -t fastadapt .                                              # CPU (torch 2.13.0+cpu)
#   docker build --build-arg TORCH_VARIANT=cu128 -t fastadapt:cuda .         # CUDA 12.8 (torch 2.13.0+cu128)
#   docker run -p 127.0.0.1:8000:8000 -v fastadapt-data:/data fastadapt     # SQLite in the named volume
#
# Two stages: `build` installs torch, the dependencies and the project into a virtual
# environment at /opt/fastadapt; the final stage copies only that environment (no compilers,
# no pip cache, no source tree), so the shipped meta-models are in the image once, as the
# `models` package's data (FASTADAPT_MODELS_DIR's default). docs/deployment.md.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/fastadapt/bin:$PATH
RUN python -m venv /opt/fastadapt

# torch first, from PyTorch's wheel index for TORCH_VARIANT (cpu, cu126, cu128, ...): the
# largest layer and the one that changes least. TORCH may also be a direct wheel URL.
ARG TORCH_VARIANT=cpu
ARG TORCH=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/${TORCH_VARIANT}
RUN pip install --index-url "$TORCH_INDEX" "$TORCH"
# Not needed to serve or train (about 190 MB): torch's C++ tests, test binaries and headers
# (no compiler is in the image to build extensions with).
RUN cd /opt/fastadapt/lib/python3*/site-packages/torch \
    && rm -rf test include bin/*Test bin/test_* bin/protoc*

# The other dependencies, from pyproject.toml alone: a change to the sources or the README
# does not reinstall them.
WORKDIR /src
COPY pyproject.toml ./
RUN python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"], sep="\n")' \
        > requirements.txt \
    && pip install -r requirements.txt

COPY README.md ./
COPY models ./models
COPY service ./service
COPY migrations ./migrations
RUN pip install --no-deps .


FROM ${PYTHON_IMAGE}

# FASTADAPT_HOST: every interface of the container (so `serve --port N` alone works);
# FASTADAPT_AUTH=required: API keys on every request, loopback included (docs/keys-and-tenants.md).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/fastadapt/bin:$PATH \
    FASTADAPT_DATA_DIR=/data \
    FASTADAPT_HOST=0.0.0.0 \
    FASTADAPT_PORT=8000 \
    FASTADAPT_AUTH=required

RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin fastadapt \
    && install -d -o fastadapt -g fastadapt /data
COPY --from=build /opt/fastadapt /opt/fastadapt
COPY deploy/api/entrypoint /usr/local/bin/fastadapt-entrypoint
COPY deploy/api/healthcheck /usr/local/bin/fastadapt-healthcheck

USER fastadapt
WORKDIR /data
EXPOSE 8000

# GET /readyz on the port `serve` really binds: its --port, else FASTADAPT_PORT (the
# entrypoint writes it down when serve starts).
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["fastadapt-healthcheck"]

ENTRYPOINT ["fastadapt-entrypoint"]
CMD ["serve"]
