# Source this on the GPU machine from the repository root: installs the carried wheels (.whl/) into
# /tmp/site, unpacks libibverbs for Mooncake when the image lacks it, and sets PYTHONPATH.
#   source bench/gpu/device_env.sh
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD/transport/src:$PWD/worker/src:$PWD/operator/src
if ! ldconfig -p | grep -q 'libibverbs.so.1'; then
    mkdir -p /tmp/ib
    for deb in .whl/debs/*.deb; do dpkg -x "$deb" /tmp/ib; done
    export LD_LIBRARY_PATH=/tmp/ib/usr/lib/x86_64-linux-gnu:/tmp/ib/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    echo "libibverbs: unpacked from .whl/debs into /tmp/ib"
else
    echo "libibverbs: from the image"
fi
export MC_LOG_LEVEL=ERROR PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DIFFDISAGG_PLATFORM=cuda
