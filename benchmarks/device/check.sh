#!/usr/bin/env bash
# Issue 9's GPU figures in one run on the lent machine (device tool), under 10 minutes:
#   run(command="bash benchmarks/device/check.sh", carry=[".whl"], timeout_s=600)
# after benchmarks/device/fetch_wheels.sh here. Installs the carried wheels beside the
# image's packages, then prints the throughput rows with --device cuda (device busy fraction,
# end to end against the bare forward), the null-model pipeline at 2-16 I/O threads, a py-spy
# profile of sync runs summed by phase (benchmarks/device/phases.py), tissue, blend against
# MONAI (2048^2 and 8192^2) and the 1-gigapixel 30% tissue slide. Logs go to $OUT (or
# ./device-out when OUT is unset).
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
profiled() { python3 benchmarks/device/profile_run.py --device "${DEVICE:-cuda}" --size "${SIZE:-8192}" "$@"; }
# Most telling first, should the time run out: the device's busy fraction and where a run's
# time goes, tissue and blend, then the 1-gigapixel target (its slide takes minutes to make).
bench --rows pipeline --size "${SIZE:-8192}" 2>&1 | tee "$out/pipeline.txt"
# Whether the pipeline around the model grows with its I/O threads (a nearly free model)
# (and with one torch thread: the I/O threads' torch casts each start a team of the process's)
for n in 2 4 8 16; do profiled --model null --runs 1 --io-threads "$n" 2>&1 | tail -1 | sed "s/^/io threads $n: /"; done \
    | tee "$out/io-threads.txt"
profiled --model null --runs 1 --torch-threads 1 2>&1 | tail -1 | sed "s/^/one torch thread: /" \
    | tee -a "$out/io-threads.txt"
# The shipped model: the model thread takes the GIL back after every op, beside I/O threads
# holding it; a waiting thread asks for it after the switch interval (Python's 5 ms)
for si in 0.005 0.0005; do profiled --runs 2 --switch-interval "$si" 2>&1 | tail -2 | sed "s/^/switch interval $si: /"; done \
    | tee "$out/switch-interval.txt"
spy=/tmp/site/bin/py-spy  # every thread's stacks, then only the thread holding the GIL
if "$spy" record -r 200 -f raw --threads -o "$out/profile.txt" -- \
        python3 benchmarks/device/profile_run.py --device "${DEVICE:-cuda}" --size "${SIZE:-8192}" \
        > "$out/profile-runs.txt" 2>&1; then
    python3 benchmarks/device/phases.py "$out/profile.txt" | tee "$out/phases.txt"
    "$spy" record -r 200 -f raw --threads --gil -o "$out/profile-gil.txt" -- \
        python3 benchmarks/device/profile_run.py --device "${DEVICE:-cuda}" --size "${SIZE:-8192}" \
        > /dev/null 2>&1 && python3 benchmarks/device/phases.py "$out/profile-gil.txt" | tee "$out/phases-gil.txt"
else
    echo "py-spy could not profile here (see profile-runs.txt); the runs without it:"
    profiled 2>&1 | tee "$out/profile-runs.txt"
fi
bench --rows tissue,blend --size "${SIZE:-8192}" --blend-size "${BLEND_SIZE:-2048}" 2>&1 | tee "$out/tissue-blend.txt"
bench --rows blend --blend-size "${BIG_BLEND_SIZE:-8192}" 2>&1 | tee "$out/blend-large.txt"
bench --rows gigapixel --gigapixel-size "${GIGAPIXEL_SIZE:-32768}" 2>&1 | tee "$out/gigapixel.txt"
