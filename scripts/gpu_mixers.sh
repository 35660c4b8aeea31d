#!/usr/bin/env bash
# One call on a GPU machine (under 9 minutes): the mixer test files on that machine's jax (CPU
# platform, API compatibility), then every causal mixer trained on MQAR (Zoology's L=256, 16 pairs)
# for a fixed budget (after mamba / attention / linear on selective copying). Tables go to $OUT.
# SMOKE=1 runs the same steps with :smoke configs (a check of the script itself, on any machine).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_mixers_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
DEADLINE="${DEADLINE:-380}"
budget() { local left=$((DEADLINE - SECONDS)); (( left < $1 )) && echo $((left > 5 ? left : 5)) || echo "$1"; }
if ! "$PY" -c "import ml_collections" 2>/dev/null; then
  "$PY" -m pip install --quiet --no-deps --no-index .gpu_wheels/*.whl || echo "ml-collections missing"
fi
"$PY" -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" | tee "$OUT/versions.txt"

SUFFIX=""; STEPS=1000; SC_STEPS=1500; PAR=10
if [[ "${SMOKE:-0}" == 1 ]]; then SUFFIX=":smoke"; STEPS=4; SC_STEPS=4; PAR=2; fi

echo "== mixer tests on this machine's jax (CPU platform)"
JAX_PLATFORMS=cpu timeout "$(budget 120)" "$PY" -m pytest -q -p no:cacheprovider -n 12 \
  tests/test_linear.py tests/test_performer.py tests/test_ecoformer.py tests/test_transnormer.py tests/test_sla.py \
  tests/test_mamba.py tests/test_lmu.py tests/test_lra_mixers.py tests/test_packing.py 2>&1 | tail -8 \
  | tee "$OUT/tests.txt"

MIXERS=${MIXERS:-attention,flash,linear,mamba,performer,transnormer,sla,ecoformer,lmu,local,bigbird,block_sparse,xattention,sparse_transformer,longformer,combiner,swin,reformer,sinkhorn,synthesizer}
echo "== selective copying, $SC_STEPS steps"
timeout "$(budget 110)" "$PY" scripts/sweep.py --config=configs/selective_copy.py$SUFFIX --mixers=attention,linear,mamba \
  --parallel=3 --deadline_s=$(( $(budget 110) - 10 )) --workdir_root=/tmp/sweep_sc --set total_steps=$SC_STEPS \
  --set eval_every=$SC_STEPS --set checkpoint_every=100000 2>&1 | tail -6 | tee "$OUT/selective_copy.txt"
echo "== MQAR, $STEPS steps per mixer, $PAR runs at a time"
timeout "$(budget 220)" "$PY" scripts/sweep.py --config=configs/mqar.py$SUFFIX --mixers=$MIXERS --parallel=$PAR \
  --deadline_s=$(( $(budget 220) - 15 )) --workdir_root=/tmp/sweep_mqar --set total_steps=$STEPS \
  --set eval_every=$STEPS --set checkpoint_every=100000 2>&1 | tail -25 | tee "$OUT/mqar.txt"

echo "== done in $SECONDS s"
