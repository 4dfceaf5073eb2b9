#!/usr/bin/env bash
# The whole GPU proof in one command: the paths no GPU has run yet first, then a GPU-sized benchmark,
# then the default job. GPU time is scarce, so every step is time-boxed and the whole check fits
# BUDGET seconds; one hung step cannot eat the rest, and what a cut-short step measured still comes back.
#
#   bash scripts/gpu_check.sh --kit gpu_kit            # on the GPU machine (the kit carried along)
#   bash scripts/gpu_check.sh --dry-run                # anywhere: the plumbing, GPU steps "skipped: no CUDA"
#
# Options: --kit DIR (default gpu_kit; see scripts/gpu_kit.py), --out DIR (default $OUT, else a new
# gpu_check_out/<UTC time>; must be new or empty), --budget SECONDS (default 520), --dry-run, --bundle
# (all but the two summaries in one .tar.gz: the device tool brings back 8 files at most), --only
# STEP,STEP (run only these GPU steps: a second call after a fix), --tests "GROUP;GROUP" (what gpu-tests
# runs: pytest targets, the groups side by side; default below). Writes to the out dir: gpu_check.md
# (the tables), gpu_check.json (every figure), logs/<step>.log, and the runs' metrics and bench results.
# Exits non-zero if any step failed or ran out of time.
#
# The plan, in order, with each step's cap in seconds (docs/gpu_at_scale.md gives the estimates behind
# them): kit-unpack 45; gpu-tests 150 (ZeRO-2 in fp32 and bf16, FSDP2 and ZeRO-3 in bf16, the single-GPU
# tests: five groups side by side); qlora-job 60 and qlora-reload 30; bench-base 240 (a BERT-base-shaped
# encoder on IMDB at length 512); bench-minilm 90; default-job 90. The caps add up to more than the
# budget on purpose: the budget cuts the last steps short if earlier ones ran long, so the steps are
# ordered by what has never been measured.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
KIT="" OUT_DIR=${OUT:-gpu_check_out/$(date -u +%Y%m%d-%H%M%S)} BUDGET=520 DRY_RUN=0 BUNDLE=0 ONLY=""
# The GPU tests never run before, in groups side by side (scripts/pytest_groups.py): ZeRO-2 (fp32, bf16),
# FSDP2 and ZeRO-3 under bf16, and the single-GPU tests (bf16, fused AdamW, compile, MFU log, QLoRA).
TESTS="tests/gpu/test_backends.py -k 'zero2 and not bf16';tests/gpu/test_backends.py -k 'zero2 and bf16'"
TESTS+=";tests/gpu/test_backends.py -k 'fsdp2 and bf16';tests/gpu/test_backends.py -k 'zero3 and bf16'"
TESTS+=";tests/gpu/test_single_gpu.py"
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
# --kit builds a small offline one first (no wheels), which also runs the builder's size check, and
# checks that the embedded names resolve into it (on the GPU the steps below find a broken kit themselves).
if [[ -z $KIT ]] && ((DRY_RUN)); then
  KIT=$WORK/kit
  step kit-build 120 cpu $PY scripts/gpu_kit.py build --out "$KIT" --no-wheels --imdb_rows 1000
fi
KIT=${KIT:-gpu_kit}
step kit-unpack 45 cpu $PY scripts/gpu_kit.py unpack --kit "$KIT" --into "$WORK"
if ((DRY_RUN)); then
  step kit-locate 90 cpu $PY scripts/gpu_kit.py locate --site "$WORK/site"
fi

step device-info 10 gpu nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv

# 1. What no GPU has run yet: ZeRO-2 train + checkpoint + resume + reload, FSDP2 and ZeRO-3 under bf16
# (the GPU tests, groups side by side); then QLoRA on the default job for 40 steps, its adapter reloaded
# with plain PEFT on the full-precision base (as eval.py does) and evaluated.
IFS=';' read -ra TEST_GROUPS <<< "$TESTS"
step gpu-tests 150 gpu $PY scripts/pytest_groups.py "$OUT_DIR" "${TEST_GROUPS[@]}"
RUNS=$WORK/runs
step qlora-job 60 gpu $PY train_loop.py --load_in_4bit --max_steps 40 --output_dir "$RUNS/qlora"
step qlora-reload 30 gpu bash -c "$PY eval.py --adapter_dir '$RUNS/qlora' > '$OUT_DIR/qlora_reload.json'"

# 2. The GPU-sized bench: a BERT-base-shaped encoder (built from its config, random weights, MiniLM's
# tokenizer) on IMDB at length 512, batch 256: our loop, compiled, Trainer with our settings (compiled and
# not), Trainer defaults; three round-robin repeats, the first 5 steps of each run timed apart (compile).
# Then MiniLM itself on the same job, where the accuracy means something (and must agree between arms).
BENCH_GPU="--dataset embedded:imdb --max_length 512 --batch_size 256 --max_steps 30 --timed_warmup_steps 5 --repeats 3"
step bench-base 240 gpu $PY bench/bench_speed.py --random_init bert-base $BENCH_GPU --arms a f g h c \
  --max_eval_samples 256 --output "$OUT_DIR/bench_base.md"
step bench-minilm 90 gpu $PY bench/bench_speed.py $BENCH_GPU --arms a g c --max_eval_samples 500 \
  --output "$OUT_DIR/bench_minilm.md"

# 3. The default job, unchanged (bf16 on this GPU), against the CPU run in the README.
step default-job 90 gpu $PY train_loop.py --output_dir "$RUNS/default"

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
(cd "$OUT_DIR" && rm -rf -- logs steps.jsonl gpu_tests_*.xml bench_base.md bench_base.json bench_minilm.md \
  bench_minilm.json default qlora qlora_reload.json)
mv "$WORK/details.tar.gz" "$OUT_DIR/gpu_check_details.tar.gz"
exit $rc
