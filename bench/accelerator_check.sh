#!/usr/bin/env bash
# One accelerator check for a short GPU / TPU lease (< 8 minutes on one H100 by default).
#
# Usage (from anywhere; it runs in the repository root):
#   bash bench/accelerator_check.sh --out results.txt               # on the accelerator VM
#   bash bench/accelerator_check.sh --dry_run --out /tmp/r.txt      # tiny sizes, CPU, ~1-2 min
#   bash bench/accelerator_check.sh --out r.txt --dtypes bfloat16 --no_torch --budget_s 300
#   PYTHON=/opt/venv/bin/python bash bench/accelerator_check.sh --out r.txt   # another python
#
# Prints the environment (jax, devices, memory, nvidia-smi, torch + CUDA), then times our
# Swin-B train step at 512 px in float32 and bfloat16 at the largest batch that fits, the
# PyTorch reference beside it when CUDA is available, and the training loop's goodput on the
# demo model; appends one line per figure (`name value unit device`) to --out. Every option:
#   bash bench/accelerator_check.sh --help       (bench/accelerator_check.py's docstring)
# Exits 2 with one line when something it needs is missing, 1 when a measurement failed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
if ! command -v "$PY" >/dev/null 2>&1; then
  echo "accelerator_check: no '$PY' on PATH: set PYTHON=/path/to/python (the project's venv)" >&2
  exit 2
fi

# Everything the children import, checked once here so that a missing package is one line,
# not a traceback per child.
missing="$("$PY" - <<'EOF'
import importlib
try:
  for name in ('jax', 'flax', 'optax', 'ml_collections', 'configs.base',
               'segchange_jax.models.segchange', 'segchange_jax.train.train_step',
               'segchange_jax.train.mfu'):
    importlib.import_module(name)
except ImportError as e:
  print(getattr(e, 'name', None) or e)
EOF
)" || { echo "accelerator_check: '$PY' cannot run Python" >&2; exit 2; }
if [[ -n "$missing" ]]; then
  echo "accelerator_check: Python module '$missing' is missing for $PY: install the project" \
       "(pip install -e '.[gpu]'; on a TPU VM pip install -e . 'jax[tpu]'; offline: carry its wheel)" >&2
  exit 2
fi

exec "$PY" bench/accelerator_check.py "$@"
