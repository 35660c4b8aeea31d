#!/usr/bin/env bash
# One call on a GPU machine (under 8 minutes: every step's timeout is cut to what is left of a
# 420 s deadline): versions; the Pallas kernel tests compiled for the GPU (Triton, not
# interpreted; the Hopper forward's tests first); the kernel benchmark (ours, Triton and Mosaic GPU
# forwards, vs cuDNN, XLA, JAX's reference Pallas kernel);
# the model's decoding on the kernels; the CPU-platform test suite under that machine's
# jax/flax (API compatibility, including the kernels in interpret mode); the default job on the GPU in bf16 and its compiled memory; and
# last the kernel benchmark's table again. Results go to $OUT (or ./gpu_check_out). Needs jax,
# flax, optax and orbax; ml-collections is installed from .gpu_wheels/ when missing (pip
# download ml-collections) - the kernel steps do not need it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
DEADLINE=420
# Seconds a step may take: its own limit, or what is left before the deadline if that is less.
budget() { local left=$((DEADLINE - SECONDS)); (( left < $1 )) && echo $((left > 5 ? left : 5)) || echo "$1"; }

"$PY" - <<'PYEOF' | tee "$OUT/versions.txt"
import jax, flax, optax, orbax.checkpoint as ocp, numpy
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, "numpy", numpy.__version__)
print("devices", jax.devices())
PYEOF
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | tee -a "$OUT/versions.txt"

echo "== Pallas kernel tests on the GPU (compiled: Mosaic GPU for test_flash_mgpu.py, Triton for the rest)"
JAX_PLATFORMS=cuda timeout "$(budget 150)" "$PY" -m pytest -q -p no:cacheprovider -rs -k "not tpu" tests/test_flash_mgpu.py \
  tests/test_kernels.py tests/test_block_sparse_kernel.py \
  2>&1 | tee "$OUT/kernel_tests_full.txt" | tail -25 | tee "$OUT/kernel_tests.txt"

echo "== kernel benchmark (bf16)"
BENCH_S=$(budget 270)  # rows stop starting 70 s before the kill, so the tables still print
JAX_PLATFORMS=cuda timeout "$BENCH_S" "$PY" scripts/bench_kernels.py --out "$OUT" --budget_s $((BENCH_S - 70)) \
  2>&1 | tee "$OUT/bench_kernels.txt" | grep -v '^{' | tail -60

if ! "$PY" -c "import ml_collections" 2>/dev/null; then
  "$PY" -m pip install --quiet --no-deps --no-index .gpu_wheels/*.whl || echo "ml-collections missing: skipping the trainer steps"
fi
echo "== the model's decoding on the Pallas kernels, and attention_impl=cudnn, compiled for the GPU"
JAX_PLATFORMS=cuda timeout "$(budget 60)" "$PY" -m pytest -q -p no:cacheprovider -rs -k "pallas or gpu-" \
  tests/test_decode.py 2>&1 | tail -8 | tee "$OUT/decode_tests.txt"
JAX_PLATFORMS=cuda timeout "$(budget 40)" "$PY" -m pytest -q -p no:cacheprovider -rs -k "cudnn" \
  tests/test_attention.py 2>&1 | tail -4 | tee "$OUT/cudnn_tests.txt"
echo "== CPU-platform tests under this machine's packages"
# (The Triton-lowering tests are for machines without CUDA; here the real compile above covers them.
# tests/test_scan.py is left out: it crashes XLA's CPU backend in jax 0.11.2, see BENCHMARKS.md.)
JAX_PLATFORMS=cpu timeout "$(budget 240)" "$PY" -m pytest -q -p no:cacheprovider -n 12 -k "not lowers_to_triton" \
  tests/test_config.py tests/test_decode.py tests/test_mesh.py tests/test_block_sparse.py \
  tests/test_attention.py tests/test_tasks.py tests/test_train.py tests/test_errors.py tests/test_kernels.py \
  tests/test_flash.py tests/test_sequence_parallel.py tests/test_models.py tests/test_kernels_tpu.py \
  tests/test_block_sparse_kernel.py tests/test_sparse_decode.py tests/test_flash_mgpu.py 2>&1 \
  | tail -15 | tee "$OUT/tests.txt"
echo "== default job on the GPU, bf16, attention through the Pallas kernel (attention_impl=auto)"
rm -rf /tmp/gpu_default
timeout "$(budget 200)" "$PY" -m trainer.train --config=configs/default.py --workdir=/tmp/gpu_default \
  --config.model.dtype=bfloat16 --config.model.attention_impl=auto --config.progress_bar=false 2>&1 | tail -12 \
  | tee "$OUT/train.txt"
cp /tmp/gpu_default/metrics.jsonl "$OUT/metrics.jsonl" 2>/dev/null
for IMPL in xla flash auto cudnn; do  # compiled memory of a 25M-param LM at T=4096: dense, blockwise, Pallas, cuDNN
  echo -n "attention_impl=$IMPL T=4096: " | tee -a "$OUT/dry_run.txt"
  timeout "$(budget 120)" "$PY" -m trainer.train --config=configs/default.py --workdir=/tmp/gpu_dry_$IMPL --dry_run \
    --config.model.dtype=bfloat16 --config.task.seq_len=4096 --config.model.d_model=512 --config.model.num_heads=8 \
    --config.model.num_layers=8 --config.model.attention_impl=$IMPL 2>&1 | tail -1 | tee -a "$OUT/dry_run.txt"
done

echo
echo "== summary ($SECONDS s in all)"
echo "kernel tests (GPU): $(grep -E 'passed|failed|error' "$OUT/kernel_tests.txt" | tail -1)"
echo "CPU-platform tests: $(grep -E 'passed|failed|error' "$OUT/tests.txt" | tail -1)"
echo "attention_impl=cudnn (GPU): $(grep -E 'passed|failed|error' "$OUT/cudnn_tests.txt" | tail -1)"
echo "default job (pallas): $(grep -E 'held-out' "$OUT/train.txt")"
cat "$OUT/dry_run.txt"
sed -n '/^## Attention TFLOP/,$p' "$OUT/bench_kernels.txt"
