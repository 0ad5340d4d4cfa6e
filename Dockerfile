# syntax=docker/dockerfile:1
#
# etagproxy container image.
#
#   docker build -t etagproxy .
#   docker run --rm -p 8080:8080 -e ETAGPROXY_UPSTREAM=http://api:8000 etagproxy
#
# Stage 1 builds wheels for etagproxy and every dependency (with a compiler
# at hand, should one lack a wheel); stage 2 installs them offline into a
# clean slim image that runs as an unprivileged user. Deployment notes:
# docs/DEPLOYING.md.
#
# PYTHON_IMAGE picks the base of both stages: any image with `python` and
# `pip` on PATH, pip free to install, groupadd/useradd and a reachable
# package index, e.g. the local Debian base tests/test_image.py builds:
#   podman build --build-arg PYTHON_IMAGE=localhost/debian-python:bookworm .

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY etagproxy ./etagproxy
# uvloop is a default dependency; the proxy uses it when it is installed.
RUN pip wheel --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# A fixed numeric id, so Kubernetes' runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 etagproxy \
    && useradd --system --uid 10001 --gid etagproxy --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin etagproxy
# The wheels are bind-mounted from the build stage, so none of them stays
# in a layer of this image.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels /wheels/*.whl
COPY deploy/etagproxy.yaml /etc/etagproxy/config.yaml

USER 10001:10001
# 8080: proxied traffic. 9901: /healthz /readyz /metrics (keep it private).
EXPOSE 8080 9901
STOPSIGNAL SIGTERM
# Liveness only (the process answers); readiness, which also needs the
# store, is for load balancers: /readyz.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9901/healthz', timeout=2)"]

ENTRYPOINT ["etagproxy"]
CMD ["run", "--config", "/etc/etagproxy/config.yaml"]
