#!/usr/bin/env bash
# head vs head+tail (vs tail) truncation on the same budget, same seed, same split (docs/user_paths.md).
#   bash bench/compare_truncation.sh OUT_DIR [extra train_loop flags...]   (later flags override the budget)
#   SIDES="head head+tail" PYTHON=.venv/bin/python bash bench/compare_truncation.sh /tmp/trunc
# Prints one line per side: accuracy, balanced accuracy, training seconds; each run's metrics.json stays in OUT_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=$1; shift
PY=${PYTHON:-python3}
mkdir -p "$OUT"
for side in ${SIDES:-head head+tail tail}; do
  run="$OUT/${side/+/_}"
  $PY train_loop.py --dataset embedded:imdb --max_length 128 --max_train_samples 3000 --max_eval_samples 1000 \
    --num_epochs 1 --seed 42 --truncation "$side" --output_dir "$run" --overwrite "$@" > "$run.log" 2>&1 \
    || { echo "$side: failed (see $run.log)"; tail -n 5 "$run.log"; continue; }
  $PY - "$side" "$run/metrics.json" <<'PYEOF'
import json, sys
m = json.load(open(sys.argv[2]))
print(f"{sys.argv[1]:<10} accuracy {m['final']['accuracy']:.4f}  balanced {m['final']['balanced_accuracy']:.4f}  "
      f"train {m['train_seconds']:.0f} s  steps {m['optimizer_steps']}")
PYEOF
done
