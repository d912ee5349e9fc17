#!/usr/bin/env bash
# A/B of flaxdepth.bench: the code before the engine-options change (BASE tree) against the working
# tree (NEW), one process each, alternating, each process timing torch_ref beside flaxdepth.
set -u
BASE=/tmp/wt/base; NEW=/work/main; OUTDIR=${OUTDIR:-/tmp/ab}
run() {  # tree label args...
    local tree=$1 label=$2; shift 2
    (cd "$tree" && PYTHONPATH="$tree" timeout 1200 python -m flaxdepth.bench "$@" --json) >> "$OUTDIR/$label.jsonl" 2>>"$OUTDIR/log.txt"
    echo "$(date +%T) $label done: $(tail -n1 "$OUTDIR/$label.jsonl" | python -c 'import json,sys; d=json.loads(sys.stdin.read()); print({k: round(v,3) for k,v in d.items() if "speedup" in k or k.endswith("ms_per_step") or k.endswith("ms_per_step_replicas")})')"
}
case "${1:-on}" in
on)
    for round in 1 2; do
        run $BASE elu_bn_base --variant elu_bn --depth 48 --replicas 3 --steps 2 --rounds 5 --compile-depths ""
        run $NEW elu_bn_new --variant elu_bn --depth 48 --replicas 3 --steps 2 --rounds 5 --compile-depths ""
        run $NEW resnet_new --variant resnet --depth 102 --replicas 3 --steps 1 --rounds 5 --compile-depths ""
        run $BASE resnet_base --variant resnet --depth 102 --replicas 3 --steps 1 --rounds 5 --compile-depths ""
        [ "${ROUNDS:-1}" = 2 ] || break
    done ;;
off)
    FLAXDEPTH_CPU_KERNELS=0 run $BASE xla_fold_base --variant elu_bn --depth 48 --steps 2 --rounds 5 --compile-depths "" --cpu-devices 1
    run $NEW xla_plain_new --variant elu_bn --depth 48 --steps 2 --rounds 5 --compile-depths "" --cpu-devices 1 --no-cpu-kernels
    run $NEW xla_plain_new --variant elu_bn --depth 48 --steps 2 --rounds 5 --compile-depths "" --cpu-devices 1 --no-cpu-kernels
    FLAXDEPTH_CPU_KERNELS=0 run $BASE xla_fold_base --variant elu_bn --depth 48 --steps 2 --rounds 5 --compile-depths "" --cpu-devices 1 ;;
esac
