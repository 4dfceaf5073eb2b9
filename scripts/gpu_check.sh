#!/usr/bin/env bash
# The whole GPU proof in one command (issue #11): every GPU path run once, and our loop's GPU figures
# side by side with the Trainer's. GPU time is scarce, so every step is time-boxed and the whole check
# fits BUDGET seconds (8 minutes on an H100); one hung step cannot eat the rest.
#
#   bash scripts/gpu_check.sh --kit gpu_kit            # on the GPU machine (the kit carried along)
#   bash scripts/gpu_check.sh --dry-run                # anywhere: the plumbing, GPU steps "skipped: no CUDA"
#
# Options: --kit DIR (default gpu_kit; see scripts/gpu_kit.py), --out DIR (default $OUT, else a new
# gpu_check_out/<UTC time>; must be new or empty), --budget SECONDS (default 480), --dry-run, --bundle
# (all but the two summaries in one .tar.gz: the device tool brings back 8 files at most), --only
# STEP,STEP (run only these GPU steps: a second call after a fix), --tests "GROUP;GROUP" (what gpu-tests
# runs: pytest targets, the groups side by side; default below). Writes to the out dir: gpu_check.md
# (the tables), gpu_check.json (every figure), logs/<step>.log, and the runs' metrics and bench results.
# Exits non-zero if any step failed or ran out of time.
#
# Where the 8 minutes go on an H100 (seconds; measured there on 2026-11-26 where a figure is given,
# else estimated): kit-unpack 8-11, kit-locate 14-24, gpu-tests about 90 (its slowest group, ZeRO-3,
# took 72-82 alone; the three groups took 165-218 one after the other), default-job 58, bench-rt about
# 70 (one process, three arms of 13-17 s each), profile about 25, bench-imdb about 60, qlora-job about
# 70, qlora-reload about 20: about 425 in all. Each step's cap below is its own limit; the budget cuts
# the last ones short if earlier ones ran long, and what they measured still comes back.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
KIT="" OUT_DIR=${OUT:-gpu_check_out/$(date -u +%Y%m%d-%H%M%S)} BUDGET=480 DRY_RUN=0 BUNDLE=0 ONLY=""
# The GPU tests in three groups run side by side (scripts/pytest_groups.py): FSDP2, ZeRO-3, the rest.
TESTS="tests/gpu/test_backends.py -k fsdp2;tests/gpu/test_backends.py -k deepspeed;tests/gpu/test_single_gpu.py"
while (($#)); do
  case $1 in
    --kit) KIT=$2; shift 2 ;;
    --out) OUT_DIR=$2; shift 2 ;;
    --budget) BUDGET=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --bundle) BUNDLE=1; shift ;;
    --only) ONLY=",$2,"; shift 2 ;;
    --tests) TESTS=$2; shift 2 ;;
    *) echo "usage: $0 [--kit DIR] [--out DIR] [--budget SECONDS] [--dry-run] [--bundle] [--only STEP,STEP] [--tests 'GROUP;GROUP']" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
# The out dir is written into and, with --bundle, tidied: so it must hold nothing of anyone else's.
# An empty name (`--out "$UNSET"`) would be the current folder: refused too.
if [[ -z $OUT_DIR ]]; then
  echo "error: --out is empty; give the name of a new or empty folder" >&2
  exit 2
fi
if [[ -e $OUT_DIR && ( ! -d $OUT_DIR || -n $(ls -A "$OUT_DIR") ) ]]; then
  echo "error: --out $OUT_DIR already exists and is not an empty folder; give a new or empty one" >&2
  exit 2
fi
mkdir -p "$OUT_DIR/logs" && OUT_DIR=$(cd "$OUT_DIR" && pwd) || { echo "error: cannot create --out $OUT_DIR" >&2; exit 2; }
WORK=$(mktemp -d)  # unpacked kit and full training outputs (checkpoints stay here: only figures go to OUT)
trap 'rm -rf "$WORK"' EXIT
DEADLINE=$(( $(date +%s) + BUDGET ))
: > "$OUT_DIR/steps.jsonl"
export PYTHONPATH="$WORK/site:$ROOT" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg

CUDA=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if ((!DRY_RUN && !CUDA)); then
  echo "error: no CUDA GPU here; run with --dry-run to check the plumbing only" >&2
  exit 2
fi
if ((DRY_RUN && !CUDA)); then SKIP_GPU="no CUDA"; elif ((DRY_RUN)); then SKIP_GPU="dry run"; else SKIP_GPU=""; fi

# step NAME MAX_SECONDS gpu|cpu CMD...: runs CMD under `timeout` (its own cap, or what is left of the
# budget if less), logs to logs/NAME.log and appends {name, status, seconds, limit_s} to steps.jsonl.
step() {
  local name=$1 cap=$2 kind=$3 status; shift 3
  local left=$(( DEADLINE - $(date +%s) ))
  (( cap > left )) && cap=$left
  if [[ $kind == gpu && -n $SKIP_GPU ]]; then
    status="skipped: $SKIP_GPU"
  elif [[ $kind == gpu && -n $ONLY && $ONLY != *",$name,"* ]]; then
    status="skipped: not in --only"
  elif (( cap < 5 )); then
    status="failed: no time left in the ${BUDGET} s budget"
  fi
  local started=$(date +%s%N) rc=0
  if [[ -z ${status:-} ]]; then
    echo "== $name (at most ${cap} s)"
    timeout --kill-after=10 "$cap" "$@" > "$OUT_DIR/logs/$name.log" 2>&1 || rc=$?
    case $rc in
      0) status=passed ;;
      124|137) status="failed: timed out after ${cap} s" ;;
      *) status="failed: exit $rc (logs/$name.log)"; tail -n 5 "$OUT_DIR/logs/$name.log" ;;
    esac
  fi
  local ms=$(( ($(date +%s%N) - started) / 1000000 ))
  echo "   $name: $status ($(( ms / 1000 )) s)"
  printf '{"name": "%s", "status": "%s", "seconds": %d.%03d, "limit_s": %d}\n' "$name" "$status" \
    $(( ms / 1000 )) $(( ms % 1000 )) "$cap" >> "$OUT_DIR/steps.jsonl"
}

# 0. The kit: what this machine lacks (model, data, wheels), unpacked to $WORK/site. A dry run without
# --kit builds a small offline one first (no wheels), which also runs the builder's size check.
if [[ -z $KIT ]] && ((DRY_RUN)); then
  KIT=$WORK/kit
  step kit-build 120 cpu $PY scripts/gpu_kit.py build --out "$KIT" --no-wheels --imdb_rows 1000
fi
KIT=${KIT:-gpu_kit}
step kit-unpack 60 cpu $PY scripts/gpu_kit.py unpack --kit "$KIT" --into "$WORK"
step kit-locate 45 cpu $PY scripts/gpu_kit.py locate --site "$WORK/site"

step device-info 20 gpu nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv

# 1. The GPU-only tests: bf16, fused AdamW, pinned workers, compile, MFU/peak memory, QLoRA, backends.
IFS=';' read -ra TEST_GROUPS <<< "$TESTS"
step gpu-tests 130 gpu $PY scripts/pytest_groups.py "$OUT_DIR" "${TEST_GROUPS[@]}"

# 2. The default job, unchanged (bf16 on this GPU), against the CPU run in the README.
RUNS=$WORK/runs
step default-job 100 gpu $PY train_loop.py --output_dir "$RUNS/default"

# 3. The bench side by side: our loop vs Trainer defaults vs Trainer + group_by_length, same job
# (RT, MiniLM, one epoch, batch 32, max length 128); then IMDB at max length 512 with batch 128 (a
# card-sized batch; 6,400 reviews keep it at 50 steps).
step bench-rt 110 gpu $PY bench/bench_speed.py --arms a c d --output "$OUT_DIR/bench_rt.md"
# Where a step of our loop spends its time, operator by operator (CPU and CUDA), after the bench:
# whatever host work of ours is left shows up here.
step profile 45 gpu $PY bench/profile_step.py --steps 20 --top 25
step bench-imdb 90 gpu $PY bench/bench_speed.py --dataset embedded:imdb --max_length 512 --batch_size 128 \
  --max_train_samples 6400 --max_eval_samples 1000 --arms a c d --output "$OUT_DIR/bench_imdb.md"

# 4. QLoRA: the default job on a 4-bit base; then the adapter reloaded with plain PEFT (full-precision
# base, as eval.py does) and evaluated.
step qlora-job 110 gpu $PY train_loop.py --load_in_4bit --output_dir "$RUNS/qlora"
step qlora-reload 45 gpu bash -c "$PY eval.py --adapter_dir '$RUNS/qlora' > '$OUT_DIR/qlora_reload.json'"

for run in default qlora; do  # the figures, not the adapters and checkpoints
  [[ -f $RUNS/$run/metrics.json ]] && mkdir -p "$OUT_DIR/$run" && cp "$RUNS/$run"/{metrics.json,report.md} "$OUT_DIR/$run/" 2>/dev/null
done
$PY scripts/gpu_report.py "$OUT_DIR"
rc=$?
# --bundle: the device tool brings back at most 8 files, so the two summaries stay loose and the rest
# (logs, bench tables, the runs' metrics) goes into one archive.
((BUNDLE)) || exit $rc
tar czf "$WORK/details.tar.gz" -C "$OUT_DIR" --exclude gpu_check.md --exclude gpu_check.json .
# Removed by name: only what this script wrote there.
(cd "$OUT_DIR" && rm -rf -- logs steps.jsonl gpu_tests_*.xml bench_rt.md bench_rt.json bench_imdb.md \
  bench_imdb.json default qlora qlora_reload.json)
mv "$WORK/details.tar.gz" "$OUT_DIR/gpu_check_details.tar.gz"
exit $rc
