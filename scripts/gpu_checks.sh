#!/usr/bin/env bash
# Every GPU check of issue 4 in one call of the device tool (about 8 minutes on one H200).
# Here first:  bash scripts/fetch_gpu_wheels.sh
# Then:        run(command="bash scripts/gpu_checks.sh", carry=[".whl"], timeout_s=590)
# Results land in $OUT (gpu.jsonl: one JSON line per bench; *.log: each step's output), which
# come back to this machine; copy the figures into BENCHMARKS.md with the device and date.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
fi
# overridable for a dry run on a CPU machine: DEVICE=cpu P13=tiny P18=tiny N=6 bash scripts/gpu_checks.sh
DEVICE=${DEVICE:-cuda} P13=${P13:-wan-1.3b-audio} P18=${P18:-wan-i2v-14b-audio} N=${N:-100}
step() {  # step NAME SECONDS CMD...: run with a time limit, keep its log, never stop the script
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc in $((SECONDS - t0)) s"; tail -n 3 "$OUT/$name.log"
  grep -h '^{' "$OUT/$name.log" | sed "s/^{/{\"step\": \"$name\", /" >> "$OUT/gpu.jsonl" || true
}
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi";
  python3 -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__)"; } | tee "$OUT/env.log"

# 1. CUDA-only correctness: streaming == masked forward (fp32, bf16), decode on its own stream == sequential
step cuda_tests 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
# 2. the 1.3B-class preset at 512x512, 2 steps, bf16, random weights: rtf, per-chunk, KV-cache speed-up, disagg
step bench_13b 120 python3 -m talkingmachines bench --device "$DEVICE" --preset "$P13" --chunks "$N" --skip-baseline --json --plot "$OUT/latency_13b.png"
# 3. the same with torch.compile of the blocks' chunk step
step bench_13b_compile 150 python3 -m talkingmachines bench --device "$DEVICE" --preset "$P13" --chunks "$N" --skip-baseline --compile --json
# 4. the 18B preset (I2V trunk + audio layers) on this one GPU: per-stage times, and the plan's placement
step plan_18b 30 python3 -m talkingmachines plan --preset "$P18" --gpus 1 --gpu-mem 139 --dtype bf16
step bench_18b 120 python3 -m talkingmachines bench --device "$DEVICE" --preset "$P18" --chunks 12 --skip-baseline --json
echo "== done; figures in $OUT/gpu.jsonl"
