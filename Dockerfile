# syntax=docker/dockerfile:1.7
# ollama-guard images. Two targets:
#   proxy    (default, last stage): the guard proxy with CPU torch   -> ghcr.io/ollama-guard/ollama-guard
#   operator : the Kubernetes operator, no torch                     -> ghcr.io/ollama-guard/ollama-guard-operator
#   docker build --target proxy    -t ghcr.io/ollama-guard/ollama-guard:0.1.0 .
#   docker build --target operator -t ghcr.io/ollama-guard/ollama-guard-operator:0.1.0 .
# Both run as uid/gid 10001 and work with a read-only root filesystem (writable /tmp only).
# No secret is baked in: API keys, admin token and Redis password come from the environment or mounts.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid 10001 ollama-guard \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin ollama-guard

# Builder: a venv in /opt/venv that the runtime stages copy; pip and sources stay behind.
FROM base AS builder
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY constraints.txt ./

FROM builder AS build-proxy
# torch first and from the CPU index: from PyPI an unpinned torch pulls a multi-GB CUDA build.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install -c constraints.txt --index-url "${TORCH_INDEX_URL}" torch==2.13.0
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY operator ./operator
RUN pip install -c constraints.txt '.[proxy]' \
 && python -c "import torch; assert not torch.cuda.is_available() and torch.__version__.startswith('2.13.0')"

FROM builder AS build-operator
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY operator ./operator
RUN pip install -c constraints.txt '.[operator]' \
 && ! python -c "import torch" 2>/dev/null

# ---------------------------------------------------------------------------------------------------
FROM base AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.source="https://github.com/ollama-guard/ollama-guard" \
      org.opencontainers.image.url="https://github.com/ollama-guard/ollama-guard" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="ollama-guard" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}"
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp
WORKDIR /tmp

# ---------------------------------------------------------------------------------------------------
FROM runtime AS operator
LABEL org.opencontainers.image.title="ollama-guard-operator" \
      org.opencontainers.image.description="Kubernetes operator for ollama-guard (GuardProxy, ScanNode)"
COPY --from=build-operator /opt/venv /opt/venv
# kopf calls getpass.getuser() unless POD_ID is set; a uid without a passwd entry (OpenShift) has no name.
ENV USER=ollama-guard-operator
USER 10001:10001
EXPOSE 8081
# kopf's liveness endpoint (ollama-guard-operator --liveness, default http://0.0.0.0:8081/healthz).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8081/healthz', timeout=4).status != 200)"]
ENTRYPOINT ["ollama-guard-operator"]

# ---------------------------------------------------------------------------------------------------
FROM runtime AS proxy
LABEL org.opencontainers.image.title="ollama-guard" \
      org.opencontainers.image.description="Guard proxy for Ollama: llm-guard scanning of prompts and answers (CPU torch)"
COPY --from=build-proxy /opt/venv /opt/venv
RUN mkdir -p /models && chown 10001:10001 /models
ENV MODELS_PATH=/models \
    PROXY_HOST=0.0.0.0 \
    PROXY_PORT=8080 \
    LLM_GUARD_DEVICE=cpu
VOLUME ["/models"]
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=4).status != 200)"]
ENTRYPOINT ["ollama-guard"]
CMD ["serve"]
