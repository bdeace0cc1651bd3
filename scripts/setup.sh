#!/usr/bin/env bash
# Create .venv and install ftctl with its dependencies.
# PyTorch: the CUDA build where an NVIDIA GPU is present, otherwise the CPU build (from the PyTorch CPU index when
# it is reachable; otherwise `torch==2.13.0` from the configured package index, which on machines that carry a
# local CPU wheel picks that wheel). Idempotent: re-running only installs what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${FTCTL_TORCH_VERSION:-2.13.0}"
PY="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)

if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "setup: NVIDIA GPU found, installing the CUDA build of torch ${TORCH_VERSION}"
        "${pip[@]}" install "torch==${TORCH_VERSION}"
    elif curl -sSf -m 5 -o /dev/null https://download.pytorch.org/whl/cpu/ 2>/dev/null; then
        echo "setup: no CUDA, installing the CPU build of torch ${TORCH_VERSION} from the PyTorch CPU index"
        "${pip[@]}" install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
    else
        echo "setup: no CUDA and no PyTorch index reachable, installing torch==${TORCH_VERSION} from the configured index"
        "${pip[@]}" install "torch==${TORCH_VERSION}"
    fi
fi

stamp=.venv/.ftctl-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setup: installing ftctl and its dependencies into .venv"
    "${pip[@]}" install -e ".[dev]"
    touch "$stamp"
fi
