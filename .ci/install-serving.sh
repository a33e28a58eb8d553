#!/usr/bin/env bash
# Install the serving package (the base install: onnxruntime, no torch) into a fresh venv.
#
# The Dockerfile's build stages RUN this script, and tests/test_container_recipe.py runs the same
# script into a throwaway venv and starts the server from it, so the image's install is tested
# without a Docker engine.
#
# usage: .ci/install-serving.sh VENV [SOURCE]   (SOURCE defaults to the current directory)
# env:   PYTHON       interpreter that creates the venv (default: python3)
#        ONNXRUNTIME  requirement to serve with instead of the CPU build, e.g. onnxruntime-gpu==1.31.1
set -euo pipefail

venv=${1:?usage: install-serving.sh VENV [SOURCE]}
source_dir=${2:-.}

"${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/python" -m pip install "$source_dir"

if [[ -n "${ONNXRUNTIME:-}" ]]; then
    # onnxruntime and onnxruntime-gpu both install the `onnxruntime` module; keep exactly one.
    "$venv/bin/python" -m pip uninstall --yes onnxruntime
    "$venv/bin/python" -m pip install "$ONNXRUNTIME"
fi

# The server must not need torch; fail the build if anything pulled it in.
if "$venv/bin/python" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is None)'; then
    echo "install-serving.sh: torch got installed into $venv; the serving install must not pull it in" >&2
    exit 1
fi
"$venv/bin/vae" --help >/dev/null
