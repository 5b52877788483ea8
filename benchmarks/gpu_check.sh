#!/usr/bin/env bash
# The whole GPU measurement of issue 15 in one command of at most 8 minutes (benchmarks/GPU_CHECK.md):
#   1. the pipeline's own DPO trainer step, SD1.5 architecture at 512 px, batch 32 pairs, bf16, torch.compile
#      (compile time reported apart from step time);
#   2. the benchmark's three structures (ours, diffusers example, original) at batch 8, bf16, no compile;
#   3. featurize throughput (mixed-size JPEGs -> latents, images/s) and evaluation throughput (50-step
#      DPM-Solver++, CFG 7.5, images/s), both through the pipeline's own functions.
# Writes one JSON: $OUT/gpu_check.json (the device tool's OUT folder), else benchmarks/results/gpu_check.json.
# Run from the repository root on the GPU machine, with .whl/ carried (make gpu-wheels here first):
#   bash benchmarks/gpu_check.sh
# A dry run on a CPU (seconds, checks the script itself): GPU_CHECK_PRESET=sd-mini GPU_CHECK_SMALL=1 bash ...
set -uo pipefail
cd "$(dirname "$0")/.."
preset=${GPU_CHECK_PRESET:-sd15-random}
if [ -n "${GPU_CHECK_SMALL:-}" ]; then big=4 small=2 steps=3 images=6 eval_images=2 workers=0; dtype=fp32
else big=32 small=8 steps=8 images=96 eval_images=32 workers=8; dtype=bf16; fi
out_dir=${OUT:-benchmarks/results}
mkdir -p "$out_dir" /tmp/gpu_check
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DO_NOT_TRACK=true
# One inductor cache for every step below: the batch-32 compile is paid once.
export TORCHINDUCTOR_CACHE_DIR=/tmp/gpu_check/inductor
if [ -d .whl ] && [ -z "${GPU_CHECK_SMALL:-}" ]; then  # a dry run uses the local venv
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check: installing .whl/ failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
python3 - <<'PY' || exit 1
import torch, diffusers, peft, transformers, pydantic
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
print("diffusers", diffusers.__version__, "peft", peft.__version__, "transformers", transformers.__version__, "pydantic", pydantic.__version__)
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

step() {  # name, limit in seconds, command...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "/tmp/gpu_check/$name.log" 2>&1
  local rc=$?
  tail -n 25 "/tmp/gpu_check/$name.log"
  echo "== $name: rc $rc in $((SECONDS - start))s"
  echo "{\"rc\": $rc, \"seconds\": $((SECONDS - start))}" > "/tmp/gpu_check/$name.status.json"
}

step ours_b32_compiled 330 python3 benchmarks/bench_align.py --preset "$preset" --dtype $dtype --batch $big \
  --steps $steps --warmup 3 --variants ours --compile --json /tmp/gpu_check/ours_b32_compiled.json
step structures_b8 150 python3 benchmarks/bench_align.py --preset "$preset" --dtype $dtype --batch $small \
  --steps $((steps - 2)) --warmup 2 --no-compile --json /tmp/gpu_check/structures_b8.json
step throughput 120 python3 benchmarks/bench_throughput.py --preset "$preset" --dtype $dtype --images $images \
  --featurize-batch 32 --workers $workers --eval-images $eval_images --eval-batch 16 \
  --json /tmp/gpu_check/throughput.json

python3 - "$out_dir/gpu_check.json" <<'PY'
import json, sys
from pathlib import Path
parts = {}
for name in ("ours_b32_compiled", "structures_b8", "throughput"):
    result, status = Path(f"/tmp/gpu_check/{name}.json"), Path(f"/tmp/gpu_check/{name}.status.json")
    parts[name] = {
        "status": json.loads(status.read_text()) if status.is_file() else None,
        "result": json.loads(result.read_text()) if result.is_file() else None,
    }
Path(sys.argv[1]).write_text(json.dumps(parts, indent=2))
print(json.dumps(parts, indent=2))
PY
cp /tmp/gpu_check/*.log "$out_dir"/ 2>/dev/null || true
