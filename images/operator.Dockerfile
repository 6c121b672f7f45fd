# syntax=docker/dockerfile:1
# Operator image: Python + kopf + diffdisagg-operator, no torch. Build from the repository root:
#   docker build -f images/operator.Dockerfile -t diffdisagg/operator:0.1.0 .
# The install steps are images/install/operator.sh, which tests/images/test_install_scripts.py also runs.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
FROM ${PYTHON_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/diffdisagg/bin:$PATH
COPY images/install/ /tmp/build/images/install/
COPY images/requirements/ /tmp/build/images/requirements/
COPY operator/ /tmp/build/operator/
RUN python -m venv /opt/diffdisagg \
 && /tmp/build/images/install/operator.sh --python /opt/diffdisagg/bin/python --src /tmp/build \
 && rm -rf /tmp/build \
 && useradd --system --uid 65532 --user-group --no-create-home --shell /usr/sbin/nologin diffdisagg
# Numeric user, so that runAsNonRoot can verify it; the chart mounts a writable /tmp (read-only root fs).
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["python", "-m", "diffdisagg.operator"]
