#!/usr/bin/env bash
# Write the lock files from pyproject.toml with uv (dev extra): every package pinned, with the
# sha256 of each of its files, for Linux and Python 3.11 (the images' interpreter).
#   dev.txt      serving + train + batch + dev extras: CI's .venv
#   train.txt    serving + train extra: the Dockerfile's train target
#   serving.txt  the base install, no torch: the runtime and gpu targets
#   batch.txt    serving + batch extra + Ray's dashboard (requirements/batch.in): the batch target
# train.txt, serving.txt and batch.txt are resolved within dev.txt's pins, so CI tests the images' versions.
#
# usage: requirements/lock.sh [uv pip compile options]
#   after changing dependencies in pyproject.toml:  requirements/lock.sh
#   to move everything, or one package, forward:    requirements/lock.sh --upgrade
#                                                   requirements/lock.sh --upgrade-package numpy
# torch is pinned to its CPU build (torch==X+cpu: PyPI's Linux torch bundles CUDA, gigabytes),
# found on TORCH_INDEX_URL (default below: PyTorch's CPU index). Where that index is unreachable,
# set TORCH_INDEX_URL to a mirror of it, or to nothing and add `--find-links DIR`, DIR holding the
# wheel. Only that wheel's hash is locked, so the train target builds for linux/amd64.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

torch_index=${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}
compile() {
    .venv/bin/uv pip compile pyproject.toml --quiet --python-version 3.11 --python-platform linux \
        --generate-hashes --custom-compile-command requirements/lock.sh \
        ${torch_index:+--extra-index-url "$torch_index"} "$@"
}

compile "$@" --extra train --extra batch --extra dev -o requirements/dev.txt
compile "$@" --extra train -c requirements/dev.txt -o requirements/train.txt
compile "$@" -c requirements/dev.txt -o requirements/serving.txt
compile "$@" --extra batch requirements/batch.in -c requirements/dev.txt -o requirements/batch.txt
grep -q '^torch==.*+cpu ' requirements/train.txt || {
    echo "lock.sh: requirements/train.txt does not pin a CPU build of torch (torch==X+cpu)" >&2
    exit 1
}
for lock in serving batch; do
    if grep -qE '^(torch|nvidia-)' "requirements/$lock.txt"; then
        echo "lock.sh: requirements/$lock.txt pulls in torch or CUDA, which the image must not" >&2
        exit 1
    fi
done
