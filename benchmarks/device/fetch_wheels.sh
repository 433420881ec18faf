#!/usr/bin/env bash
# Download the wheels of wheels.txt for the GPU machine (CPython 3.12, manylinux x86-64) into
# .whl/ at the repository root, which git ignores (.gitignore) and the device tool
# carries: `carry: [".whl"]`. About 40 MiB. Run here, where PyPI is reachable.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
mkdir -p .whl
grep -v '^#' benchmarks/device/wheels.txt | xargs python3 -m pip download --quiet --no-deps \
    --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl
du -sh .whl
