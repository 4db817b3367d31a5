#!/usr/bin/env bash
# Run HERE (the CPU machine, which reaches PyPI) before a device call: the GPU machine has
# PyTorch, transformers, safetensors, huggingface_hub, tqdm, ... but not diffusers (our DiT's
# building blocks and the baseline pipeline). Its wheel goes to .whl/ (git-ignored), which the
# device call carries. diffusers' own needs are all on that machine (importlib_metadata only
# below Python 3.8). PyAV (MP4 files) and aiortc (serve) are left out: the checks need neither,
# and PyAV's 38 MB would not fit the 64 MiB a call carries. WHEELS=DIR downloads elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${WHEELS:-.whl}
if [ "$dest" = .whl ]; then grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude; fi
mkdir -p "$dest"
py=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && py=.venv/bin/python
ver() { "$py" -c "import importlib.metadata as m; print(m.version('$1'))"; }
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d "$dest" "diffusers==$(ver diffusers)"
du -sh "$dest" && ls "$dest"
