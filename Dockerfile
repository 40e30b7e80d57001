# statsd-filter in a container image.
#
#   docker build -t statsd-filter .
#   docker run --rm -p 8125:8125/udp -p 8125:8125/tcp -p 8127:8127 \
#       -e STATSD_FILTER_TARGET_HOST=statsd.example -e STATSD_FILTER_WORKERS=2 statsd-filter
#
# The builder stage compiles the C accelerator (recvmmsg/sendmmsg) into a wheel
# and installs it into a virtual environment; the final stage takes only that
# venv, so the image has no compiler. Settings come from STATSD_FILTER_*
# variables, flags after the image name (`... statsd-filter run --blocklist
# debug.`) or a config file mounted at /etc/statsd-filter (`--config`).
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
# pipefail: the accelerator check below pipes --version into grep.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY . .
# STATSD_FILTER_REQUIRE_ACCELERATOR=1: a compile error fails the build instead
# of shipping the slow path; the last command proves the venv uses it.
RUN STATSD_FILTER_REQUIRE_ACCELERATOR=1 pip wheel --no-deps --wheel-dir /wheels . \
    && python -m venv /opt/statsd-filter \
    && /opt/statsd-filter/bin/pip install /wheels/statsd_filter-*.whl \
    && /opt/statsd-filter/bin/statsd-filter --version | grep -q '^accelerator: c'

FROM ${PYTHON_IMAGE}
COPY --from=builder /opt/statsd-filter /opt/statsd-filter
RUN useradd --system --uid 10001 --user-group --no-create-home \
        --shell /usr/sbin/nologin statsd-filter
USER 10001:10001
# A container's loopback is its own: listen on every address, or nothing
# outside the container (published ports, other pods, probes) can reach it.
# Environment variables rather than flags, so they survive a replaced command.
ENV PATH=/opt/statsd-filter/bin:$PATH \
    STATSD_FILTER_LISTEN_HOST=0.0.0.0 \
    STATSD_FILTER_ADMIN_HOST=0.0.0.0
EXPOSE 8125/udp 8125/tcp 8127/tcp
# SIGTERM drains every worker within --shutdown-timeout (5 s by default);
# give `docker stop` a longer --time than that.
STOPSIGNAL SIGTERM
# 200 while at least one worker runs, 503 (an error here) otherwise. It reads
# the admin port from STATSD_FILTER_ADMIN_PORT: change the port that way.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('STATSD_FILTER_ADMIN_PORT', '8127'), timeout=2)"]
ENTRYPOINT ["statsd-filter"]
CMD ["run"]
