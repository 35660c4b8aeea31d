#!/usr/bin/env bash
# One call on a GPU machine (about 9 minutes): every causal mixer trained on MQAR (Zoology's
# L=256, 16 pairs, vocab 8192; configs/mqar.py: an ungated conv layer, then the mixer, or the
# mixer in both layers for mamba and mamba2; tied embeddings) for the config's fixed budget of
# 1500 steps, all runs at once; then the mixer
# test files on that machine's jax (CPU platform, API compatibility); selective copying on request.
# Each step gets what is left of a $DEADLINE-second budget; the arena's tables (*.md), plots and logs go to $OUT.
#   SET=all|1|2       every causal mixer (default), or one half of them
#   MIXERS=a,b,c      these mixers on MQAR instead
#   STEPS=N PAR=K     MQAR steps per mixer (default 1500, the config's) and runs at a time (default 21)
#   EVAL_EVERY=N      MQAR held-out evaluation every N steps (default 250); a run cut by the
#                     deadline still reports its last evaluation
#   PARTS=a,b         a subset of mqar,selective_copy,tests (default: mqar,tests)
#   GRID=key=v1,v2    MQAR runs per mixer and value, e.g. GRID=optimizer.learning_rate=1e-3,3e-3
#                     (Zoology reports each mixer's best learning rate; the arena's table picks it by validation)
#   FRONT=conv|none   MQAR models: the config's layouts (default), or the mixer in both layers
#                     (`model.mixer_schedule=` empty, which wins over the config's per-mixer layouts)
#   SMOKE=1           the same steps with :smoke configs (a check of the script itself, any machine)
# Measured on an H200 (2026-11-27): 1500 selective-copy steps take ~45-55 s per run with three
# runs sharing the GPU. MQAR (2026-11-28): twenty runs at once made 30-66 steps/s each for the
# fast mixers and 7-20 for the slow ones (mamba, lmu, the sparse kernels), so 1500 steps fit
# the step's 400 s. With the conv layer and tied embeddings, exact attention reaches 0.99 by
# step 1000 on 2 CPU cores (BENCHMARKS.md); before them nothing but sla learned it in 6000 steps.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_mixers_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
DEADLINE="${DEADLINE:-540}"
budget() { local left=$((DEADLINE - SECONDS)); (( left < $1 )) && echo $((left > 5 ? left : 5)) || echo "$1"; }
if ! "$PY" -c "import ml_collections" 2>/dev/null; then
  "$PY" -m pip install --quiet --no-deps --no-index .gpu_wheels/*.whl || echo "ml-collections missing"
fi
"$PY" -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" | tee "$OUT/versions.txt"

SUFFIX=""; STEPS="${STEPS:-1500}"; SC_STEPS=3000; PAR="${PAR:-21}"; PARTS=",${PARTS:-mqar,tests},"
if [[ "${SMOKE:-0}" == 1 ]]; then SUFFIX=":smoke"; STEPS=4; SC_STEPS=4; PAR=2; fi
EVAL_EVERY="${EVAL_EVERY:-$(( STEPS < 250 ? STEPS : 250 ))}"
part() { [[ "$PARTS" == *",$1,"* ]]; }
FRONT_SET=()
case "${FRONT:-conv}" in
  conv) [[ -n "$SUFFIX" ]] && FRONT_SET=(--set model.num_layers=2 --set model.mixer_schedule=conv,mixer
                                        --set model.conv.gate=false --set model.conv.kernel=5) ;;  # :smoke has neither
  none) FRONT_SET=(--set model.mixer_schedule=) ;;
  *) echo "FRONT=${FRONT} is not conv or none" >&2; exit 2 ;;
esac
SET1=attention,mamba,mamba2,linear,sla,performer,transnormer,lmu,local,sparse_transformer,longformer
SET2=flash,bigbird,block_sparse,xattention,combiner,swin,ecoformer,reformer,sinkhorn,synthesizer
case "${SET:-all}" in
  all) MIXERS=${MIXERS:-$SET1,$SET2} ;;
  1) MIXERS=${MIXERS:-$SET1} ;;
  2) MIXERS=${MIXERS:-$SET2} ;;
  *) echo "SET=${SET} is not all, 1 or 2" >&2; exit 2 ;;
esac

if part mqar; then
echo "== MQAR, $STEPS steps per mixer, $PAR runs at a time, front layer: ${FRONT:-conv}"
timeout "$(budget 400)" "$PY" -m trainer.arena --task=configs/mqar.py$SUFFIX --mixers=$MIXERS --parallel=$PAR --quiet \
  --deadline_s=$(( $(budget 400) - 60 )) --root=/tmp/arena_mqar --set total_steps=$STEPS \
  --set eval_every=$EVAL_EVERY --set checkpoint_every=100000 "${FRONT_SET[@]}" ${GRID:+--grid "$GRID"} \
  > "$OUT/mqar.log" 2>&1
cp /tmp/arena_mqar/results.md "$OUT/mqar.md" 2>/dev/null; cp /tmp/arena_mqar/*.png "$OUT/" 2>/dev/null
cat "$OUT/mqar.md" 2>/dev/null || tail -20 "$OUT/mqar.log"
fi

if part selective_copy; then
echo "== selective copying, $SC_STEPS steps"
timeout "$(budget 100)" "$PY" -m trainer.arena --task=configs/selective_copy.py$SUFFIX --mixers=attention,linear,mamba,mamba2 \
  --parallel=4 --quiet --deadline_s=$(( $(budget 100) - 50 )) --root=/tmp/arena_sc --set total_steps=$SC_STEPS \
  --set eval_every=$SC_STEPS --set checkpoint_every=100000 > "$OUT/selective_copy.log" 2>&1
cp /tmp/arena_sc/results.md "$OUT/selective_copy.md" 2>/dev/null
cat "$OUT/selective_copy.md" 2>/dev/null || tail -20 "$OUT/selective_copy.log"
fi

if part tests; then
echo "== mixer tests on this machine's jax (CPU platform)"
JAX_PLATFORMS=cpu timeout "$(budget 90)" "$PY" -m pytest -q -p no:cacheprovider -n 12 \
  tests/test_linear.py tests/test_performer.py tests/test_ecoformer.py tests/test_transnormer.py tests/test_sla.py \
  tests/test_mamba.py tests/test_mamba2.py tests/test_lmu.py tests/test_lra_mixers.py tests/test_packing.py tests/test_scan_mixers.py \
  2>&1 | tail -8 | tee "$OUT/tests.txt"
fi
echo "== done in $SECONDS s"
