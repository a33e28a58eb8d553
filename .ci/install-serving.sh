#!/usr/bin/env bash
# Install the serving package (the base install: onnxruntime, no torch) into a fresh venv, from the
# lock requirements/serving.txt.
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
# The locked dependencies (requirements/lock.sh writes the lock), then the project without its own.
"$venv/bin/python" -m pip install --require-hashes -r "$source_dir/requirements/serving.txt"
"$venv/bin/python" -m pip install --no-deps "$source_dir"
"$venv/bin/python" -m pip check

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

# Nothing is installed into the server's venv after this, and nothing in it runs test suites: pip,
# setuptools and the tests that wheels ship (numpy's) go, 40 MB of the runtime image.
"$venv/bin/python" -m pip uninstall --yes --quiet pip setuptools
find "$venv/lib" -type d -name tests -path '*/site-packages/*' -prune -exec rm -rf {} +
