# syntax=docker/dockerfile:1
# CUDA worker: torch 2.14.0 (+cu130, CUDA libraries as wheels; the driver comes from the node), the Mooncake CUDA wheel.
# One target per role; decode adds the video encoder:
#   docker build -f images/worker-cuda.Dockerfile --target denoise -t diffdisagg/worker-cuda-denoise:0.1.0 .
# The install steps are images/install/worker-cuda.sh, which tests/images/test_install_scripts.py also runs.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
FROM ${PYTHON_IMAGE} AS common
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/diffdisagg/bin:$PATH \
    DIFFDISAGG_PLATFORM=cuda
# A CPU-only torch index drops the CUDA wheels PyPI's torch pulls in (docs/install.md); unset: PyPI.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
COPY images/install/ /tmp/build/images/install/
COPY images/requirements/ /tmp/build/images/requirements/
COPY transport/ /tmp/build/transport/
COPY worker/ /tmp/build/worker/
COPY images/entrypoint.sh /usr/local/bin/diffdisagg-entrypoint
# prefill and denoise install the same set; the decode target adds video.txt in a layer on top.
RUN python -m venv /opt/diffdisagg \
 && /tmp/build/images/install/worker-cuda.sh --python /opt/diffdisagg/bin/python --src /tmp/build --role denoise \
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
RUN /tmp/build/images/install/worker-cuda.sh --python /opt/diffdisagg/bin/python --src /tmp/build --role decode \
 && rm -rf /tmp/build
ENV DIFFDISAGG_ROLE=decode
USER 65532:65532
CMD ["python", "-m", "diffdisagg.worker", "--role", "decode"]
