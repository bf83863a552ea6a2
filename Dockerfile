# One image for both roles: the compose file runs it as the API (gunicorn) or as a
# Celery worker. The worker extra (torch, lshashpy3) is installed in both so one
# build serves every service; the API never imports torch at runtime.
#
# CPU image (default):
#   docker build -t imgsim .
# GPU image (CUDA torch wheels; run with an NVIDIA runtime):
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 -t imgsim-gpu .
# An empty TORCH_INDEX_URL installs torch from PyPI only (CUDA-enabled on linux/x86_64).
FROM python:3.11-slim

# torch is installed first from this index alone (pyproject's range, the newest build the
# index has): with the index only added to PyPI, pip would take the newest version of either,
# e.g. PyPI's latest CUDA build instead of a cu124 one the host driver supports.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

COPY pyproject.toml README.md gunicorn.conf.py ./
COPY api/ api/
COPY workers/ workers/
COPY shared/ shared/
COPY client/ client/

RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        torch_spec=$(python -c 'import tomllib; extra = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["worker"]; print(next(r for r in extra if r.startswith("torch")))') \
        && pip install --index-url "$TORCH_INDEX_URL" "$torch_spec"; \
    fi \
    && pip install ".[worker]"

# Non-root user. /artifacts and /data are created here, owned by that user, so a named
# volume mounted there starts out writable by it (Docker copies the ownership on first use).
RUN useradd --create-home --uid 10001 --user-group imgsim \
    && mkdir -p /artifacts /data \
    && chown imgsim:imgsim /artifacts /data

ENV IMGSIM_DATA_ROOT=/data \
    IMGSIM_ARTIFACTS_DIR=/artifacts

USER imgsim

EXPOSE 8000

CMD ["gunicorn", "--bind", "0.0.0.0:8000", "api.wsgi:app"]
