#!/usr/bin/env bash
# One call on a GPU machine: versions, the CPU-platform test suite under that machine's
# jax/flax (API compatibility), then the default job on the GPU in bf16 and its compiled
# memory. Results go to $OUT (or ./gpu_check_out). Needs jax, flax, optax and orbax;
# ml-collections is installed from .gpu_wheels/ when missing (pip download ml-collections).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if ! "$PY" -c "import ml_collections" 2>/dev/null; then
  "$PY" -m pip install --quiet --no-deps --no-index .gpu_wheels/*.whl || exit 1
fi
"$PY" - <<'PYEOF' | tee "$OUT/versions.txt"
import jax, flax, optax, orbax.checkpoint as ocp, numpy
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, "numpy", numpy.__version__)
print("devices", jax.devices())
PYEOF
echo "== CPU-platform tests under this machine's packages"
JAX_PLATFORMS=cpu timeout 240 "$PY" -m pytest -q -x -p no:cacheprovider -n 8 tests/test_config.py tests/test_attention.py \
  tests/test_tasks.py tests/test_train.py tests/test_errors.py 2>&1 | tail -15 | tee "$OUT/tests.txt"
echo "== default job on the GPU, bf16"
rm -rf /tmp/gpu_default
timeout 200 "$PY" -m trainer.train --config=configs/default.py --workdir=/tmp/gpu_default --config.model.dtype=bfloat16 \
  --config.progress_bar=false 2>&1 | tail -12 | tee "$OUT/train.txt"
cp /tmp/gpu_default/metrics.jsonl "$OUT/metrics.jsonl" 2>/dev/null
for T in 1024 4096; do
  timeout 120 "$PY" -m trainer.train --config=configs/default.py --workdir=/tmp/gpu_dry_$T --dry_run \
    --config.model.dtype=bfloat16 --config.task.seq_len=$T --config.model.d_model=512 --config.model.num_heads=8 \
    --config.model.num_layers=8 2>&1 | tail -1 | tee -a "$OUT/dry_run.txt"
done
