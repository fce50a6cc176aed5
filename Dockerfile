# syntax=docker/dockerfile:1
# One image for every QuantPlan container: the API with its job runners, the Ray head and the Ray workers.
# A Ray cluster needs the same Ray and Python on every node, and the workers unpickle QuantPlan's own functions,
# so all of them run this image. Build: `docker build -t quantplan .`; cluster: docker-compose.yml, docs/DEPLOY.md.
FROM python:3.11-slim

# torch comes first, from the CPU wheel index, so that installing the project finds `torch>=2.4,<2.14` already met
# and never pulls a CUDA build (gigabytes that a CPU cluster does not use). Same pin as the Makefile.
# CUDA nodes: `docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t quantplan:cuda .`
# (the CUDA wheels bring their CUDA libraries and Triton; the host needs the NVIDIA driver and container toolkit).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

# The dependencies, read from pyproject.toml alone: this layer is rebuilt when they change, not on every code edit.
WORKDIR /src
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# The project itself (a regular, not editable, install; the migrations ship inside quantplan.storage).
COPY README.md ./
COPY quantplan ./quantplan
RUN pip install --no-deps /src && rm -rf /src

# A non-root user. The data directories exist in the image with its ownership, so named volumes mounted on them
# start out writable by it.
RUN useradd --create-home --uid 1000 quantplan \
 && mkdir -p /data/artifacts /data/cache /data/hf /models \
 && chown -R quantplan:quantplan /data /models

# Defaults for a single container (`docker run -v quantplan-data:/data ...`): SQLite and artifacts on /data.
# docker-compose.yml overrides the database with PostgreSQL and names the Ray head.
ENV QUANTPLAN_DATABASE_URL=sqlite:////data/quantplan.db \
    QUANTPLAN_ARTIFACTS=/data/artifacts \
    QUANTPLAN_CACHE_DIR=/data/cache \
    HF_HOME=/data/hf

USER quantplan
WORKDIR /home/quantplan
EXPOSE 8000

# Meaningful for the API only; docker-compose.yml gives the Ray containers their own checks.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=5)"]

CMD ["quantplan", "serve", "--host", "0.0.0.0", "--port", "8000"]
