#!/usr/bin/env bash
# Prove the GPU path on one GPU in under 5 minutes; the table is written as it grows.
#
# Here, once (any machine with this checkout set up; no GPU needed):
#   bash bench/gpu_check.sh --prepare        # the training text into gpu_bundle/ (git ignores it)
# On the lent GPU machine, through the device tool, exactly:
#   command "bash bench/gpu_check.sh", carry ["gpu_bundle"], timeout_s 420
#   (the table lands in $OUT: gpu_check.md, gpu_check.json, gpu_check.log; a second try within
#    the 15 minutes: command "bash bench/gpu_check.sh --quick", carry ["gpu_bundle"], timeout_s 180)
# Anywhere else:
#   bash bench/gpu_check.sh                    # on a GPU machine: its own PyTorch, no install, no network
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
