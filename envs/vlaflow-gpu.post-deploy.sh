#!/usr/bin/env bash
# Installs FlashAttention and vlaflow into the environment made from vlaflow-gpu.yaml. Snakemake
# runs this file itself (same name as the environment file, .post-deploy.sh) inside the new
# environment, from the workflow's working directory, which is the repository root. By hand:
# activate the environment, run it from the root. VLAFLOW_SOURCE overrides where the source is.
set -euo pipefail

# The same version as FLASH_ATTN_VERSION in docker/Dockerfile (tests/test_deployment.py checks).
FLASH_ATTN_VERSION=2.8.3.post2

source_dir="${VLAFLOW_SOURCE:-$PWD}"
if ! grep -qs '^name = "vlaflow"$' "$source_dir/pyproject.toml"; then
    echo "vlaflow's source is not in $source_dir: run from the repository root or set VLAFLOW_SOURCE" >&2
    exit 1
fi

# flash-attn is published as source only. Its setup.py first looks for a prebuilt wheel matching
# the installed torch, CUDA major version and Python, and otherwise compiles for the GPU
# generations in FLASH_ATTN_CUDA_ARCHS (default 80;90;100;120; "80;90" for A100/H100/H200 only
# is much faster), MAX_JOBS nvcc processes at a time (each can take ~9 GB of memory). It imports
# torch while building, hence --no-build-isolation, and with it the build tools must be here.
if ! command -v nvcc >/dev/null && [ -z "${CUDA_HOME:-}" ]; then
    echo "warning: no nvcc (CUDA 13.x) found; flash-attn installs only if a prebuilt wheel matches" >&2
fi
python -m pip install wheel ninja packaging psutil
python -m pip install --no-build-isolation "flash-attn==${FLASH_ATTN_VERSION}"

# Editable and --no-deps, as in vlaflow.post-deploy.sh: the rules run the checked-out code, and
# pip must not move a version pinned in the environment file.
python -m pip install --no-deps --editable "$source_dir"
python -m pip check
