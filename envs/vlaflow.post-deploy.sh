#!/usr/bin/env bash
# Installs vlaflow into the environment made from vlaflow.yaml. Snakemake runs this file
# itself (same name as the environment file, .post-deploy.sh) inside the new environment, from
# the workflow's working directory, which is the repository root (the Snakefile reads
# config/config.yaml from there). By hand: activate the environment, run it from the root.
# VLAFLOW_SOURCE overrides where the source is, e.g. when Snakemake runs with --directory.
set -euo pipefail

source_dir="${VLAFLOW_SOURCE:-$PWD}"
if ! grep -qs '^name = "vlaflow"$' "$source_dir/pyproject.toml"; then
    echo "vlaflow's source is not in $source_dir: run from the repository root or set VLAFLOW_SOURCE" >&2
    exit 1
fi

# Editable: the environment's hash covers the environment file only, so a copy of the code
# made here would silently go stale; a link to the checkout cannot. --no-deps: every dependency
# is pinned in the environment file and pip must not move one.
python -m pip install --no-deps --editable "$source_dir"
# With --no-deps nothing else would notice a dependency the environment file lacks.
python -m pip check
