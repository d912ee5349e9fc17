#!/usr/bin/env bash
# The GPU checks, experiments and benchmarks, as one call on a lent GPU machine (15 device minutes a
# session, so every stage has a hard time limit). See experiments/BENCHMARKS.md and REPORT.md.
# Usage there: bash experiments/gpu_checks.sh DATA_DIR   (writes into $OUT, or ./gpu_out)
# Stages, in order (default time limits): smoke (90 s), conv formulations (75 s), whole-run benchmark
# (180 s), experiments (200 s): 545 s at most, under a call's 600. The experiments' results come
# back as $OUT/results.tgz.
# Knobs: EXP_BUDGET / EXP_TIMEOUT (experiments: no new sweep after / kill after, seconds), JOBS
# (sweeps at once), EXP_SWEEPS / TORCH_VARIANTS / SEARCH_VARIANTS (what runs), SKIP_BENCH,
# EXP_VARIANTS, FULL_REPLICAS / FULL_EPOCHS / FULL_TIMEOUT (whole-run benchmark), SKIP_SMOKE, SKIP_EXP,
# SKIP_CONV_BENCH / CONV_TIMEOUT (conv formulations). Every stage runs under its own timeout: keep their
# sum under the call's.
set -u
DATA_DIR=${1:?usage: gpu_checks.sh MNIST_DIR}
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
stamp() { echo "== $(date +%T) $*"; }
nvidia-smi -L; nproc
python3 -c "import jax, torch, flax, optax; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__, 'flax', flax.__version__, 'optax', optax.__version__)"

if [ -z "${SKIP_SMOKE:-}" ]; then
    stamp "smoke: a tiny sweep through the sharded engine on this GPU"
    timeout 90 python3 -m flaxdepth.sweep --variant elu_bn --depths 3 --seeds 3 --epochs 1 --limit-train 512 \
        --limit-test 256 --quiet --out /tmp/smoke --data-dir "$DATA_DIR" > /tmp/smoke.log 2>&1
    if [ $? -ne 0 ]; then  # .fallback/ (carried, not committed): the engine last run on a GPU
        tail -n 8 /tmp/smoke.log; [ -d .fallback ] && { echo "FALLBACK to .fallback"; export PYTHONPATH=$PWD/.fallback:$PWD; }
    fi
    tail -n 4 /tmp/smoke.log
fi

if [ -z "${SKIP_CONV_BENCH:-}" ]; then
    stamp "replicated 3x3 convolutions, formulation by formulation (experiments/conv_formulations.py)"
    timeout ${CONV_TIMEOUT:-75} python3 experiments/conv_formulations.py --replicas ${FULL_REPLICAS:-32} --rounds 3 \
        --json | tee "$OUT/conv_formulations.jsonl"
fi

if [ -z "${SKIP_BENCH:-}" ]; then
    stamp "whole-run benchmark: the notebook's loop vs replicas through train_replicas"
    timeout ${FULL_TIMEOUT:-180} python3 -m flaxdepth.bench --full-run --variant elu_bn --depth 48 \
        --replicas ${FULL_REPLICAS:-32} --epochs ${FULL_EPOCHS:-3} --data-dir "$DATA_DIR" --json \
        2>>"$OUT/log.txt" | tee -a "$OUT/bench.jsonl"
    tail -n 20 "$OUT/log.txt"
fi

if [ -z "${SKIP_EXP:-}" ]; then
    stamp "experiments: ${EXP_SWEEPS:=pairs-faithful pairs-corrected} (${EXP_VARIANTS:=all variants}) in ${JOBS:-3} workers;" \
        "beside them torch agreement (${TORCH_VARIANTS=elu_bn resnet_nobn}), then searches (${SEARCH_VARIANTS=tanh tanh_newinit elu resnet_nobn})"
    # results come back as a tarball, refreshed every 20 s (written aside, then renamed): a kill at
    # the call's limit keeps what finished
    save() { tar czf "$OUT/results.tgz.part" experiments/results && mv "$OUT/results.tgz.part" "$OUT/results.tgz"; }
    ( trap 'exit 0' TERM; while sleep 20 & wait $!; do save; done ) >/dev/null 2>&1 & saver=$!
    budget_end=$(( $(date +%s) + ${EXP_BUDGET:-150} ))  # no sweep starts after this, in either branch
    [ "$EXP_VARIANTS" = "all variants" ] && EXP_VARIANTS=
    timeout ${EXP_TIMEOUT:-200} python3 experiments/run.py --data-dir "$DATA_DIR" --jobs ${JOBS:-3} \
        --time-budget ${EXP_BUDGET:-150} --only $EXP_SWEEPS ${EXP_VARIANTS:+--variants $EXP_VARIANTS} \
        > "$OUT/experiments.txt" 2>&1 & first=$!
    timeout ${EXP_TIMEOUT:-200} bash -c "
        [ -n '$TORCH_VARIANTS' ] && python3 experiments/run.py --data-dir '$DATA_DIR' --only torch-agreement \
            --variants $TORCH_VARIANTS
        [ -n '$SEARCH_VARIANTS' ] && python3 experiments/run.py --data-dir '$DATA_DIR' --only search-faithful \
            --variants $SEARCH_VARIANTS --time-budget \$(( $budget_end - \$(date +%s) ))" > "$OUT/experiments_torch_search.txt" 2>&1 & second=$!
    wait $first $second; kill $saver; wait $saver  # the saver finishes a save in progress first
    pkill -9 -f multiprocessing.spawn; pkill -9 -f experiments/run.py  # workers a timeout left behind
    tail -n 20 "$OUT/experiments.txt" "$OUT/experiments_torch_search.txt"
    save
fi
stamp done
