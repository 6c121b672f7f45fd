# syntax=docker/dockerfile:1
# Gateway image: the OpenAI-compatible HTTP entry, no torch (the gateway never carries tensors).
#   docker build -f images/gateway.Dockerfile -t diffdisagg/gateway:0.1.0 .
# The install steps are images/install/gateway.sh, which tests/images/test_install_scripts.py also runs.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
FROM ${PYTHON_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/diffdisagg/bin:$PATH \
    DIFFDISAGG_ROLE=gateway
COPY images/install/ /tmp/build/images/install/
COPY images/requirements/ /tmp/build/images/requirements/
COPY transport/ /tmp/build/transport/
COPY worker/ /tmp/build/worker/
RUN python -m venv /opt/diffdisagg \
 && /tmp/build/images/install/gateway.sh --python /opt/diffdisagg/bin/python --src /tmp/build \
 && rm -rf /tmp/build \
 && useradd --system --uid 65532 --user-group --no-create-home --shell /usr/sbin/nologin diffdisagg
USER 65532:65532
EXPOSE 8000
ENTRYPOINT ["python", "-m", "diffdisagg.worker.gateway"]
