#!/usr/bin/env bash
# Prove the GPU path on one GPU in a few minutes; a summary table is printed last.
#
#   bash bench/gpu_check.sh                    # on a GPU machine: its own PyTorch, no install
#   bash bench/gpu_check.sh --smoke            # the same sections on the CPU at a tiny shape (CI)
#   bash bench/gpu_check.sh --only train,decode --data data/tinyshakespeare.txt
#
# Runs with PYTHONPATH=. on the Python that has torch: PYTHON if set, else this checkout's .venv,
# else python3 (a GPU machine's preinstalled PyTorch). Options: see bench/gpu_check.py.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PYTHON" bench/gpu_check.py "$@"
