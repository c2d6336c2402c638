# corrosion-agent: the edge daemon in a container (docs/DEPLOY.md).
#
#   docker build -t corrosion-agent .
#   docker run -d --name corrosion-agent --device /dev/video0 \
#     -v corrosion-state:/var/lib/corrosion-agent corrosion-agent
#
# Two stages: the builder installs the package with its base dependencies only (never the
# `export` training extra) into a venv at /opt/corrosion-agent, the same path the systemd
# unit uses; the final stage copies that venv onto a clean slim image. Every runtime
# dependency ships as a manylinux wheel for amd64 and arm64 that needs nothing beyond the
# base image (libstdc++, zlib; opencv-python-headless needs neither libGL nor glib), so no
# apt-get and no compiler in either stage. Tests: tests/test_deploy.py (hadolint-clean,
# structure); tag pinned, pin a digest too (python:...@sha256:...) for reproducible builds.

FROM python:3.11.14-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# README.md is the package's long description: the build reads it. constraints.txt pins
# every dependency to the version the tests ran with.
COPY pyproject.toml README.md constraints.txt ./
COPY agent ./agent
COPY export ./export
RUN python -m venv /opt/corrosion-agent \
    && /opt/corrosion-agent/bin/pip install --no-cache-dir -c constraints.txt . \
    && /opt/corrosion-agent/bin/corrosion-agent --version


FROM python:3.11.14-slim-bookworm

LABEL org.opencontainers.image.title="corrosion-agent" \
      org.opencontainers.image.description="Edge daemon: rust detection on camera frames, MQTT publisher" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed non-root uid:gid 10001 (runAsNonRoot-friendly), also in group video: Debian's
# gid 44, as on Debian, Ubuntu and Raspberry Pi OS hosts; elsewhere docker run --group-add.
RUN groupadd --gid 10001 corrosion \
    && useradd --uid 10001 --gid 10001 --groups video \
        --home-dir /var/lib/corrosion-agent --no-create-home --shell /usr/sbin/nologin \
        corrosion \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/corrosion-agent

COPY --from=builder /opt/corrosion-agent /opt/corrosion-agent
COPY config/agent.toml /etc/corrosion-agent/agent.toml

# ORT_DISABLE_TELEMETRY: onnxruntime >= 1.29 otherwise writes a device id under ~/.cache
# and uploads usage events. PYTHONDONTWRITEBYTECODE: the image runs with --read-only.
ENV PATH=/opt/corrosion-agent/bin:$PATH \
    CORROSION_STATE_DIR=/var/lib/corrosion-agent \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONFAULTHANDLER=1 \
    ORT_DISABLE_TELEMETRY=1

# Outbox, seen-files record, models and the heartbeat file: keep it across containers.
VOLUME ["/var/lib/corrosion-agent"]
# Relative paths in agent.toml (model.path = "model") resolve against the state dir,
# as under systemd (WorkingDirectory=).
WORKDIR /var/lib/corrosion-agent
# The uid alone: with an explicit group Docker would drop the supplementary group video.
USER 10001

# Docker has no sd_notify watchdog: the daemon touches $STATE_DIR/heartbeat while its frame
# loop is alive, and `health` fails when that file is older than 60 s (or missing).
HEALTHCHECK --interval=60s --timeout=20s --start-period=120s --retries=3 \
    CMD ["corrosion-agent", "health", "--state-dir", "/var/lib/corrosion-agent"]

# The daemon handles SIGTERM itself and exits within 10 s: run with --stop-timeout 15.
# No EXPOSE: the agent only makes outgoing connections (MQTT, S3).
ENTRYPOINT ["corrosion-agent"]
CMD ["run", "--config", "/etc/corrosion-agent/agent.toml"]
