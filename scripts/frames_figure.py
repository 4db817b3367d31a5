"""A strip of frames from a video, for the docs: every `--every`-th frame in `--rows` rows,
optionally led by the input portrait (resized to the frame size).

    python scripts/frames_figure.py demo.mp4 docs/demo_frames.png --every 6 --rows 2

With `--also`, one more row per video, the same frames of each, under the first's (two models on the same
speech, frame for frame):

    python scripts/frames_figure.py a.mp4 cmp.png --start 139 --every 2 --rows 1 --cols 13 --also b.mp4
"""

import argparse

import numpy as np
from PIL import Image

from talkingmachines.media import read_video


def _frames(path: str) -> np.ndarray:
    v = read_video(path)
    return np.asarray(v[0] if isinstance(v, tuple) else v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("video")
    ap.add_argument("out")
    ap.add_argument("--every", type=int, default=6)
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--cols", type=int, default=15)
    ap.add_argument("--portrait", default=None, help="put this image first")
    ap.add_argument("--start", type=int, default=0, help="the first frame")
    ap.add_argument("--also", action="append", default=[], metavar="VIDEO",
                    help="another video whose same frames go in a row below (repeatable; --rows 1 each)")
    a = ap.parse_args()
    frames = _frames(a.video)[a.start:]
    h, w = frames.shape[1:3]
    cells = []
    if a.portrait:
        cells.append(np.asarray(Image.open(a.portrait).convert("RGB").resize((w, h), Image.BICUBIC)))
    cells += list(frames[:: a.every])
    cells = cells[: a.rows * a.cols]
    cells += [np.full_like(frames[0], 255)] * (a.rows * a.cols - len(cells))
    grid = np.concatenate([np.concatenate(cells[r * a.cols:(r + 1) * a.cols], 1) for r in range(a.rows)], 0)
    for other in a.also:
        row = list(_frames(other)[a.start:: a.every][: a.cols])
        row += [np.full_like(frames[0], 255)] * (a.cols - len(row))
        grid = np.concatenate([grid, np.concatenate(row, 1)], 0)
    Image.fromarray(grid).save(a.out)
    print(f"wrote {a.out} ({grid.shape[1]}x{grid.shape[0]})")


if __name__ == "__main__":
    main()
