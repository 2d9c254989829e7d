#!/usr/bin/env bash
# Sets up everything bootdiff needs on a fresh Debian machine: system packages (Chromium for the
# report test, Fashion-MNIST), a virtual environment in .venv with the CPU build of torch 2.13.0
# installed first (so pip never pulls CUDA wheels), and bootdiff with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
[ -d /usr/share/datasets/fashion-mnist ] || need_apt+=(dataset-fashion-mnist)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "[setup] apt-get install ${need_apt[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "[setup] not root: please install ${need_apt[*]} (the tests that need them will fail)" >&2
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
python -m pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
# The project's byte-code, written once: where PYTHONDONTWRITEBYTECODE is set (as on this project's
# CI machines) Python never caches it, and every process, each Ray worker among them, would compile
# the same modules again (≈ 0.5 CPU-s a process). A module edited later is compiled from its
# source again, as Python does whenever a cache is stale.
python -m compileall -q -j 0 bootdiff ray_jobs benchmarks tests >/dev/null
python -c "import torch, ray, diffusers, webdataset; print('[setup] torch', torch.__version__, '| ray', ray.__version__, '| diffusers', diffusers.__version__)"
