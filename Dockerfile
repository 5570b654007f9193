# ccbridge — one image for the three services and the CLI.
#
#   docker build -t ccbridge:local .
#   docker run --rm ccbridge:local --help
#   docker run --rm ccbridge:local auth|vault|sandbox      (compose / Kubernetes pick the command)
#
# Stage 1 builds wheels and a virtualenv; stage 2 is python:3.11-slim with that venv only
# (no compiler, no pip cache), running as uid/gid 10001. Operator guide: docs/operations.md.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src

# 1) Third-party wheels, the versions constraints.txt pins: rebuilt only when either file changes.
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && pip wheel --wheel-dir /wheels -r /tmp/requirements.txt -c constraints.txt

# 2) ccbridge itself, installed (not editable) into a venv that the runtime stage copies whole.
COPY shared ./shared
COPY services ./services
COPY ccbridge ./ccbridge
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/ccbridge \
 && /opt/ccbridge/bin/pip install --no-index --find-links /wheels ccbridge \
 && /opt/ccbridge/bin/python -c "import services.auth.app, services.vault.app, services.sandbox.app" \
 && /opt/ccbridge/bin/ccbridge --help > /dev/null

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="ccbridge" \
      org.opencontainers.image.description="Credential bridge for Claude Code: auth, vault and sandbox services" \
      org.opencontainers.image.licenses="Proprietary"

# AUTH_HOST=0.0.0.0: inside a container the service must listen beyond loopback.
# CCBRIDGE_DATA_DIR holds keys (when not given by env) and local state; mount a volume or an
# emptyDir there (the root filesystem can be read-only).
ENV PATH=/opt/ccbridge/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/ccbridge \
    CCBRIDGE_DATA_DIR=/var/lib/ccbridge \
    LOCAL_SANDBOX_ROOT=/var/lib/ccbridge/sandboxes \
    LOG_FORMAT=json \
    AUTH_HOST=0.0.0.0 \
    AUTH_PORT=8000

RUN groupadd --system --gid 10001 ccbridge \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/ccbridge --create-home \
        --shell /usr/sbin/nologin ccbridge \
 && install -d -o 10001 -g 10001 -m 0700 /var/lib/ccbridge /var/lib/ccbridge/keys /var/lib/ccbridge/sandboxes

COPY --from=builder /opt/ccbridge /opt/ccbridge

USER 10001:10001
WORKDIR /var/lib/ccbridge

# auth HTTP (AUTH_PORT), vault and sandbox health/metrics (VAULT_METRICS_PORT 9100 / SANDBOX_METRICS_PORT 9101).
EXPOSE 8000 9100 9101

# One probe for every service: CCBRIDGE_HEALTHCHECK_URL if set, else /healthz on VAULT_METRICS_PORT / SANDBOX_METRICS_PORT
# (vault, sandbox), else on AUTH_PORT (auth). urlopen raises on connection errors and non-2xx,
# which makes python exit 1 = unhealthy.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/opt/ccbridge/bin/python", "-c", "import os, urllib.request as r; e = os.environ.get; port = e('VAULT_METRICS_PORT') or e('SANDBOX_METRICS_PORT') or e('AUTH_PORT') or '8000'; r.urlopen(os.environ.get('CCBRIDGE_HEALTHCHECK_URL') or f'http://127.0.0.1:{port}/healthz', timeout=4).close()"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["ccbridge"]
CMD ["--help"]
