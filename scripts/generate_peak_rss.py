"""Peak RSS of `talkingmachines generate` on an input (BENCHMARKS.md, issue 11).

    python scripts/generate_peak_rss.py SRC_DIR AUDIO.wav SECONDS

Runs `generate` with PYTHONPATH=SRC_DIR (a checkout's src, to compare versions), lets it write
video for SECONDS after its temp MP4 appears (model loaded, chunks being written), stops it
with SIGTERM and prints one JSON line with the child's peak RSS (``ru_maxrss`` from os.wait4).
"""

import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

ap = argparse.ArgumentParser(description="peak RSS of `talkingmachines generate` while it writes video")
ap.add_argument("src", help="a checkout's src folder (put on PYTHONPATH)")
ap.add_argument("wav", help="the speech to generate from")
ap.add_argument("seconds", type=float, help="how long to let it write video before stopping it")
args = ap.parse_args()
src, wav, wait = args.src, args.wav, args.seconds
if not os.path.isdir(os.path.join(src, "talkingmachines")):
    sys.exit(f"error: {src}: not a src folder (no talkingmachines package in it)")
if not os.path.isfile(wav):
    sys.exit(f"error: {wav}: no such file")
out = tempfile.mkdtemp(prefix="peak-")
env = dict(os.environ, PYTHONPATH=src, OMP_NUM_THREADS="1")
t0 = time.time()
p = subprocess.Popen([sys.executable, "-m", "talkingmachines", "generate", "--audio", wav, "-o", f"{out}/o.mp4"],
                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
while not glob.glob(f"{out}/.o.mp4.*.tmp.mp4") and p.poll() is None and time.time() - t0 < 1200:
    time.sleep(0.2)
writing_after = time.time() - t0
if p.poll() is None:
    time.sleep(wait)
    p.send_signal(signal.SIGTERM)
_, status, ru = os.wait4(p.pid, 0)
print(json.dumps({"audio": os.path.basename(wav), "src": src, "writing_after_s": round(writing_after, 1),
                  "peak_rss_mb": round(ru.ru_maxrss / 1024, 1), "exit": os.waitstatus_to_exitcode(status),
                  "stderr_tail": p.stderr.read().decode().strip().splitlines()[-1:]}))
