#!/usr/bin/env bash
# The GPU checks and benchmarks, as one call on a lent GPU machine (see experiments/BENCHMARKS.md).
# Usage there: bash experiments/gpu_checks.sh DATA_DIR   (writes into $OUT, or ./gpu_out)
set -u
DATA_DIR=${1:?usage: gpu_checks.sh MNIST_DIR}
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi -L; python3 -c "import jax, torch, flax, optax; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__, 'flax', flax.__version__, 'optax', optax.__version__)"
bench() { name=$1; shift; timeout "$@" 2>>"$OUT/log.txt" | tee -a "$OUT/bench.jsonl"; }
[ -z "${SKIP_STEP:-}" ] && bench step 110 python3 -m flaxdepth.bench --variant elu_bn --depth 48 --replicas 32 --steps 10 --rounds 3 --compile-depths 30,300 --json
bench full ${FULL_TIMEOUT:-240} python3 -m flaxdepth.bench --full-run --variant elu_bn --depth 48 --replicas 16 --epochs ${FULL_EPOCHS:-3} --data-dir "$DATA_DIR" --json
timeout ${EXP_TIMEOUT:-320} python3 experiments/run.py --data-dir "$DATA_DIR" --time-budget ${EXP_BUDGET:-250} \
    --only pairs-faithful pairs-corrected torch-agreement 2>>"$OUT/log.txt" | tee "$OUT/experiments.txt"
tar czf "$OUT/results.tgz" experiments/results
tail -n 30 "$OUT/log.txt"
