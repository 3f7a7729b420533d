#!/usr/bin/env bash
# The seed's recipe on a GPU with nothing downloaded (see bench/gpu_smoke.py); --tiny runs the same path on a CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python bench/gpu_smoke.py "$@"
