#!/usr/bin/env bash
# Here, before a lent GPU call: what the GPU box lacks for the capacity run, into .gpukit/ (git-ignored):
# espeak-ng's Debian packages (the data's speech) and the diffusers wheel (scripts/fetch_gpu_wheels.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .gpukit/deb .gpukit/whl
(cd .gpukit/deb && apt-get download espeak-ng espeak-ng-data libespeak-ng1 libpcaudio0 libsonic0)
WHEELS=.gpukit/whl bash scripts/fetch_gpu_wheels.sh
du -sh .gpukit
