#!/usr/bin/env bash
# Issue 9's GPU figures on the lent machine (device tool), each call under 10 minutes:
#   run(command="SECTIONS='pipeline io switch profile' bash benchmarks/device/check.sh",
#       carry=[".whl"], timeout_s=...)
# after benchmarks/device/fetch_wheels.sh here. Installs the carried wheels beside the
# image's packages, then runs the SECTIONS asked for (default: all, in this order):
#   pipeline  throughput rows with --device cuda (device busy, end to end vs bare forward)
#   io        the null-model pipeline at 2-16 I/O threads, and with one torch thread
#   switch    the shipped model at a 5 ms and a 0.5 ms GIL switch interval
#   profile   py-spy profiles of sync runs (every thread, then the GIL's holder) by phase
#   scaling   what caps the pipeline: the disk (work in /dev/shm), blocks of 4x4 tiles, and 2 and
#             4 processes side by side (a GIL each), null model and shipped; a GIL profile
#   tissue    the 30% tissue slide against an all-tissue one; blend vs MONAI at 2048^2
#   blend     blend vs MONAI at 8192^2
#   gigapixel the 1-gigapixel 30% tissue slide
#   shapes    the 30% and all-tissue slides run by run with their passes' shapes and where the
#             time went (tissue_probe.py), and a window shape's first pass against later ones
#             (shape_probe.py)
# Everything goes to $OUT/log.txt (or ./device-out when OUT is unset), each section stamped with
# its start and length; the phase tables to $OUT/phases*.txt. The device tool returns at most
# 8 files, so raw profiles stay in /tmp.
set -uo pipefail
out="${OUT:-device-out}"
mkdir -p "$out"
log="$out/log.txt"
if ! compgen -G "${WHEELS:-.whl}/*.whl" > /dev/null; then
    echo "no wheels in ${WHEELS:-.whl}/: run benchmarks/device/fetch_wheels.sh here first" >&2
    exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "${WHEELS:-.whl}"/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; } 2>&1 | tee "$log"
python3 -c "import torch, dask, zarr, segpipe; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'dask', dask.__version__, 'zarr', zarr.__version__)" \
    2>&1 | tee -a "$log" || exit 1
size="${SIZE:-8192}"
dev="${DEVICE:-cuda}"
bench() { python3 benchmarks/throughput.py --device "$dev" --keep /tmp/segpipe-bench "$@"; }
profiled() { python3 benchmarks/device/profile_run.py --device "$dev" --size "$size" "$@"; }
spy=/tmp/site/bin/py-spy
section_pipeline() { bench --rows pipeline --size "$size"; }
section_io() {
    # whether the pipeline around a nearly free model grows with its I/O threads; and with one
    # torch thread (the I/O threads' torch casts each start a team of the process's threads)
    for n in 2 4 8 16; do profiled --model null --runs 1 --io-threads "$n" 2>&1 | tail -1 | sed "s/^/null, io threads $n: /"; done
    profiled --model null --runs 1 --torch-threads 1 2>&1 | tail -1 | sed "s/^/null, one torch thread: /"
    profiled --runs 1 --torch-threads 1 2>&1 | tail -1 | sed "s/^/shipped, one torch thread: /"
}
section_switch() {
    # the model thread takes the GIL back after every op beside I/O threads holding it; a
    # waiting thread asks for it after the switch interval (Python's 5 ms)
    for si in 0.005 0.0005; do profiled --runs 2 --switch-interval "$si" 2>&1 | tail -2 | sed "s/^/switch interval $si: /"; done
}
section_profile() {
    if "$spy" record -r 200 -f raw --threads -o /tmp/profile.txt -- \
            python3 benchmarks/device/profile_run.py --device "$dev" --size "$size" --runs 2; then
        python3 benchmarks/device/phases.py /tmp/profile.txt > "$out/phases.txt"
        "$spy" record -r 200 -f raw --threads --gil -o /tmp/profile-gil.txt -- \
            python3 benchmarks/device/profile_run.py --device "$dev" --size "$size" --runs 2 \
            && python3 benchmarks/device/phases.py /tmp/profile-gil.txt > "$out/phases-gil.txt"
    else
        echo "py-spy could not profile here; the runs without it:"
        profiled --runs 2
    fi
}
side_by_side() {  # k processes at once, each its own output, one input: side_by_side NAME k ARGS...
    local name=$1 k=$2; shift 2
    for i in $(seq "$k"); do
        mkdir -p "/tmp/side$i" && ln -sfn "/tmp/segpipe-bench/input-$size.zarr" "/tmp/side$i/"
        (profiled --runs 3 --work "/tmp/side$i" "$@" > "/tmp/side$i.log" 2>&1) &
    done
    wait
    for i in $(seq "$k"); do tail -3 "/tmp/side$i.log" | cut -c1-140 | sed "s/^/$name x$k, process $i: /"; done
}
section_scaling() {
    df -h /tmp /dev/shm; mount | grep -E ' on / | on /tmp ' || true
    dd if=/dev/zero of=/tmp/dd.bin bs=1M count=2000 2>&1 | tail -1; rm -f /tmp/dd.bin
    profiled --model null --runs 2 2>&1 | tail -2 | sed "s/^/null, one process: /"
    mkdir -p /dev/shm/w && cp -r "/tmp/segpipe-bench/input-$size.zarr" /dev/shm/w/ \
        && profiled --model null --runs 2 --work /dev/shm/w 2>&1 | tail -2 | sed "s/^/null, in \/dev\/shm: /"
    rm -rf /dev/shm/w
    profiled --model null --runs 2 --set task_tiles=4 2>&1 | tail -2 | sed "s/^/null, task_tiles=4: /"
    side_by_side null 2 --model null
    side_by_side null 4 --model null
    side_by_side shipped 2
    side_by_side shipped 4
    "$spy" record -r 100 -f raw --threads --gil -o /tmp/null-gil.txt -- \
        python3 benchmarks/device/profile_run.py --device "$dev" --size "$size" --model null --runs 2 \
        > /dev/null 2>&1 && gzip -c /tmp/null-gil.txt > "$out/null-gil.txt.gz"
    "$spy" record -r 100 -f raw --threads -o /tmp/null-all.txt -- \
        python3 benchmarks/device/profile_run.py --device "$dev" --size "$size" --model null --runs 2 \
        > /dev/null 2>&1 && gzip -c /tmp/null-all.txt > "$out/null-all.txt.gz"
}
section_tissue() { bench --rows tissue,blend --size "$size" --blend-size "${BLEND_SIZE:-2048}"; }
section_blend() { bench --rows blend --blend-size "${BIG_BLEND_SIZE:-8192}"; }
section_shapes() { python3 benchmarks/device/tissue_probe.py "$dev"; python3 benchmarks/device/shape_probe.py; }
section_gigapixel() { bench --rows gigapixel --gigapixel-size "${GIGAPIXEL_SIZE:-32768}"; }
# Most telling first, should the time run out; the 1-gigapixel slide takes minutes to make.
for s in ${SECTIONS:-pipeline io switch profile tissue blend gigapixel}; do
    start=$(date +%s)
    echo "=== $s (at $(date -u +%T))" | tee -a "$log"
    "section_$s" 2>&1 | tee -a "$log"
    echo "=== $s took $(( $(date +%s) - start )) s" | tee -a "$log"
done
