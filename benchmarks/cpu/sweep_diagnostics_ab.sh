#!/usr/bin/env bash
# The cost of `python -m flaxdepth.sweep --diagnostics`: the same sweep without and with it, one
# process and one fresh results folder each, alternating. Prints each process's wall time and, from
# its rows, the runs' training time (wall_s) and the measuring time (diagnostics.wall_s) per depth.
# TREE: the code measured (default: this repository); OUTDIR: where the results folders go.
set -u
TREE=${TREE:-$(cd "$(dirname "$0")/../.." && pwd)}; OUTDIR=${OUTDIR:-/tmp/sweep_diagnostics_ab}
mkdir -p "$OUTDIR"
run() {  # label flags... (after the sweep's arguments)
    local label=$1; shift
    local out; out=$(mktemp -d "$OUTDIR/$label.XXXX")
    local start; start=$(date +%s.%N)
    (cd "$TREE" && PYTHONPATH="$TREE" python -m flaxdepth.sweep --variant elu_bn --skip-parity --quiet --out "$out" \
        "$@") > /dev/null 2>> "$OUTDIR/log.txt"
    python - "$out" "$label" "$start" "$(date +%s.%N)" <<'PY'
import glob, json, sys
rows = [json.loads(line) for path in glob.glob(sys.argv[1] + "/*.jsonl") for line in open(path)]
depths = sorted({row["depth"] for row in rows})
total = lambda key, depth: sum(key(row) for row in rows if row["depth"] == depth)
print(f"{sys.argv[2]:<12} process {float(sys.argv[4]) - float(sys.argv[3]):6.1f} s; per depth, runs' wall_s / "
      "diagnostics wall_s: " + ", ".join(
          f"k={d} {total(lambda r: r['wall_s'], d):.1f} / {total(lambda r: r.get('diagnostics', {}).get('wall_s', 0), d):.2f} s"
          for d in depths))
PY
}
SMALL=(--depths 6,24 --seeds 3 --epochs 1 --limit-train 10240 --limit-test 2048)
FULL=(--depths 12 --seeds 3 --epochs 1)  # one epoch of all 60000 images, 10000 test images
for round in 1 2; do
    run small_plain "${SMALL[@]}"
    run small_diag "${SMALL[@]}" --diagnostics
done
run full_plain "${FULL[@]}"
run full_diag "${FULL[@]}" --diagnostics
