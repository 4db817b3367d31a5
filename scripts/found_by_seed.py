"""Where in a clip the student loses the face, and how much that depends on the noise seed.

Per clip of a `data synth` set: the student streams the clip's speech from its listening frame (as
`eval-model` does) once per seed, and the face judge reports the share of frames where it finds the
student's face among those where it finds the real one, over the whole clip and per quarter of it.

    python scripts/found_by_seed.py --model src/talkingmachines/weights/tiny --data runs/unseen \\
        --clips 34 20 30 37 26 --seeds 3 [--sink-only]

``--sink-only`` is a diagnostic, not a product mode: every chunk is drawn as the first one is, against
the portrait's keys and values alone (no previous chunk in the KV cache), to tell whether the face is
lost through the student's own context (drift) or chunk by chunk.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager, nullcontext

import numpy as np


@contextmanager
def sink_only():
    """While open, every chunk of every stream is a first chunk: the previous-chunk slot stays
    masked out and the clean pass that would fill it is skipped."""
    import torch

    from talkingmachines.diffusion import flow
    from talkingmachines.stream.generator import StreamingGenerator

    @torch.inference_mode()
    def denoise(self, au):
        a, dit = self.avatar, self.avatar.dit

        def x0_fn(x, s):
            t = torch.tensor([s * 1000.0], device=a.device)
            return x - s * dit.forward_chunk(self.cache, self.dit_input(x, False), t, self.ctx, au, chunk=1)

        return flow.denoise_chunk(x0_fn, self.new_noise(), self.sigmas, self.new_noise)[0]

    shipped = StreamingGenerator.denoise
    StreamingGenerator.denoise = denoise
    try:
        yield
    finally:
        StreamingGenerator.denoise = shipped


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a model folder")
    ap.add_argument("--data", required=True, help="a `data synth` folder (clip_NNNNN.npz)")
    ap.add_argument("--clips", type=int, nargs="+", required=True, help="clip numbers")
    ap.add_argument("--seeds", type=int, default=3, help="noise seeds 0..N-1")
    ap.add_argument("--sink-only", action="store_true", help="draw every chunk against the portrait alone")
    a = ap.parse_args()

    from talkingmachines.errors import InputError
    from talkingmachines.eval import face_judge
    from talkingmachines.eval.clips import clip_files
    from talkingmachines.stream.generator import load_avatar

    try:
        paths = clip_files(a.data, a.clips)
        avatar, judge = load_avatar(a.model), face_judge.FaceJudge.load()
    except (InputError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with sink_only() if a.sink_only else nullcontext():
        report(a, paths, avatar, judge)
    return 0


def report(a, paths, avatar, judge) -> None:
    from talkingmachines.eval.clips import listening_frame
    from talkingmachines.eval.face_judge import found_where
    from talkingmachines.eval.runners import generate_video

    def share(found, gt) -> float:  # of the frames where the judge finds the real face
        return found_where(found, gt)["found_where_reference_found"]

    print(f"found where the ground truth's face is, whole clip (quarters 1-4); {a.model}"
          + (", every chunk against the portrait alone" if a.sink_only else ""))
    for c, path in zip(a.clips, paths):
        d = np.load(path)
        frames, audio = d["frames"], d["audio"]
        portrait = listening_frame(frames, d["speaking"] if "speaking" in d else None)
        gt = np.array([p is not None for p in judge.video_landmarks(frames)])
        cells = []
        for seed in range(a.seeds):
            video = generate_video(avatar, frames[portrait], audio, seed=seed)
            n = min(len(video), len(gt))
            found = np.array([p is not None for p in judge.video_landmarks(video[:n])])
            q = [share(found[i * n // 4:(i + 1) * n // 4], gt[i * n // 4:(i + 1) * n // 4]) for i in range(4)]
            cells.append(f"seed {seed}: {share(found, gt):.2f} ({' '.join(f'{x:.2f}' for x in q)})")
        print(f"clip {c} (portrait frame {portrait}): " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    sys.exit(main())
