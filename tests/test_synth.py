"""Procedural talking-face data: renderer, speech, mouth drive, clips, data set, loader."""

import json
import time
from pathlib import Path

import numpy as np
import pytest

import talkingmachines

from talkingmachines.config import SAMPLES_PER_FRAME, VAE_TEMPORAL
from talkingmachines.errors import InputError
from talkingmachines.model.audio import frame_rms
from talkingmachines.train import synth
from talkingmachines.train.synth import (
    STYLES, FaceParams, FaceRenderer, FaceState, babble_tts, espeak_available, make_clip,
    features_mask_from_face, framed, mouth_drive, render_face, synth_dataset,
)

needs_espeak = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed (apt-get install espeak-ng)")
SPEECH = "espeak" if espeak_available() else "babble"


def test_params_deterministic_and_varied():
    assert FaceParams.sample(3) == FaceParams.sample(3)
    ps = [FaceParams.sample(s) for s in range(40)]
    assert {p.style for p in ps} == set(STYLES)
    assert len({p.skin for p in ps}) > 30 and len({p.hair_style for p in ps}) >= 5
    assert FaceParams.from_dict(json.loads(json.dumps(ps[0].to_dict()))) == ps[0]
    with pytest.raises(InputError):
        FaceParams.sample(0, style="oil painting")


@pytest.mark.parametrize("style", STYLES)
def test_render_speed_and_mouth(style):
    p = FaceParams.sample(5, style=style)
    r = FaceRenderer(p, 128)
    closed = r.render(FaceState())
    assert closed.shape == (128, 128, 3) and closed.dtype == np.uint8
    opened = r.render(FaceState(mouth_open=1.0))
    # the open mouth changes a visible patch of the lower face
    diff = np.abs(opened.astype(int) - closed.astype(int)).sum(-1) > 30
    assert diff.sum() > 60, diff.sum()
    ys = np.nonzero(diff.any(1))[0]
    assert ys.mean() > 64  # below the image centre
    assert ys.max() - ys.min() >= 6  # an opening of several pixels at 128x128
    # head motion moves the face
    moved = r.render(FaceState(dx=0.05))
    assert np.abs(moved.astype(int) - closed.astype(int)).mean() > 2
    # blink changes the eyes (upper half)
    blink = r.render(FaceState(blink=1.0))
    d = np.abs(blink.astype(int) - closed.astype(int)).sum(-1) > 30
    assert d.sum() > 10 and np.nonzero(d.any(1))[0].mean() < 70
    n = 60
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    for _ in range(n):
        r.render(FaceState(mouth_open=rng.random(), mouth_round=rng.random(), dx=0.01, tilt=2.0))
    fps = n / (time.perf_counter() - t)
    print(f"render {style}: {fps:.0f} frames/s at 128x128")
    assert np.array_equal(render_face(p, FaceState(), 128), closed)


def test_mouth_drive_silence_closed():
    rng = np.random.default_rng(0)
    x = np.zeros(50 * SAMPLES_PER_FRAME, np.float32)
    s = babble_tts(rng, seconds=1.0)
    x[10 * SAMPLES_PER_FRAME: 10 * SAMPLES_PER_FRAME + len(s)] = s * (0.08 / (np.sqrt((s**2).mean()) + 1e-9))
    mo, mr = mouth_drive(x)
    assert mo.shape == (50,) and mr.shape == (50,)
    assert np.all(mo[:10] == 0) and np.all(mr[:10] == 0)
    assert np.all(mo[45:] == 0)
    assert mo[10:35].max() > 0.3
    assert (mr >= 0).all() and (mr <= 1).all()


def _check_clip(c, seconds):
    T = c.num_frames
    assert (T - 1) % VAE_TEMPORAL == 0 and abs(T - seconds * 25) <= 4
    assert c.frames.shape == (T, 64, 64, 3) and c.frames.dtype == np.uint8
    assert c.audio.dtype == np.float32 and len(c.audio) == T * SAMPLES_PER_FRAME
    assert c.mouth_open.shape == c.mouth_round.shape == c.speaking.shape == (T,)
    assert c.speaking.any() and (~c.speaking).any()
    rms = frame_rms(c.audio, T)
    corr = np.corrcoef(c.mouth_open, rms)[0, 1]
    assert corr > 0.8, corr
    assert np.abs(c.mouth_open[~c.speaking]).max() < 0.05
    assert c.mouth_open[c.speaking].max() > 0.5
    # the frames follow the mouth: frames with the mouth open differ from closed ones
    json.dumps(c.params)


def test_clip_babble():
    c = make_clip(1, 3.0, size=64, speech="babble", listen_frac=0.4)
    _check_clip(c, 3.0)
    assert c.params["speech_source"] == "babble"


@needs_espeak
def test_clip_espeak():
    c = make_clip(2, 3.0, size=64, speech="espeak", listen_frac=0.4)
    _check_clip(c, 3.0)
    assert c.params["speech_source"] == "espeak" and c.params["texts"]
    x = synth.espeak_tts("hello world", "en+f3", 170, 50)
    assert x.dtype == np.float32 and 0.3 < len(x) / 16000 < 3 and np.abs(x).max() > 0.05


def test_missing_espeak_message(monkeypatch):
    monkeypatch.setattr(synth.speech.shutil, "which", lambda name: None)
    assert not espeak_available()
    with pytest.raises(InputError, match="espeak-ng is not installed"):
        synth.espeak_tts("hello")
    with pytest.raises(InputError, match="babble"):
        make_clip(0, 1.0, size=32, speech="espeak")
    c = make_clip(0, 1.0, size=32, speech="auto")  # falls back to babble
    assert c.params["speech_source"] == "babble"


def test_dataset_resumable_and_loader(tmp_path):
    av = pytest.importorskip("av")
    from talkingmachines.dataset import ClipDataset, held_out_split

    out = tmp_path / "ds"
    idx = synth_dataset(3, out, seed=0, size=64, seconds=(1.2, 1.8), speech=SPEECH, progress=False)
    index = json.loads(idx.read_text())
    assert index["n"] == 3 and len(index["clips"]) == 3
    names = sorted(p.name for p in out.iterdir())
    assert names == ["clip_00000.mp4", "clip_00000.npz", "clip_00001.mp4", "clip_00001.npz",
                     "clip_00002.mp4", "clip_00002.npz", "index.json"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("clip_*")}
    t = time.perf_counter()
    synth_dataset(3, out, seed=0, size=64, seconds=(1.2, 1.8), speech=SPEECH, progress=False)
    assert time.perf_counter() - t < 2.0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("clip_*")} == mtimes  # skipped
    # a missing clip is made again, the others are kept
    (out / "clip_00001.npz").unlink()
    synth_dataset(3, out, seed=0, size=64, seconds=(1.2, 1.8), speech=SPEECH, progress=False)
    assert (out / "clip_00001.npz").exists()
    assert (out / "clip_00000.npz").stat().st_mtime_ns == mtimes["clip_00000.npz"]

    c0 = index["clips"][0]
    with av.open(str(out / c0["mp4"])) as f:
        n = sum(1 for _ in f.decode(video=0))
    assert n == c0["frames"]

    ds = ClipDataset(out, clip_frames=21, seed=1)
    assert len(ds) == 3
    a, b = ds[0], ds[0]
    assert a["video"].shape == (21, 64, 64, 3) and a["audio"].shape == (21 * SAMPLES_PER_FRAME,)
    assert a["ref"].shape == (64, 64, 3) and a["mouth_open"].shape == (21,) and a["speaking"].dtype == bool
    assert a["start"] == b["start"] and np.array_equal(a["ref"], b["ref"])
    full = ds.load(0)
    s = a["start"]
    assert np.array_equal(a["video"], full["frames"][s: s + 21])
    assert np.array_equal(a["audio"], full["audio"][s * SAMPLES_PER_FRAME:(s + 21) * SAMPLES_PER_FRAME])
    starts = set()
    for e in range(6):
        ds.set_epoch(e)
        starts.add(ds[0]["start"])
    assert len(starts) > 1
    train, held = held_out_split(ds, 0.34)
    assert len(train) == 2 and len(held) == 1
    assert not set(train.indices) & set(held.indices)
    with pytest.raises(InputError):
        ClipDataset(out, clip_frames=20)


def test_preview(tmp_path):
    from PIL import Image

    p = synth.preview(tmp_path / "sheet.png", n=6, seed=0, size=64, cols=3)
    assert Image.open(p).size == (192, 128)


def test_data_version_2_head_ignores_speech_and_face_is_closer():
    """v2: head motion and brows are the same whatever is said (v1's follow the mouth), the face
    is 1.3x larger with a 1.3x wider maximum opening, and the clip records its version."""
    from talkingmachines.train.synth import FaceParams, framed, head_motion, make_clip

    T = 120
    quiet, loud = np.zeros(T, bool), np.ones(T, bool)
    still, open_ = np.zeros(T, np.float32), np.full(T, 0.8, np.float32)
    for version, same in ((1, False), (2, True)):
        a = head_motion(np.random.default_rng(0), quiet, still, version)
        b = head_motion(np.random.default_rng(0), loud, open_, version)
        assert all(np.array_equal(x, y) for x, y in zip(a, b)) == same, version
    p = FaceParams.sample(3)
    q = framed(p, 2)
    assert q.face_w == pytest.approx(1.3 * p.face_w) and q.max_open == pytest.approx(1.3 * p.max_open)
    assert framed(p, 1) is p
    c = make_clip(3, seconds=1.0, speech="babble", version=2)
    assert c.params["data_version"] == 2 and c.params["face"]["face_w"] == pytest.approx(q.face_w)


def test_data_version_3_moves_the_head_less_and_opens_the_mouth_wider():
    """v3: v2's framing with a 1.55x (v1) opening, and head motion that still ignores the speech but
    at about a third of v2's amplitude (the mouth holds most of the change over time)."""
    from talkingmachines.train.synth import FaceParams, framed, head_motion

    T = 200
    quiet, loud = np.zeros(T, bool), np.ones(T, bool)
    still, open_ = np.zeros(T, np.float32), np.full(T, 0.8, np.float32)
    a = head_motion(np.random.default_rng(0), quiet, still, 3)
    b = head_motion(np.random.default_rng(0), loud, open_, 3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    v2 = head_motion(np.random.default_rng(0), quiet, still, 2)
    for x3, x2 in zip(a[:3], v2[:3]):  # dx, dy, tilt
        assert np.abs(x3).max() == pytest.approx(np.abs(x2).max() * 0.55 / 1.6, rel=1e-5)
    p = FaceParams.sample(3)
    assert framed(p, 3).max_open == pytest.approx(1.55 * p.max_open)
    assert framed(p, 3).face_w == pytest.approx(framed(p, 2).face_w)


def _head_moved(clip) -> int:
    """The largest integer translation (pixels) of any frame from the first, by phase correlation."""
    g = clip.frames.astype(float).mean(-1)

    def shift(a, b):
        r = np.fft.fft2(a) * np.conj(np.fft.fft2(b))
        peak = np.abs(np.fft.ifft2(r / (np.abs(r) + 1e-9))).argmax()
        return [(x + n // 2) % n - n // 2 for x, n in zip(np.unravel_index(peak, a.shape), a.shape)]

    return max(int(np.abs(shift(g[t], g[0])).max()) for t in range(len(g)))


def test_data_version_6_is_version_4_with_a_still_head():
    """v6: the same clip as v4 for the same seed (identity, speech, mouth, blinks, gaze) with no
    head sway, nod or tilt: every frame's face sits where the first frame's does (a reference
    frame then shows the DiT where the eyes stay)."""
    from talkingmachines.train.synth import make_clip, moves_head

    assert not moves_head(6) and all(moves_head(v) for v in (1, 2, 3, 4, 5))
    for seed in (2, 5):
        c4, c6 = (make_clip(seed, 2.0, size=96, version=v) for v in (4, 6))
        assert np.array_equal(c4.audio, c6.audio) and np.array_equal(c4.mouth_open, c6.mouth_open)
        assert c6.params["face"] == c4.params["face"] and c6.params["data_version"] == 6
        moved4, moved6 = _head_moved(c4), _head_moved(c6)
        assert moved6 == 0 and moved4 >= 1, (moved4, moved6)


def test_data_version_7_holds_the_gaze():
    """v7: v6 (a still head) whose eyes hold the clip's first fixation throughout; the same random
    draws, so the identity, speech and the rest of the clip stay v6's."""
    from talkingmachines.train.synth import gaze_track, make_clip, moves_head

    assert not moves_head(7)
    g4 = gaze_track(np.random.default_rng(3), 400, 4)
    g7 = gaze_track(np.random.default_rng(3), 400, 7)
    for a, b in zip(g4, g7):
        assert len(np.unique(a)) > 1 and np.all(b == a[0])
    c6, c7 = (make_clip(4, 2.0, size=96, version=v) for v in (6, 7))
    assert np.array_equal(c6.audio, c7.audio) and c6.params["face"] == c7.params["face"]
    assert c7.params["data_version"] == 7


def test_data_version_8_is_version_5_with_a_still_head():
    """v8: v5's readable mouth with v6's still head; the same seed draws v5's clip (identity,
    speech, mouth) and no frame's face moves from the first one's (v5's sways)."""
    from talkingmachines.train.synth import make_clip, moves_head

    assert not moves_head(8)
    for seed in (2, 3):
        c5, c8 = (make_clip(seed, 2.0, size=96, version=v) for v in (5, 8))
        assert np.array_equal(c5.audio, c8.audio) and np.array_equal(c5.mouth_open, c8.mouth_open)
        assert c8.params["face"] == c5.params["face"] and c8.params["face"]["mouth_shape"] == "lens"
        moved5, moved8 = _head_moved(c5), _head_moved(c8)
        assert moved8 == 0 and moved5 >= 1, (moved5, moved8)


def test_bundled_portrait_is_drawn_like_the_shipped_models_data():
    """The default portrait is the renderer's photo-like face drawn as data version 4 draws its
    faces (version 3's close-up plus contour shading: what the shipped model was trained on), so
    `demo` shows the model a face of the kind it knows."""
    from PIL import Image

    from talkingmachines.train.synth import default_portrait

    asset = np.asarray(Image.open(Path(talkingmachines.__file__).parent / "assets" / "portrait.png").convert("RGB"))
    assert asset.shape == (512, 512, 3)
    d4 = np.abs(asset.astype(float) - default_portrait(4)).mean()
    d3 = np.abs(asset.astype(float) - default_portrait(3)).mean()
    d1 = np.abs(asset.astype(float) - default_portrait(1)).mean()
    assert d4 < 1.0 < min(d3, d1), (d4, d3, d1)


def test_data_version_4_draws_the_structure_a_face_detector_needs():
    """v4: v3's framing and motion, plus soft contour shading (eye sockets, nose, under the lip,
    the rim), a lid line in every style, a darker closed-mouth line, no ring round outline faces'
    lips, no blush and no dotted or striped backgrounds. The independent judge (dlib) finds a
    closed-mouth face far more often than in v3, where the closed mouths of flat faces were
    missed nearly always."""
    pytest.importorskip("dlib", reason="the eval extra (dlib-bin) is part of the dev install; see README")
    from talkingmachines.eval.face_judge import FaceJudge
    from talkingmachines.train.synth import FaceParams, FaceRenderer, FaceState, framed

    p = FaceParams.sample(3)
    q3, q4 = framed(p, 3), framed(p, 4)
    assert (q4.face_w, q4.max_open, q4.cy) == (q3.face_w, q3.max_open, q3.cy)
    assert q4.contour > 0 and q4.lid_line and not q4.blush and not q4.mouth_outline and q3.contour == 0
    judge = FaceJudge.load()
    found = {3: [], 4: []}
    for seed in range(1000, 1032):
        for v in (3, 4):
            frame = FaceRenderer(framed(FaceParams.sample(seed), v), 128).render(FaceState())
            found[v].append(judge.frame(frame)[0])
    rate3, rate4 = np.mean(found[3]), np.mean(found[4])
    assert rate4 >= 0.8 and rate4 >= rate3 + 0.2, (rate3, rate4)


def test_data_version_5_draws_a_mouth_the_landmark_model_reads():
    """v5: v4's faces with a lens-shaped open mouth (pointed corners, no taller than 0.7x its
    width, v1's maximum height), a dark inside and lips lighter than it. The judge's lip opening
    follows the drawn opening far better than on v4's elliptical mouths, whose widest openings
    it read as closed."""
    pytest.importorskip("dlib", reason="the eval extra (dlib-bin) is part of the dev install; see README")
    from talkingmachines.eval.face_judge import FaceJudge, lip_opening
    from talkingmachines.train.synth.face import INNER_MAX_LUM, LIP_LIGHT, LIP_OVER_INNER, _lum

    for seed in range(40):
        p = FaceParams.sample(seed)
        q4, q5 = framed(p, 4), framed(p, 5)
        assert q5.mouth_shape == "lens" and q4.mouth_shape == "ellipse"
        assert q5.max_open == pytest.approx(p.max_open) and (q5.face_w, q5.cy) == (q4.face_w, q4.cy)
        assert _lum(q5.mouth_inner) <= INNER_MAX_LUM + 0.01
        assert _lum(q5.lip) >= _lum(q5.mouth_inner) + LIP_OVER_INNER or q5.lip == LIP_LIGHT
    judge = FaceJudge.load()
    levels = np.linspace(0, 1, 8)
    corr = {4: [], 5: []}
    for seed in range(2000, 2024):
        for v in (4, 5):
            r = FaceRenderer(framed(FaceParams.sample(seed), v), 128)
            read = [(m, judge.landmarks(r.render(FaceState(mouth_open=float(m))))) for m in levels]
            xs = [m for m, pts in read if pts is not None]
            ys = [lip_opening(pts) for _, pts in read if pts is not None]
            if len(xs) >= 5 and np.std(ys) > 0:
                corr[v].append(np.corrcoef(xs, ys)[0, 1])
    c4, c5 = np.mean(corr[4]), np.mean(corr[5])
    print(f"judge vs drawn opening: v4 corr {c4:.2f}, v5 {c5:.2f}")
    assert c5 >= 0.55 and c5 >= c4 + 0.15, (c4, c5)
    # the open lens mouth: a dark opening that grows with mouth_open, inside the mouth box
    p = framed(FaceParams.sample(7), 5)
    r = FaceRenderer(p, 128)
    y0, y1, x0, x1 = synth.mouth_roi_from_face(p, 128)
    dark = [(r.render(FaceState(mouth_open=m))[y0:y1, x0:x1].mean(-1) < 60).sum() for m in (0.0, 0.4, 0.8)]
    assert dark[0] < dark[1] < dark[2], dark


@pytest.mark.parametrize("version", (4, 5))
def test_features_mask_holds_what_blinks_brows_and_the_mouth_change(version):
    """The eyes-and-mouth mask (the VAE's feature-weighted loss) covers every pixel that a
    blink, a raised brow or an opening mouth changes, and leaves most of the frame out."""
    for seed in range(12):
        p = framed(FaceParams.sample(seed), version)
        m = features_mask_from_face(p, 128).astype(bool)
        assert 0.05 < m.mean() < 0.4, (seed, m.mean())
        rest = render_face(p, FaceState(), 128).astype(int)
        for st in (FaceState(blink=1.0), FaceState(brow=1.0), FaceState(mouth_open=1.0),
                   FaceState(mouth_open=1.0, mouth_round=1.0)):
            # > 60: above the per-frame grain (up to 15 per channel)
            changed = np.abs(render_face(p, st, 128).astype(int) - rest).sum(-1) > 60
            assert changed.any() and changed[m].sum() >= 0.98 * changed.sum(), (seed, st, changed[~m].sum())
