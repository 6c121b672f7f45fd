# syntax=docker/dockerfile:1
# Ascend worker: a CANN base image (build arg), torch 2.14.0 + torch_npu 2.14.0, the Mooncake NPU wheel. See docs/ascend.md.
# One target per role; decode adds the video encoder:
#   docker build -f images/worker-ascend.Dockerfile --build-arg CANN_BASE_IMAGE=<cann image> --target denoise -t diffdisagg/worker-ascend-denoise:0.1.0 .
# The install steps are images/install/worker-ascend.sh, which tests/images/test_install_scripts.py also runs.
# CANN >= 8.3.RC1 with Python 3.11 and glibc >= 2.35 (e.g. an Ubuntu 22.04 based CANN image for your
# chip: 910B / A2 / A3). Required: there is no default, because the right one depends on the chip and driver.
ARG CANN_BASE_IMAGE
FROM ${CANN_BASE_IMAGE} AS common
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Interpreter of the base image the virtual environment is made from.
ARG PYTHON=python3
# CANN base images may end on a non-root user; installing needs root (the role targets drop it again).
# hadolint ignore=DL3002,DL3066
USER root
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/diffdisagg/bin:$PATH \
    DIFFDISAGG_PLATFORM=npu
# A CPU-only torch index drops the CUDA wheels PyPI's torch pulls in (docs/install.md); unset: PyPI.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
COPY images/install/ /tmp/build/images/install/
COPY images/requirements/ /tmp/build/images/requirements/
COPY transport/ /tmp/build/transport/
COPY worker/ /tmp/build/worker/
COPY images/entrypoint.sh /usr/local/bin/diffdisagg-entrypoint
# prefill and denoise install the same set; the decode target adds video.txt in a layer on top.
RUN "${PYTHON}" -m venv /opt/diffdisagg \
 && /tmp/build/images/install/worker-ascend.sh --python /opt/diffdisagg/bin/python --src /tmp/build --role denoise \
 && rm -rf /tmp/build \
 && useradd --system --uid 65532 --user-group --no-create-home --shell /usr/sbin/nologin diffdisagg
ENTRYPOINT ["/usr/local/bin/diffdisagg-entrypoint"]

FROM common AS prefill
ENV DIFFDISAGG_ROLE=prefill
USER 65532:65532
CMD ["python", "-m", "diffdisagg.worker", "--role", "prefill"]

FROM common AS denoise
ENV DIFFDISAGG_ROLE=denoise
USER 65532:65532
CMD ["python", "-m", "diffdisagg.worker", "--role", "denoise"]

FROM common AS decode
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
COPY images/install/ /tmp/build/images/install/
COPY images/requirements/ /tmp/build/images/requirements/
COPY transport/ /tmp/build/transport/
COPY worker/ /tmp/build/worker/
RUN /tmp/build/images/install/worker-ascend.sh --python /opt/diffdisagg/bin/python --src /tmp/build --role decode \
 && rm -rf /tmp/build
ENV DIFFDISAGG_ROLE=decode
USER 65532:65532
CMD ["python", "-m", "diffdisagg.worker", "--role", "decode"]
