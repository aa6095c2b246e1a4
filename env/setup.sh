#!/usr/bin/env bash
# Set up gptcore on a fresh machine: a virtual environment with PyTorch and the package, and the
# default corpus (Shakespeare's complete works) downloaded, checksummed and tokenized.
#
#   bash env/setup.sh
#   bash env/setup.sh --llama    # also llama-cpp-python, to run exported GGUF files (and their tests)
#
# Knobs (environment variables):
#   GPTCORE_VENV   where the virtual environment goes (default: .venv in the repository);
#                  GPTCORE_VENV=none installs into the Python that runs pip (e.g. a conda env)
#   TORCH_SPEC     what pip installs for PyTorch (default: torch==2.13.0). On a GPU cluster pick
#                  the CUDA build matching the driver, e.g.
#                  TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
#   GPTCORE_DATA   where corpora are stored (default: ~/.cache/gptcore)
#   PYTHON         the interpreter that creates the venv (default: python3, 3.10 or newer)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${GPTCORE_VENV:-$ROOT/.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

fail() { echo "setup: $*" >&2; exit 1; }

LLAMA=0
for arg in "$@"; do
  case "$arg" in
    --llama) LLAMA=1 ;;
    *) fail "unknown option $arg; the only option is --llama (see the top of env/setup.sh)" ;;
  esac
done

command -v "$PYTHON" >/dev/null || fail "$PYTHON not found; install Python 3.10+ (apt-get install python3 python3-venv)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || fail "$PYTHON is $("$PYTHON" -V 2>&1); gptcore needs Python 3.10 or newer (set PYTHON=...)"

if [ "$VENV" = none ]; then
  PY="$PYTHON"
else
  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV" || fail "could not create a virtual environment in $VENV (apt-get install python3-venv)"
  fi
  PY="$VENV/bin/python"
fi

# torch first and pinned: left to the package's own dependency, pip would pick the newest
# release, a multi-GB CUDA build where a CPU one was wanted.
want="${TORCH_SPEC%% *}"; want="${want#torch==}"
have="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)"
if [ "$have" != "$want" ]; then
  # shellcheck disable=SC2086  # TORCH_SPEC may carry pip options such as --index-url
  "$PY" -m pip install -q $TORCH_SPEC || fail "pip install $TORCH_SPEC failed"
fi
"$PY" -m pip install -q -e "$ROOT[dev]" || fail "pip install -e $ROOT failed"

if [ "$LLAMA" = 1 ]; then
  # llama.cpp compiled from llama-cpp-python's source: about 4 minutes on 2 cores the first time
  # (the library only, without llama.cpp's tools and multimodal part); pip keeps the wheel it
  # built in its cache, so later set-ups take seconds.
  echo "setup: building llama-cpp-python (llama.cpp's library; minutes the first time)"
  CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF}" \
    "$PY" -m pip install -q "llama-cpp-python==0.3.36" || fail "pip install llama-cpp-python failed (it needs a C++ compiler and cmake)"
fi

"$PY" -m gptcore prepare --data shakespeare || fail "could not prepare the default corpus"
echo "setup: done. Python: $PY ($("$PY" -c 'import torch; print("torch", torch.__version__)'))"
