# The Flower side of a fedsite site or federation: flwr (SuperNode, SuperLink, `flwr run`) and
# the fedsite-flower integration, without torch and without the agent.
#
# flwr pins FastAPI, Starlette, uvicorn and cryptography to ranges that differ from the agent's,
# so it gets an image of its own; the SuperNode reaches the agent's API over the network, never
# its code. Built offline like the agent's image, from a wheelhouse that is the whole build
# context (the integration's own wheel is in it, built from integrations/flower):
#
#   docker/wheelhouse.sh build/flower-wheelhouse flower        # where an index is reachable
#   docker build -f docker/flower.Dockerfile --build-arg BASE_IMAGE=fedsite-base:bookworm \
#     -t fedsite-flower:latest build/flower-wheelhouse
#
# The image runs as uid/gid 10002 (not the agent's 10001: the SuperNode never reads the agent's
# work volume, and the agent never reads the SuperNode's token). No secret is baked in: the
# agent token, the SuperLink's CA certificate and TLS keys are mounted at run time.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS builder
COPY . /wheels/
RUN set -eu; \
    test -n "$(ls /wheels/fedsite_flower-*.whl 2>/dev/null)" \
      || { echo "the build context holds no fedsite_flower wheel: build it with 'docker/wheelhouse.sh DIR flower' and pass DIR as the context" >&2; exit 2; }; \
    export PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1; \
    python3 -m venv /opt/venv; \
    /opt/venv/bin/pip install -q fedsite-flower; \
    /opt/venv/bin/python -c "import importlib.util as u, flwr, fedsite_flower; assert u.find_spec('torch') is None, 'torch must not be in the Flower image'; assert u.find_spec('agent') is None, 'the agent must not be in the Flower image'; print('flwr', flwr.__version__)"

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="fedsite-flower" \
      org.opencontainers.image.description="Flower SuperNode/SuperLink with the fedsite-flower bridge" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN set -eu; \
    groupadd --gid 10002 flower; \
    useradd --uid 10002 --gid 10002 --home-dir /var/lib/flower --no-create-home \
      --shell /usr/sbin/nologin flower; \
    mkdir -p /var/lib/flower /etc/flower; \
    chown 10002:10002 /var/lib/flower; \
    chmod 0750 /var/lib/flower
# FLWR_HOME: where the SuperNode unpacks app bundles and `flwr` keeps its config (a tmpfs or
# volume, the root file system is read-only in the compose files). No telemetry and no update
# check: nothing but the SuperLink connection leaves a site. The SuperLink starts
# `flower-superexec` by name, hence the venv first on PATH.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FLWR_HOME=/var/lib/flower \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1
USER 10002:10002
WORKDIR /var/lib/flower
CMD ["flower-supernode", "--help"]
COPY --from=builder /opt/venv /opt/venv
