"""A strip of frames from a video, for the docs: every `--every`-th frame in `--rows` rows,
optionally led by the input portrait (resized to the frame size).

    python scripts/frames_figure.py demo.mp4 docs/demo_frames.png --every 6 --rows 2
"""

import argparse

import numpy as np
from PIL import Image

from talkingmachines.media import read_video


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("video")
    ap.add_argument("out")
    ap.add_argument("--every", type=int, default=6)
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--cols", type=int, default=15)
    ap.add_argument("--portrait", default=None, help="put this image first")
    a = ap.parse_args()
    v = read_video(a.video)
    frames = np.asarray(v[0] if isinstance(v, tuple) else v)
    h, w = frames.shape[1:3]
    cells = []
    if a.portrait:
        cells.append(np.asarray(Image.open(a.portrait).convert("RGB").resize((w, h), Image.BICUBIC)))
    cells += list(frames[:: a.every])
    cells = cells[: a.rows * a.cols]
    cells += [np.full_like(frames[0], 255)] * (a.rows * a.cols - len(cells))
    grid = np.concatenate([np.concatenate(cells[r * a.cols:(r + 1) * a.cols], 1) for r in range(a.rows)], 0)
    Image.fromarray(grid).save(a.out)
    print(f"wrote {a.out} ({grid.shape[1]}x{grid.shape[0]})")


if __name__ == "__main__":
    main()
