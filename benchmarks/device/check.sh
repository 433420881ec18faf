#!/usr/bin/env bash
# Issue 9's GPU figures in one run on the lent machine (device tool), under 10 minutes:
#   run(command="bash benchmarks/device/check.sh", carry=[".whl"], timeout_s=600)
# after benchmarks/device/fetch_wheels.sh here. Installs the carried wheels beside the
# image's packages, then prints the throughput rows with --device cuda (device busy fraction,
# end to end against the bare forward, tissue, blend against MONAI) and the 1-gigapixel 30%
# tissue slide. Logs go to $OUT (or ./device-out when OUT is unset).
set -uo pipefail
out="${OUT:-device-out}"
mkdir -p "$out"
if ! compgen -G "${WHEELS:-.whl}/*.whl" > /dev/null; then
    echo "no wheels in ${WHEELS:-.whl}/: run benchmarks/device/fetch_wheels.sh here first" >&2
    exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "${WHEELS:-.whl}"/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
python3 -c "import torch, dask, zarr, segpipe; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'dask', dask.__version__, 'zarr', zarr.__version__)" \
    2>&1 | tee -a "$out/gpu.txt" || exit 1
bench() { python3 benchmarks/throughput.py --device "${DEVICE:-cuda}" --keep /tmp/segpipe-bench "$@"; }
# Most telling first, should the time run out: the device's busy fraction, the 1-gigapixel
# target (making its slide takes minutes on the CPU), then tissue and blend.
bench --rows pipeline --size "${SIZE:-8192}" 2>&1 | tee "$out/pipeline.txt"
bench --rows gigapixel --gigapixel-size "${GIGAPIXEL_SIZE:-32768}" 2>&1 | tee "$out/gigapixel.txt"
bench --rows tissue,blend --size "${SIZE:-8192}" 2>&1 | tee "$out/tissue-blend.txt"
