#!/usr/bin/env bash
# The GPU checks, experiments and benchmarks, as one call on a lent GPU machine (its device time is
# short and rationed, so every stage has a hard time limit). See benchmarks/BENCHMARKS.md and REPORT.md.
# Usage there: bash experiments/gpu_checks.sh DATA_DIR   (writes into $OUT, or ./gpu_out)
# Stages, in order (default time limits): smoke (75 s), conv formulations (60 s), whole-run benchmark
# (180 s), a profile of the replicated step (90 s), then experiments until CALL_LIMIT (default 560 s)
# seconds after the start, under a call's 600. The experiments train into .gpu_results/ (ignored by
# git; seeded from experiments/results/ when absent, so a second call on the same warm machine
# resumes the first); the results files they wrote come back as $OUT/results.tgz: extract it into
# experiments/results/ (tar xzf results.tgz -C experiments/results).
# Knobs: CALL_LIMIT, JOBS (sweeps at once), EXP_SWEEPS (sweeps.toml entries, run in that file's
# order) / EXP_VARIANTS (variants, run in the order given), SKIP_BENCH, FULL_REPLICAS / FULL_EPOCHS /
# FULL_TIMEOUT (whole-run benchmark), SKIP_SMOKE, SKIP_EXP, SKIP_CONV_BENCH / CONV_TIMEOUT (conv
# formulations), SKIP_PROFILE / PROFILE_TIMEOUT.
set -u
DATA_DIR=${1:?usage: gpu_checks.sh MNIST_DIR}
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"; OUT=$(realpath "$OUT")
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
stamp() { echo "== $(date +%T) $*"; }
started=$(date +%s)
nvidia-smi -L; nproc
python3 -c "import jax, torch, flax, optax; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__, 'flax', flax.__version__, 'optax', optax.__version__)"

if [ -z "${SKIP_SMOKE:-}" ]; then
    stamp "smoke: a tiny sweep through the sharded engine on this GPU"
    timeout 75 python3 -m flaxdepth.sweep --variant elu_bn --depths 3 --seeds 3 --epochs 1 --limit-train 512 \
        --limit-test 256 --quiet --out /tmp/smoke --data-dir "$DATA_DIR" > /tmp/smoke.log 2>&1
    if [ $? -ne 0 ]; then  # no training on an engine that fails here: the device minutes go to the log
        tail -n 20 /tmp/smoke.log; echo "SMOKE FAILED: experiments skipped"; SKIP_EXP=1
    else
        tail -n 4 /tmp/smoke.log
    fi
fi

if [ -z "${SKIP_CONV_BENCH:-}" ]; then
    stamp "replicated 3x3 convolutions, formulation by formulation (benchmarks/conv_formulations.py)"
    timeout ${CONV_TIMEOUT:-60} python3 benchmarks/conv_formulations.py --replicas ${FULL_REPLICAS:-32} --rounds 3 \
        --json | tee "$OUT/conv_formulations.jsonl"
fi

if [ -z "${SKIP_BENCH:-}" ]; then
    stamp "whole-run benchmark: the notebook's loop vs replicas through train_replicas"
    timeout ${FULL_TIMEOUT:-180} python3 -m flaxdepth.bench --full-run --variant elu_bn --depth 48 \
        --replicas ${FULL_REPLICAS:-32} --epochs ${FULL_EPOCHS:-3} --data-dir "$DATA_DIR" --json \
        2>>"$OUT/log.txt" | tee -a "$OUT/bench.jsonl"
    tail -n 20 "$OUT/log.txt"
fi

if [ -z "${SKIP_PROFILE:-}" ]; then
    stamp "where the ${FULL_REPLICAS:-32}-replica step's time goes (benchmarks/profile_step.py)"
    timeout ${PROFILE_TIMEOUT:-90} python3 benchmarks/profile_step.py --variant elu_bn --depth 48 \
        --replicas ${FULL_REPLICAS:-32} --json > "$OUT/profile_step.json" 2>>"$OUT/log.txt" &&
        python3 -c "import json, sys; d = json.load(open(sys.argv[1])); print(d['device_ms_per_step'], 'ms ops /',
            d['wall_ms_per_step'], 'ms wall per step;', {k: round(c['share'], 3) for k, c in d['classes'].items()})" \
            "$OUT/profile_step.json"
fi

if [ -z "${SKIP_EXP:-}" ]; then
    EXP_SWEEPS=${EXP_SWEEPS:-pairs-faithful pairs-corrected torch-agreement precision-highest precision-highest-torch \
        search-faithful search-corrected adaptive-faithful adaptive-corrected}
    EXP_VARIANTS=${EXP_VARIANTS:-tanh resnet_nobn tanh_newinit elu tanh_bn_oldinit elu_bn elu_multihead resnet}
    RESULTS=.gpu_results  # seeded once per machine; .seeded marks the time of the seed
    [ -d $RESULTS ] || { cp -rp experiments/results $RESULTS && touch $RESULTS/.seeded; }
    exp_limit=$(( started + ${CALL_LIMIT:-560} - $(date +%s) - 10 ))  # 10 s for the last save
    if [ $exp_limit -lt 60 ]; then
        stamp "experiments skipped: ${exp_limit} s left before CALL_LIMIT"
    else
        stamp "experiments for ${exp_limit} s: $EXP_SWEEPS ($EXP_VARIANTS) in ${JOBS:-6} workers"
        # The results files this machine wrote (newer than the seed; hidden temporary files left
        # out) come back as a tarball, refreshed every 20 s, written aside and then renamed: a kill
        # at the call's limit keeps what finished.
        save() { (cd $RESULTS && find . -type f -newer .seeded ! -name '.*' -print0 |
                  tar czf "$OUT/results.tgz.part" --null -T -) && mv "$OUT/results.tgz.part" "$OUT/results.tgz"; }
        ( trap 'exit 0' TERM; while sleep 20 & wait $!; do save; done ) >/dev/null 2>&1 & saver=$!
        # timeout signals run.py's process group, its spawned workers included; KILL 10 s later
        timeout -k 10 $exp_limit python3 experiments/run.py --data-dir "$DATA_DIR" --jobs ${JOBS:-6} --out $RESULTS \
            --time-budget $(( exp_limit - 20 )) --only $EXP_SWEEPS --variants $EXP_VARIANTS > "$OUT/experiments.txt" 2>&1
        kill $saver; wait $saver  # a save the kill cuts short leaves only its .part; the save below redoes it
        tail -n 30 "$OUT/experiments.txt"
        save
    fi
fi
stamp done
