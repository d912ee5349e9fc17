#!/bin/bash
# Alternating processes of two code versions (/tmp/cold/clone at 527aa3c, /work/main at c19f46c), same venv, same machine.
. /tmp/cold/venv/bin/activate
export FLAXDEPTH_DATA=/work/shared/mnist
for round in 1 2; do
  for variant_depth in "elu_bn 48" "resnet 102"; do
    set -- $variant_depth
    for tree in /tmp/cold/clone /work/main; do
      name=$(basename $tree)
      (cd $tree && python -m flaxdepth.bench --variant $1 --depth $2 --replicas 1 --steps 3 --rounds 3 --compile-depths "" --json) > /tmp/ab/${1}_${name}_r${round}.json 2> /tmp/ab/${1}_${name}_r${round}.err
      echo "$(date +%T) $1 $name round $round rc=$?"
    done
  done
done
