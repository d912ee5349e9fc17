#!/usr/bin/env bash
# Where the replicated GPU step's time goes, and which engine settings shorten it: one call on a lent
# GPU machine (benchmarks/BENCHMARKS.md records its results). Writes into $OUT (or ./gpu_out).
#   bash benchmarks/gpu_step_variants.sh [VARIANT DEPTH]        (default: elu_bn 48)
# 1. benchmarks/profile_step.py on the 32-replica step: device operation time against wall time,
#    by class of operation (about 20 s).
# 2. `python -m flaxdepth.bench` (step mode, torch_ref timed in the same process each time) under
#    each setting of SETTINGS below, one process each (XLA flags are read once per process; about
#    35 s each on an H200 at elu_bn k=48).
# 3. With DATA_DIR set: the whole-run benchmark (--full-run, 3 epochs) under the first setting (the
#    baseline) and under the setting with the fastest model step among those with the baseline's
#    replica count, if that is another one (about 120 s each at 32 replicas, 200 s at 64).
# Each stage has its own time limit, and a stage that could end past CALL_LIMIT (default 560 s after
# the start, under a call's 600) is skipped; a setting that fails (an XLA flag this jaxlib lacks)
# only loses its own row. Exits 1 if no step benchmark finished. Knobs: SETTINGS (newline-separated
# "name|XLA_FLAGS|bench arguments", engine options among the arguments, e.g. --replicas-per-block 8),
# SKIP_PROFILE, STAGE_TIMEOUT
# (default 100 s), DATA_DIR, FULL_TIMEOUT (default 150 s), FULL_ARGS (more whole-run benchmark
# arguments, e.g. --limit-train N). tests/test_experiments_run.py runs it on a CPU, tiny.
set -u
VARIANT=${1:-elu_bn}; DEPTH=${2:-48}
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"; OUT=$(realpath "$OUT")
[ -z "${DATA_DIR:-}" ] || DATA_DIR=$(realpath "$DATA_DIR")
cd "$(dirname "$0")/.."  # the repository root
rm -f "$OUT/step_variants.jsonl" "$OUT/full_run.jsonl"  # this call's rows only
started=$(date +%s)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
stamp() { echo "== $(date +%T) $*"; }
nvidia-smi -L
python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__)"

if [ -z "${SKIP_PROFILE:-}" ]; then
    stamp "profile of the 32-replica step"
    timeout -k 10 ${STAGE_TIMEOUT:-100} python3 benchmarks/profile_step.py --variant $VARIANT --depth $DEPTH \
        --replicas 32 --json > "$OUT/profile_step.json" 2>>"$OUT/log.txt" &&
        python3 - "$OUT/profile_step.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
steps = d["steps"]
print(f"{d['device_ms_per_step']:.1f} ms of operations / {d['wall_ms_per_step']:.1f} ms wall per step "
      f"(traced); lines {d['trace_lines']}")
for label, c in d["classes"].items():
    print(f"  {label:<14} {c['ms'] / steps:8.2f} ms/step {100 * c['share']:5.1f}%")
for k in d["kinds"][:15]:
    print(f"  {k['kind'][:60]:<60} {k['ms'] / steps:8.2f} ms/step x{k['count'] // steps}")
EOF
fi

# bench_row FILE TIME_LIMIT NAME XLA_FLAGS BENCH_ARGS [MORE ARGS...]: one benchmark process;
# its JSON, tagged with the setting, is appended to FILE; a failure prints the end of the log instead
bench_row() {
    local file=$1 limit=$2 name=$3 flags=$4 bench_args=$5; shift 5
    if [ $(( $(date +%s) + limit )) -gt $(( started + ${CALL_LIMIT:-560} )) ]; then
        echo "$name: skipped (its ${limit} s could end past CALL_LIMIT)"; return
    fi
    if result=$(XLA_FLAGS="$flags" timeout -k 10 $limit python3 -m flaxdepth.bench --variant $VARIANT \
            --depth $DEPTH $bench_args "$@" --json 2>>"$OUT/log.txt" </dev/null); then
        echo "$result" | python3 -c "import json, sys; d = json.loads(sys.stdin.read())
d.update(setting=sys.argv[1], xla_flags=sys.argv[2], bench_args=sys.argv[3]); print(json.dumps(d))" \
            "$name" "$flags" "$bench_args" | tee -a "$file"
    else
        echo "$name: failed (exit $?; see log.txt)"; tail -n 3 "$OUT/log.txt"
    fi
}

# Default: the engine as it is (the first row: the whole-run baseline), the engine recomputing the
# scanned layers' BatchNorm and activation in the backward pass (--rematerialize), other block
# sizes, and more replicas. With no effect on the step (BENCHMARKS.md, 2026-11-27, H200):
# --xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL and
# --xla_gpu_enable_while_loop_unrolling=WHILE_LOOP_UNROLLING_FULL_UNROLL.
DEFAULT_SETTINGS="r32||--replicas 32
r32_remat||--replicas 32 --rematerialize
r32_b16||--replicas 32 --replicas-per-block 16
r32_b4||--replicas 32 --replicas-per-block 4
r64||--replicas 64"
while IFS='|' read -r name flags bench_args; do
    [ -n "$name" ] || continue
    stamp "step benchmark: $name (XLA_FLAGS='$flags', $bench_args)"
    bench_row "$OUT/step_variants.jsonl" ${STAGE_TIMEOUT:-100} "$name" "$flags" "$bench_args" \
        --steps 5 --rounds 3 --compile-depths ''
done <<< "${SETTINGS:-$DEFAULT_SETTINGS}"

stamp "summary (per model step, torch_ref's one model step timed in each process)"
[ -f "$OUT/step_variants.jsonl" ] || { echo "no step benchmark finished"; exit 1; }
python3 - "$OUT/step_variants.jsonl" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    d = json.loads(line)
    print(f"{d['setting']:<20} R={d['replicas']:<3} {d['jax_ms_per_step_replicas']:8.1f} ms/step "
          f"{d['jax_ms_per_model_step_replicas']:6.2f} ms/model  torch {d['torch_ms_per_step']:5.1f} ms  "
          f"speedup {d['speedup_replicas']:5.2f}x")
EOF

if [ -n "${DATA_DIR:-}" ]; then
    # the baseline (first row) and the fastest setting per model step at its replica count (a larger
    # count's whole run takes longer than a stage may), one line each: name|flags|bench args
    full_settings=$(mktemp); trap 'rm -f "$full_settings"' EXIT
    python3 - "$OUT/step_variants.jsonl" > "$full_settings" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
fastest = min((d for d in rows if d["replicas"] == rows[0]["replicas"]),
              key=lambda d: d["jax_ms_per_model_step_replicas"])
for d in [rows[0]] + ([fastest] if fastest is not rows[0] else []):
    print(f"{d['setting']}|{d['xla_flags']}|{d['bench_args']}")
EOF
    while IFS='|' read -r name flags bench_args; do
        stamp "whole-run benchmark (3 epochs, torch_ref's notebook loop in the same process): $name"
        bench_row "$OUT/full_run.jsonl" ${FULL_TIMEOUT:-150} "$name" "$flags" "$bench_args" --full-run \
            --epochs 3 --data-dir "$DATA_DIR" ${FULL_ARGS:-}
    done < "$full_settings"
    [ -f "$OUT/full_run.jsonl" ] && python3 - "$OUT/full_run.jsonl" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    d = json.loads(line)
    print(f"whole run {d['setting']:<16} R={d['replicas']:<3} torch {d['torch_notebook_loop_s']:5.1f} s  "
          f"jax {d['jax_run_s']:5.1f} s + {d['jax_compile_s']:4.1f} s compile  "
          f"speedup per model {d['speedup_per_model']:5.2f}x ({d['speedup_per_model_with_compile']:5.2f}x with compile)")
EOF
fi
stamp done
