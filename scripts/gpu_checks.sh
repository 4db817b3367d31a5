#!/usr/bin/env bash
# Every GPU figure in one call of the device tool: about 5 minutes on one H200 by estimate
# (the budget per step is in BENCHMARKS.md; the step limits add up to 9 minutes at worst: 535 s).
# Here first:  bash scripts/fetch_gpu_wheels.sh
# Then:        run(command="bash scripts/gpu_checks.sh", carry=[".whl"], timeout_s=560)
# Back in $OUT: gpu.jsonl (one JSON line per finished bench section, tagged with its step),
# logs.tgz (every step's full log, refreshed after each step, so a killed call still has them),
# summary.txt (the lines this script printed) and the latency plot. Copy the figures into
# BENCHMARKS.md with the device and date.
# A dry run on a CPU (what tests/test_gpu_kit.py does, with PyAV and aiortc unimportable):
#   DEVICE=cpu P13=tiny P18=tiny N13=4 N18=4 COMPILE_BACKEND=eager BASELINE_STEPS=2 BASELINE_FRAMES=5 \
#     bash scripts/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
mkdir -p "$OUT"
LOGS=$(mktemp -d)
# no network there: never let a library try (and wait on) the hub
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PYTHONPATH="$PWD/src:$SITE${PYTHONPATH:+:$PYTHONPATH}"
DEVICE=${DEVICE:-cuda} P13=${P13:-wan-1.3b-audio} P18=${P18:-wan-i2v-14b-audio}
N13=${N13:-40} N18=${N18:-6} COMPILE_BACKEND=${COMPILE_BACKEND:-inductor}
BASELINE_STEPS=${BASELINE_STEPS:-50} BASELINE_FRAMES=${BASELINE_FRAMES:-17}
exec > >(tee "$OUT/summary.txt") 2>&1
TEE=$!

WHEELS=${WHEELS:-.whl}
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
    || { echo "wheel install failed"; exit 1; }
fi
failed=0
ONLY=${ONLY:-}  # e.g. ONLY="cuda_tests bench_13b": rerun those steps alone (a second try in the same lease)
step() {  # step NAME SECONDS CMD...: run with a time limit, keep its log, never stop the script
  local name=$1 limit=$2; shift 2
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc in $((SECONDS - t0)) s"; grep -v '^{' "$LOGS/$name.log" | tail -n 3
  [ $rc -eq 0 ] || failed=$((failed + 1))
  grep -h '^{' "$LOGS/$name.log" | sed "s/^{/{\"step\": \"$name\", /" >> "$OUT/gpu.jsonl" || true
  tar czf "$OUT/logs.tgz" -C "$LOGS" . 2>/dev/null
}
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import sys, torch, diffusers, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"; } > "$LOGS/env.log" 2>&1
cat "$LOGS/env.log"

# 1. CUDA-only correctness: streaming == masked (fp32; bf16 tiny and at head size 128), decode stream == sequential
step cuda_tests 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py
# 2. no GPU work: placement and memory of the 18B on this GPU (its memory as nvidia-smi says), its predicted fps per GPU kind
GPU_MEM=${GPU_MEM:-$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -n 1 | awk '{printf "%d", $1 / 1024}')}
step plan 45 "$PY" -m talkingmachines plan --preset "$P18" --gpus 1 --gpu-mem "${GPU_MEM:-80}" --speed
# 3. the 1.3B-class preset at 512x512, 2 steps, bf16, random weights: fps + stage ms, KV-cache
#    speed-up, one-GPU disaggregation, then the diffusers baseline (last section: the rest is printed by then)
step bench_13b 150 "$PY" -m talkingmachines bench --device "$DEVICE" --preset "$P13" --chunks "$N13" --json \
  --baseline-steps "$BASELINE_STEPS" --baseline-frames "$BASELINE_FRAMES" --plot "$OUT/latency_13b.png"
# 4. the 18B preset (I2V trunk + audio layers) on this one GPU
step bench_18b 100 "$PY" -m talkingmachines bench --device "$DEVICE" --preset "$P18" --chunks "$N18" --skip-baseline --json
# 5. the same long stream with the VAE in bf16 (the VAE is the bottleneck: 314 ms of a ~470 ms chunk in fp32 on an H100)
step bench_13b_vae_bf16 60 "$PY" -m talkingmachines bench --device "$DEVICE" --preset "$P13" --chunks "$N13" \
  --sections stream --json --vae-dtype bf16
# 6. the slowest, last: torch.compile of the blocks (once per block shape), then the long stream
step bench_13b_compile 120 "$PY" -m talkingmachines bench --device "$DEVICE" --preset "$P13" --chunks "$N13" \
  --sections stream --json --compile --compile-backend "$COMPILE_BACKEND"
echo "== done in $SECONDS s, $failed step(s) failed; figures in $OUT/gpu.jsonl, logs in $OUT/logs.tgz"
rm -rf "$LOGS"
exec >&- 2>&-
wait "$TEE" 2>/dev/null  # summary.txt complete before the call returns
exit $((failed > 0))
