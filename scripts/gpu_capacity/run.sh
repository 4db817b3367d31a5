#!/usr/bin/env bash
# Issue 10's capacity lever on a lent GPU, in one device call of about 9 minutes:
#   here:   bash scripts/gpu_capacity/fetch.sh
#   device: run(command="DEADLINE=515 bash scripts/gpu_capacity/run.sh", carry=[".gpukit"], timeout_s=580)
# It synthesises the face recipe's 1200 clips (espeak-ng from .gpukit/deb; PyAV's 36 MB wheel
# would not travel, so avshim/av.py resamples the speech with scipy instead: correlation 0.998
# with PyAV's resampler on noise), continues the shipped teacher at 6 (control), 10 and 14 blocks
# side by side for the same steps (8000, or fewer fitted to the time left), ODE-distils and
# exports each. Back in $OUT: <variant>_dit.partN (the students' weights, split under 16 MB),
# d10_teacher.partN, meta.tgz (presets, configs, cards, loss curves, logs) and driver.log.
# Put them back together here with: python scripts/gpu_capacity/unpack.py FILES_AT runs/gpu
# A dry run on a CPU (tests/test_gpu_kit.py runs one):
#   NO_DEB=1 NO_WHL=1 DEVICE=cpu N=30 WORKERS=2 STEPS=6 MIN_STEPS=3 VARIANTS="ctrl6 d10" ODE_PAIRS=8 \
#     ODE_TRAIN_STEPS=3 OUT=/tmp/o RUNS=/tmp/r bash scripts/gpu_capacity/run.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu_capacity}; mkdir -p "$OUT"
export KIT=${KIT:-.gpukit}; mkdir -p "$KIT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
if [ -z "${NO_DEB:-}" ]; then for f in "$KIT"/deb/*.deb; do dpkg -x "$f" /; done; ldconfig; fi
espeak-ng --version || echo "no espeak-ng"
PY=${PYTHON:-python3}
if [ -z "${NO_WHL:-}" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "${SITE:-/tmp/site}" "$KIT"/whl/*.whl || exit 1
fi
SHIM=""
"$PY" -c "import av" 2>/dev/null || SHIM="$PWD/scripts/gpu_capacity/avshim:"
export PYTHONPATH="$SHIM$PWD/src:${SITE:-/tmp/site}${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi -L 2>/dev/null; echo "cpus: $(nproc)"
"$PY" scripts/gpu_capacity/driver.py 2>&1 | tee "$OUT/driver.log"
