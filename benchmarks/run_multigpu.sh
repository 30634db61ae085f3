#!/usr/bin/env bash
# Every multi-GPU figure of issue 15 on one machine with 2 (or more) GPUs, as one command per stage:
#
#   bash benchmarks/run_multigpu.sh infer            # ~3-4 min: NCCL generate check + 1 vs 2 GPU steps (eager, cuDNN)
#   bash benchmarks/run_multigpu.sh train            # ~5 min: FSDP2 klein-4B / klein-9B on 1 and 2 GPUs, exact resume
#   bash benchmarks/run_multigpu.sh infer-compiled   # ~6-8 min: the 1 vs 2 GPU steps again, regionally compiled
#   bash benchmarks/run_multigpu.sh all              # the three in a row (a machine without a per-command limit)
#
# Each stage stays under 10 minutes (every step has its own timeout) and leaves two files in $OUT (default
# ./bench_out): multigpu_<stage>.json (every script's JSON, merged) and multigpu_<stage>.log (their output).
# A step that fails or times out is recorded in the JSON and the stage goes on. Environment: PYTHON (default
# python), NGPU (default: all visible GPUs), SMOKE=1 (CPU processes over gloo, tiny models: checks this script).
set -u
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python}
SMOKE=${SMOKE:-0}
S=()
if [ "$SMOKE" = 1 ]; then
  S=(--smoke)
  NGPU=${NGPU:-2}
  export CUDA_VISIBLE_DEVICES=""
fi
NGPU=${NGPU:-$($PY -c 'import torch; print(torch.cuda.device_count())')}
OUT=${OUT:-$REPO/bench_out}
export PYTHONPATH=$REPO/src${PYTHONPATH:+:$PYTHONPATH}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
STAGE=${1:-all}
mkdir -p "$OUT"

if [ "$NGPU" -lt 2 ]; then
  echo "needs at least 2 GPUs, found $NGPU" >&2
  exit 2
fi

run_stage() {
  local stage=$1
  local raw
  raw=$(mktemp -d)
  local log=$OUT/multigpu_$stage.log
  : >"$log"
  local status=()
  step() {  # step NAME TIMEOUT_S COMMAND...: run in benchmarks/ with its JSON going to $raw
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $*" | tee -a "$log"
    local t0=$SECONDS
    [ "$SMOKE" = 1 ] && limit=$((limit * 4))  # a loaded CPU is slower than the GPUs these limits are set for
    (cd "$REPO/benchmarks" && OUT=$raw timeout --signal=TERM --kill-after=20 "$limit" "$@") >>"$log" 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$log"
    status+=("$name=$rc")
  }
  local TR=("$PY" -m torch.distributed.run --standalone)
  case $stage in
    infer)
      step generate_nccl 150 "$PY" check_generate_gpus.py --gpus "$NGPU" "${S[@]}"
      step parallel_eager 420 "${TR[@]}" --nproc_per_node "$NGPU" bench_parallel.py --attention cudnn "${S[@]}"
      ;;
    infer-compiled)
      step parallel_compiled 560 "${TR[@]}" --nproc_per_node "$NGPU" bench_parallel.py --attention cudnn --compile \
        "${S[@]}"
      ;;
    train)
      # klein-4B full fine-tune, 1024², bf16 compute, FSDP2 per block + activation checkpointing; then klein-9B,
      # which should run out of memory on one GPU (the JSON says "oom": true) and run sharded on all of them.
      step fsdp_klein4b_1gpu 100 "${TR[@]}" --nproc_per_node 1 bench_fsdp.py --model klein-4b --checkpointing "${S[@]}"
      step fsdp_klein4b_ngpu 100 "${TR[@]}" --nproc_per_node "$NGPU" bench_fsdp.py --model klein-4b --checkpointing "${S[@]}"
      step fsdp_klein9b_1gpu 90 "${TR[@]}" --nproc_per_node 1 bench_fsdp.py --model klein-9b --checkpointing "${S[@]}"
      step fsdp_klein9b_ngpu 140 "${TR[@]}" --nproc_per_node "$NGPU" bench_fsdp.py --model klein-9b --checkpointing "${S[@]}"
      step resume_nccl 150 "$PY" check_resume.py --nproc "$NGPU" "${S[@]}"
      ;;
    *)
      echo "unknown stage $stage (infer, train, infer-compiled, all)" >&2
      return 2
      ;;
  esac
  # Merge: one JSON per stage (the device tool brings back at most 8 files).
  "$PY" - "$raw" "$OUT/multigpu_$stage.json" "$stage" "${status[@]}" <<'EOF'
import json, sys, time
from pathlib import Path
raw, dest, stage, *status = sys.argv[1:]
merged = dict(stage=stage, date=time.strftime("%Y-%m-%d %H:%M"), exit_codes=dict(s.split("=") for s in status), results={})
for path in sorted(Path(raw).rglob("*.json")):
    merged["results"][str(path.relative_to(raw))] = json.loads(path.read_text())
tmp = Path(dest + ".tmp")
tmp.write_text(json.dumps(merged, indent=1))
tmp.rename(dest)
print(f"wrote {dest}: {len(merged['results'])} result files, exit codes {merged['exit_codes']}")
EOF
  rm -rf "$raw"
}

if [ "$STAGE" = all ]; then
  for s in infer train infer-compiled; do run_stage "$s"; done
else
  run_stage "$STAGE"
fi
