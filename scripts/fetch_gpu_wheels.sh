#!/usr/bin/env bash
# Run HERE (the CPU machine, which reaches PyPI) before a device call: the GPU machine has
# PyTorch, transformers, safetensors, tqdm, ... but not diffusers (our DiT's building blocks and
# the baseline pipeline) or importlib_metadata (diffusers needs it). Their wheels go to .whl/
# (git-ignored locally), which the device call carries: see BENCHMARKS.md. PyAV (MP4 files) is
# left out: the checks write none, and its 38 MB would not fit the 64 MiB a call carries.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
mkdir -p .whl
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
ver() { "$py" -c "import importlib.metadata as m; print(m.version('$1'))"; }
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do plat+=(--platform "$p"); done
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" -d .whl \
  "diffusers==$(ver diffusers)" "importlib_metadata==$(ver importlib_metadata)"
du -sh .whl && ls .whl
