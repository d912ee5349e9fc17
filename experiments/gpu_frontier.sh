#!/usr/bin/env bash
# The depth frontier on a lent GPU, as one call (REPORT.md "Depth frontier"): the tanh network at
# the critical point of experiments/variants.toml (delta-orthogonal, Gaussian, delta-orthogonal at
# 16-64 channels) at k = 1,002, 3,000 and 10,002 on full MNIST, and the notebook's naive and
# Glorot-style inits (tanh, tanh_newinit) as controls at k = 1,002, every one at lr = 0.5 / k and
# 1.5 / k side by side (to two significant digits): the CPU frontier's 1.5 / k
# (experiments/sweeps.toml's frontier-cpu) and a third of it, since at k = 1,002 longer CPU runs at
# 1.5 / k and 1 / k fell back to chance in their second epoch (experiments/notes/depth_frontier.md,
# section 5).
# Usage there: bash experiments/gpu_frontier.sh DATA_DIR [ENGINE OPTIONS ...]
#   ENGINE OPTIONS go to every sweep unchanged, e.g. --rematerialize nested, --precision highest
#   (python -m flaxdepth.sweep --help); a row stores the options it trained with.
# Depth by depth, shallowest first, each variant's seeds trained together by python -m
# flaxdepth.sweep; a variant's first sweep checks it against torch_ref at a small depth. Progress:
# a timestamped line per sweep and per epoch; tqdm's bars and errors go to $OUT/log.txt.
# Resumable: the sweeps train into $RESULTS (default .gpu_results/frontier, ignored by git, seeded
# from experiments/results/gpu_frontier/ when absent) and reuse every finished run of this device,
# so a second call trains only what the first left. After every sweep the results files are copied
# to $OUT/gpu_frontier/ (so a kill at the call's limit keeps what finished): copy them into
# experiments/results/gpu_frontier/ and run python experiments/report.py.
# No sweep starts with less than MIN_SWEEP seconds left before CALL_LIMIT (default 570 s after the
# start, under a call's 600), and each is killed at CALL_LIMIT.
# Knobs: DEPTHS, VARIANTS, CONTROLS, CONTROL_DEPTHS, SEEDS (2), EPOCHS (3), LR_TIMES_DEPTH
# ("0.5 1.5": the lrs c / k, trained side by side) or LR (the lrs at every depth, comma-separated),
# BATCH_SIZE (256), LIMIT_TRAIN / LIMIT_TEST (unset: full MNIST), SKIP_PARITY, CALL_LIMIT,
# MIN_SWEEP (30), RESULTS.
set -u
DATA_DIR=${1:?usage: gpu_frontier.sh MNIST_DIR [ENGINE OPTIONS ...]}
shift
ENGINE=("$@")
OUT=${OUT:-gpu_out}; mkdir -p "$OUT/gpu_frontier"; OUT=$(realpath "$OUT")
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
DEPTHS=${DEPTHS:-1002 3000 10002}
VARIANTS=${VARIANTS:-tanh_critical_delta tanh_critical_gaussian tanh_critical_delta_wide}
CONTROLS=${CONTROLS-tanh tanh_newinit}
CONTROL_DEPTHS=${CONTROL_DEPTHS:-1002}
RESULTS=${RESULTS:-.gpu_results/frontier}
LIMITS=()
[ -n "${LIMIT_TRAIN:-}" ] && LIMITS+=(--limit-train "$LIMIT_TRAIN")
[ -n "${LIMIT_TEST:-}" ] && LIMITS+=(--limit-test "$LIMIT_TEST")
started=$(date +%s)
stamp() { echo "== $(date +%T) $*"; }
timestamped() { while IFS= read -r line; do echo "$(date +%T) $line"; done; }

if [ ! -d "$RESULTS" ]; then
    mkdir -p "$RESULTS"
    [ -d experiments/results/gpu_frontier ] && cp -p experiments/results/gpu_frontier/*.jsonl "$RESULTS"/ 2>/dev/null
fi
(nvidia-smi -L 2>/dev/null || true; nproc) | timestamped
stamp "depths $DEPTHS: $VARIANTS; controls $CONTROLS at $CONTROL_DEPTHS; engine options: ${ENGINE[*]:-none}"

checked=" "
failed=0
for depth in $DEPTHS; do
    names=$VARIANTS
    lr=${LR:-$(awk -v cs="${LR_TIMES_DEPTH:-0.5 1.5}" -v k=$depth \
        'BEGIN { n = split(cs, c, /[ ,]+/); for (i = 1; i <= n; i++) printf "%s%.2g", (i > 1 ? "," : ""), c[i] / k }')}
    case " $CONTROL_DEPTHS " in *" $depth "*) names="$names $CONTROLS" ;; esac
    for variant in $names; do
        left=$(( started + ${CALL_LIMIT:-570} - $(date +%s) ))
        if [ $left -lt ${MIN_SWEEP:-30} ]; then
            stamp "$variant k=$depth: not started, ${left} s left; rerun to continue"
            continue
        fi
        parity=(--skip-parity)
        case "$checked" in *" $variant "*) ;; *) [ -z "${SKIP_PARITY:-}" ] && parity=(); checked="$checked$variant " ;; esac
        stamp "$variant k=$depth lr=$lr (${left} s left)"
        timeout -k 10 $left python3 -m flaxdepth.sweep --variants-file experiments/variants.toml --variant "$variant" \
            --depths "$depth" --seeds ${SEEDS:-2} --epochs ${EPOCHS:-3} --lr "$lr" \
            --batch-size ${BATCH_SIZE:-256} --data-dir "$DATA_DIR" --out "$RESULTS" "${LIMITS[@]}" "${parity[@]}" \
            "${ENGINE[@]}" 2>>"$OUT/log.txt" | timestamped
        status=${PIPESTATUS[0]}
        [ "$status" -ne 0 ] && { failed=1; stamp "$variant k=$depth: exit status $status (log.txt)"; }
        cp -p "$RESULTS"/*.jsonl "$OUT/gpu_frontier/" 2>/dev/null
    done
done
stamp "done; results files in $OUT/gpu_frontier"
exit $failed
