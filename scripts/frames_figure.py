"""A strip of frames from a video, for the docs: every `--every`-th frame in `--rows` rows,
optionally led by the input portrait (resized to the frame size).

    python scripts/frames_figure.py demo.mp4 docs/demo_frames.png --every 6 --rows 2

With `--also`, the same frames of another video under the first's, laid out the same way (two models on the
same speech, frame for frame):

    python scripts/frames_figure.py a.mp4 cmp.png --start 139 --every 2 --rows 1 --cols 13 --also b.mp4
"""

import argparse

import numpy as np
from PIL import Image

from talkingmachines.media import read_video


def _frames(path: str) -> np.ndarray:
    v = read_video(path)
    return np.asarray(v[0] if isinstance(v, tuple) else v)


def _grid(cells: list, rows: int, cols: int, blank: np.ndarray) -> np.ndarray:
    cells = cells[: rows * cols] + [blank] * max(0, rows * cols - len(cells))
    return np.concatenate([np.concatenate(cells[r * cols:(r + 1) * cols], 1) for r in range(rows)], 0)


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
                    help="another video whose same frames go below, laid out the same way (repeatable)")
    a = ap.parse_args()
    frames = _frames(a.video)[a.start:]
    h, w = frames.shape[1:3]
    blank = np.full_like(frames[0], 255)
    lead = []
    if a.portrait:
        lead = [np.asarray(Image.open(a.portrait).convert("RGB").resize((w, h), Image.BICUBIC))]
    # every video laid out the same way, so frame i sits in the same cell of each block
    blocks = [_grid(lead + list(frames[:: a.every]), a.rows, a.cols, blank)]
    for other in a.also:
        blocks.append(_grid([blank] * len(lead) + list(_frames(other)[a.start:: a.every]), a.rows, a.cols, blank))
    grid = np.concatenate(blocks, 0)
    Image.fromarray(grid).save(a.out)
    print(f"wrote {a.out} ({grid.shape[1]}x{grid.shape[0]})")


if __name__ == "__main__":
    main()
