#!/bin/bash
# Pipeline-choice sweeps of issue 3 (detector input policy, threshold, flipped TTA, uncertain
# margin), one job at a time, one worker. Configs live here; outputs go to reports/sweep/
# (git-ignored). Margin and threshold sweeps re-score saved runs with `evaluate --reuse`.
set -ex
cd "$(dirname "$0")/../.."
FG=.venv/bin/forensic-gender
DEV=../shared/data/dev
S=benchmarks/sweeps
O=reports/sweep
time $FG evaluate $DEV/wider --config $S/ms640.yaml --out $O/wider-640 --workers 1 --no-progress
time $FG evaluate $DEV/lfw $DEV/utkface $DEV/wider --config $S/t030.yaml --out $O/t030 --workers 1 --no-progress
for t in 0.35 0.4 0.5; do
  $FG evaluate $DEV/lfw $DEV/utkface $DEV/wider --reuse $O/t030 --config $S/th$t.yaml --out $O/th$t --no-progress
done
time $FG evaluate $DEV/lfw $DEV/utkface $DEV/wider --config $S/flip.yaml --out $O/flip --workers 1 --no-progress
for m in 0.0 0.05 0.1 0.15 0.2; do
  $FG evaluate $DEV/lfw $DEV/utkface $DEV/wider --reuse $O/flip --config $S/flip-m$m.yaml --out $O/flip-margin$m --no-progress
done
# Tiles only apply above 2 x max_side: test them on WIDER scenes upscaled 3x (about 7 MP).
.venv/bin/python $S/make_x3.py $DEV/wider /tmp/wider_x3
for c in "" tile1280 ms1920 ms2560; do
  time $FG evaluate /tmp/wider_x3 ${c:+--config $S/$c.yaml} --out $O/x3-${c:-notile} --workers 1 --no-progress
done
.venv/bin/python $S/dettime.py
