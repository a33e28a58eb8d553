#!/usr/bin/env bash
# Validate deploy/ (Kubernetes manifests, KServe InferenceService) against their schemas, offline:
# the Kubernetes schemas ship in the kubernetes-validate package (dev extra), the KServe one in
# deploy/schemas/. Arguments go to deploy/validate.py, e.g. `--root DIR` or `-k 1.33.0`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec .venv/bin/python deploy/validate.py "$@"
