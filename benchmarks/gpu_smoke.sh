#!/usr/bin/env bash
# GPU verification kit: one script, one GPU, under ~8 minutes. Writes $OUT/gpu_smoke.json (a summary) and a
# log per check. Run from the repository root after `make setup` (a CUDA torch in .venv):
#
#   OUT=gpu_out MODEL=/path/to/Qwen2.5-0.5B-Instruct bash benchmarks/gpu_smoke.sh
#
# MODEL: a local model folder (default: the built-in SmolLM2-135M-Instruct). Checks:
#   bf16_lora   3 GRPO steps, LoRA, bf16 weights          (graft train ... model.device=cuda)
#   qlora_4bit  3 GRPO steps, 4-bit NF4 base + LoRA        (model.quantization=4bit), then export + parity
#   ddp_2gpu    3 steps in 2 processes                     (only when 2 GPUs are visible)
#   fsdp_2gpu   3 full fine-tuning steps sharded over 2    (train.fsdp; only when 2 GPUs are visible)
#   bench       graft bench on the GPU (graft vs TRL)      (needs the bench extra: pip install -e '.[bench]')
#   vllm        graft sampler vs vLLM, log-prob mismatch   (only when vllm is installed; MODEL required)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_smoke_out}
MODEL=${MODEL:-builtin:smollm2-135m-instruct}
PY=${PY:-.venv/bin/python}
GRAFT="$PY -m graft"
mkdir -p "$OUT"
declare -A STATUS SECONDS_TAKEN

check() {  # check NAME COMMAND...: run, time, keep the log and the exit code
  local name=$1; shift
  local start=$(date +%s)
  echo "== $name: $*"
  "$@" >"$OUT/$name.log" 2>&1
  STATUS[$name]=$?
  SECONDS_TAKEN[$name]=$(( $(date +%s) - start ))
  echo "   exit ${STATUS[$name]} after ${SECONDS_TAKEN[$name]} s (log: $OUT/$name.log)"
}

COMMON=(configs/arithmetic.yaml "model.name=$MODEL" model.device=cuda train.max_steps=3 task.num_eval=16
        eval.every_n_steps=0 checkpoint.every_n_steps=0 gate.enabled=false "logging.output_dir=$OUT/runs"
        logging.progress=lines logging.print_config=false)

$PY - <<'PY' >"$OUT/device.json"
import json, torch
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda,
                  "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}))
PY
check bf16_lora  $GRAFT train "${COMMON[@]}" model.dtype=bfloat16 logging.run_name=bf16_lora
check qlora_4bit $GRAFT train "${COMMON[@]}" model.quantization=4bit logging.run_name=qlora_4bit
check qlora_export $GRAFT export --run "$OUT/runs/qlora_4bit" --merged --to "$OUT/qlora_export"
if [ "$($PY -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  check ddp_2gpu $GRAFT train --nproc 2 "${COMMON[@]}" model.dtype=bfloat16 logging.run_name=ddp_2gpu
  check fsdp_2gpu $GRAFT train --nproc 2 "${COMMON[@]}" model.dtype=bfloat16 lora.enabled=false \
    train.fsdp=true train.learning_rate=1e-5 logging.run_name=fsdp_2gpu
fi
if $PY -c "import trl" 2>/dev/null; then
  check bench $GRAFT bench --device cuda --frameworks graft,trl --rounds 1 --steps 3 --json "$OUT/bench.json"
fi
if $PY -c "import vllm" 2>/dev/null && [ -d "$MODEL" ]; then
  check vllm $PY benchmarks/gpu_vllm.py --model "$MODEL" --out "$OUT/vllm.json"
fi

{
  echo "{"
  echo "  \"device\": $(cat "$OUT/device.json"),"
  for name in "${!STATUS[@]}"; do
    echo "  \"$name\": {\"exit\": ${STATUS[$name]}, \"seconds\": ${SECONDS_TAKEN[$name]}},"
  done
  echo "  \"metrics\": {"
  for run in "$OUT"/runs/*/; do
    [ -f "$run/metrics.jsonl" ] && echo "    \"$(basename "$run")\": $(tail -n 1 "$run/metrics.jsonl"),"
  done
  echo "    \"_\": null"
  echo "  }"
  echo "}"
} >"$OUT/gpu_smoke.json"
cat "$OUT/gpu_smoke.json"
