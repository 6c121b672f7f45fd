# For bench_pools.py on the GPU machine, from the repository root: installs the wheels carried in
# .whlpool/ (diffusers, importlib_metadata) into /tmp/site, unpacks the ffmpeg binary that
# imageio-ffmpeg's MP4 writer runs (carried xz-compressed to fit the transfer limit), sets PYTHONPATH.
#   source bench/gpu/device_env_pools.sh
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whlpool/*.whl || return 1
cp -r .whlpool/pkg/imageio_ffmpeg /tmp/site/ || return 1
python3 -c "import lzma, shutil; shutil.copyfileobj(lzma.open('.whlpool/ffmpeg.xz'), open('/tmp/ffmpeg', 'wb'))" || return 1
chmod +x /tmp/ffmpeg
export IMAGEIO_FFMPEG_EXE=/tmp/ffmpeg
export PYTHONPATH=/tmp/site:$PWD/transport/src:$PWD/worker/src:$PWD/operator/src
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DIFFDISAGG_PLATFORM=cuda
