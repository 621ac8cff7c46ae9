#!/usr/bin/env bash
# Creates or updates the virtual environment .venv: a CUDA build of torch (>= 2.11, with triton),
# the test and benchmark tools (pytest, peft, matplotlib), and spft_kernels installed in place, with its CUDA extension built by nvcc
# whenever a CUDA toolkit is found (no GPU needed). Safe to run again: finished steps are quick.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
venv=${SPFT_VENV:-.venv}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
py="$venv/bin/python"
pip_install() { "$py" -m pip install --disable-pip-version-check -q "$@"; }

# The CPU-only torch wheel cannot build CUDA extensions: keep a CUDA build, else take the registry's.
if ! "$py" -c 'import sys, torch; v = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(0 if torch.version.cuda and v >= (2, 11) else 1)' 2>/dev/null; then
  echo "setup: installing a CUDA build of torch (several GB, about 2 minutes)"
  pip_install --upgrade "torch>=2.11"
fi
pip_install "setuptools>=70" wheel ninja
echo "setup: building spft_kernels (the CUDA extension takes a minute or two on 2 cores)"
# --no-build-isolation: build against the torch installed above instead of downloading it again.
pip_install --no-build-isolation -e ".[test,bench]"
"$py" -c 'import spft_kernels as s; print("setup: spft_kernels ready, backends:", s.available_backends())'
