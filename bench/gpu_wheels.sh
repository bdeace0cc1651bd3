#!/usr/bin/env bash
# The wheels `python -m bench.gpu` needs on the GPU machine beyond its image (the device tool's KINDS.md): ftctl
# itself, `datasets` with the two packages of its own the image lacks (dill, multiprocess), and pydantic with its
# three (pydantic-core, annotated-types, typing-inspection), and the metric libraries nltk, rouge-score and seqeval,
# pytest-xdist, execnet and pytest-timeout for the gpu test tier, each at the version this checkout's .venv runs. ftctl's
# other top-level imports (torch, transformers, peft, numpy, rich, yaml, safetensors, pandas, scipy,
# huggingface_hub) are there (checked by importing launch.cli there: bench/gpu_device.sh).
# Writes them to bench/out/wheels (not committed) and prints their sizes against the 64 MiB one device call carries.
# With --with-bitsandbytes it adds bitsandbytes' wheel (for the QLoRA row) and says whether it still fits.
#
#   bench/gpu_wheels.sh [--with-bitsandbytes]
#   then on the device: python3 -m pip install --no-deps --no-index bench/out/wheels/*.whl && python3 -m bench.gpu
set -euo pipefail
cd "$(dirname "$0")/.."
out=bench/out/wheels
rm -rf "$out"
mkdir -p "$out"
.venv/bin/python -m pip wheel --no-deps -q -w "$out" .
pinned() { .venv/bin/python -c "from importlib.metadata import version; print('$1==' + version('$1'))"; }
packages=()
for name in datasets dill multiprocess pydantic pydantic_core annotated-types typing-inspection nltk \
    pytest-xdist execnet pytest-timeout; do
    packages+=("$(pinned "$name")")
done
[ "${1:-}" = "--with-bitsandbytes" ] && packages+=("$(pinned bitsandbytes)")
# the device's Python is 3.12 on x86_64 Linux
.venv/bin/python -m pip download --no-deps -q -d "$out" --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 \
    --platform any "${packages[@]}"
# the metric libraries the image lacks that PyPI ships as source only (pure Python): built into wheels here
.venv/bin/python -m pip wheel --no-deps -q -w "$out" "$(pinned rouge-score)" "$(pinned seqeval)"
total=0
for wheel in "$out"/*.whl; do
    size=$(stat -c %s "$wheel")
    total=$((total + size))
    printf '%8.1f MiB  %s\n' "$(echo "$size / 1048576" | bc -l)" "$(basename "$wheel")"
done
printf '%8.1f MiB  in all (limit 64 MiB per call)\n' "$(echo "$total / 1048576" | bc -l)"
[ "$total" -le $((64 * 1048576)) ] || { echo "too large for one call"; exit 1; }
