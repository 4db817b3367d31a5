"""Quality metrics: the pixel mouth measure against the renderer's truth, lag recovery,
listening stillness, drift, the `eval` CLI and a smoke run of `evaluate_model`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from talkingmachines.eval import quality as q
from talkingmachines.train.synth import make_clip

torch.set_num_threads(1)

SEEDS = (11, 22, 33)


@pytest.fixture(scope="module")
def clips():
    # babble speech: no espeak-ng needed; listening turns so there is silence to measure
    return [make_clip(s, 4.0, size=128, speech="babble", listen_frac=0.4) for s in SEEDS]


@pytest.fixture(scope="module")
def signals(clips):
    return [q.mouth_signal(c.frames, face=c.params["face"]) for c in clips]


def test_pixel_mouth_score_tracks_ground_truth(clips, signals):
    for c, s in zip(clips, signals):
        assert c.mouth_open.std() > 0.05  # the clip talks
        r = np.corrcoef(s, c.mouth_open)[0, 1]
        assert r >= 0.8, (c.params["seed"], c.params["face"]["style"], r)
    # without the face geometry (centred-portrait guess): weaker, still clearly positive
    auto = [np.corrcoef(q.mouth_signal(c.frames), c.mouth_open)[0, 1] for c in clips]
    assert np.mean(auto) >= 0.6, auto


def test_pixel_mouth_score_with_audio_tracks_ground_truth_too(clips):
    """With the speech given, the rest look is sought from the listening frames' mouth: on the
    ground truth the score still follows the renderer's opening."""
    for c in clips:
        s = q.mouth_signal(c.frames, face=c.params["face"], audio=c.audio)
        assert np.corrcoef(s, c.mouth_open)[0, 1] >= 0.8, c.params["seed"]


def test_pixel_mouth_rest_look_comes_from_silence_when_the_mouth_is_mostly_open():
    """A mouth open on most frames (all of speech) and closed only while listening: from the
    pixels alone the open look is the clip's commonest, becomes the rest look, and the closed
    mouth of silence scores as the open one; with the audio, silence sets the rest look."""
    T, speech_T = 60, 45
    frames = np.full((T, 64, 64, 3), 200, np.uint8)  # skin
    frames[:speech_T, 36:48, 20:44] = 30  # an open, dark mouth through the speech
    frames[speech_T:, 41:43, 20:44] = 120  # a closed lip line while listening
    rng = np.random.default_rng(0)
    audio = np.zeros(T * 640, np.float32)
    audio[: speech_T * 640] = 0.3 * rng.standard_normal(speech_T * 640)
    roi = (32, 52, 16, 48)
    blind = q.mouth_signal(frames, roi)
    heard = q.mouth_signal(frames, roi, audio=audio)
    assert blind[speech_T + 5:].mean() > blind[:speech_T].mean()  # the failure the audio fixes
    assert heard[speech_T + 5:].max() < 0.05 and heard[5:speech_T - 5].min() > 0.3


def test_lag_recovers_known_shift(clips, signals):
    c, s = clips[0], signals[0]
    env = q.speech_envelope(c.audio, len(s))
    base = q.lipsync(s, env)
    assert base["lag"] == 0 and base["confidence"] >= 0.6, base
    roi = q.mouth_roi_from_face(c.params["face"], 128)
    late = np.concatenate([np.repeat(c.frames[:1], 3, 0), c.frames[:-3]])  # video 3 frames late
    early = np.concatenate([c.frames[3:], np.repeat(c.frames[-1:], 3, 0)])  # video 3 frames early
    assert q.lipsync(q.mouth_signal(late, roi), env)["lag"] == 3
    assert q.lipsync(q.mouth_signal(early, roi), env)["lag"] == -3
    # ground truth signal: the ceiling
    gt = q.lipsync(c.mouth_open, env)
    assert gt["lag"] == 0 and gt["confidence"] >= 0.8


def test_stillness_ratio_high_for_ground_truth(clips, signals):
    ratios = []
    for c, s in zip(clips, signals):
        m = q.evaluate_signals(s, c.audio)
        assert m["stillness"]["silence_frames"] > 5 and m["stillness"]["speech_frames"] > 10
        # head motion and blinks leave some pixel noise in silence: per clip >= 1.5, typically far more
        assert m["stillness_ratio"] >= 1.5, (c.params["seed"], m["stillness"])
        ratios.append(m["stillness_ratio"])
        assert q.evaluate_signals(c.mouth_open, c.audio)["stillness_ratio"] >= 10.0  # the renderer's truth
    assert np.median(ratios) >= 2.0, ratios
    # a mouth that keeps moving in silence scores low
    rng = np.random.default_rng(0)
    c = clips[0]
    noisy = rng.uniform(0, 1, len(c.mouth_open))
    assert q.evaluate_signals(noisy, c.audio)["stillness_ratio"] < 1.5


def test_silence_motion_by_phase_finds_a_jump_between_latents():
    """A mouth signal that is still in silence except for a jump every 4th frame (latent jitter)
    shows it at that phase only."""
    T = 200
    speech = np.zeros(T, bool)
    speech[:60] = True
    silence = ~speech
    silence[60:66] = False
    m = np.where(speech, np.sin(np.arange(T)), 0.0)
    m[60:][np.arange(60, T)[:] % 4 == 1] += 0.2  # a jump at frames 4k+1 (and back at 4k+2)
    st = q.stillness(m, speech, silence)
    ph = st["motion_silence_by_phase"]
    assert ph[1] > 0.15 and ph[2] > 0.15 and ph[0] < 1e-9 and ph[3] < 1e-9, ph


def test_drift_constant_vs_creeping():
    f = np.full((800, 32, 32, 3), 120, np.uint8)
    d = q.drift(f)
    assert d["psnr_first_last"] == q.PSNR_CAP and d["brightness_shift"] == 0
    creep = f.astype(np.float64)
    creep[..., 0] += np.linspace(0, 80, 800)[:, None, None]  # red creeps up over 32 s
    d = q.drift(creep.astype(np.uint8))
    assert d["psnr_first_last"] < 24.0
    assert d["rgb_shift"][0] > 40 and abs(d["rgb_shift"][1]) < 1e-9 and d["brightness_shift"] > 10
    assert d["psnr_by_window"][-1] < d["psnr_by_window"][0]
    # streamed in chunks == all at once
    acc = q.DriftAccumulator()
    for i in range(0, 800, 12):
        acc.add(creep[i:i + 12].astype(np.uint8))
    assert acc.result()["psnr_first_last"] == pytest.approx(d["psnr_first_last"])


def test_eval_cli_json_on_mp4(clips, tmp_path, capsys):
    from talkingmachines.cli import main
    from talkingmachines.media import write_mp4

    c = clips[1]
    path = tmp_path / "talk.mp4"
    write_mp4(path, c.frames, c.audio)
    assert main(["eval", str(path), "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    r = json.loads(out[0])
    assert r["frames"] == c.num_frames and r["lag"] is not None
    assert abs(r["lag"]) <= 1 and r["confidence"] > 0.5, r
    assert r["drift"]["psnr_first_last"] > 20


def test_evaluate_model_smoke_random_weights():
    from talkingmachines.stream.generator import load_avatar

    avatar = load_avatar(None, "tiny")
    clip = make_clip(46, 1.6, size=128, speech="babble", listen_frac=0.4)  # 12 speech, 23 silent frames
    teacher = lambda portrait, audio: np.repeat(portrait[None], -(-len(audio) // 640), 0)  # noqa: E731
    r = q.evaluate_model(avatar, [clip], long_seconds=0.5, teacher=teacher, progress=False)
    assert set(r["summary"]) == {"ground_truth_signal", "ground_truth", "vae_roundtrip", "student", "teacher"}
    assert len(r["summary"]["ground_truth"]["silence_motion_by_phase"]) == 4
    assert r["summary"]["ground_truth_signal"]["lag"] == 0
    row = r["clips"][0]
    assert row["student"]["frames"] == row["vae_roundtrip"]["frames"] == clip.num_frames
    # the round trip of a clip whose length is not 1 + 4k still covers every frame
    odd = q.vae_roundtrip(avatar, clip.frames[:11])
    assert odd.shape == (11, 128, 128, 3) and odd.dtype == np.uint8
    assert r["long_stream"]["drift"]["seconds"] >= 0.5 and r["long_stream"]["portrait_clip"] == row["name"]
    assert set(r["targets"]) >= {"lag_within_2", "confidence_ge_0.5", "stillness_ge_2", "drift_psnr_ge_24"}
    # the face judge scores every column, pooled and per clip, and the long stream
    assert set(r["face"]) == {"ground_truth", "vae_roundtrip", "student", "teacher"}
    assert set(row["face"]) == set(r["face"]) and "face_found" in r["long_stream"]["face"]
    assert {"face_found_ge_0.98", "face_found_where_gt_ge_0.98", "vae_face_corr_ge_0.75",
            "teacher_face_corr_ge_0.6"} <= set(r["targets"])
    # every generated column is paired with the ground truth's face frames
    n_gt = round(row["face"]["ground_truth"]["face_found"] * row["face"]["ground_truth"]["frames"])
    for k in ("vae_roundtrip", "student", "teacher"):
        assert row["face"][k]["reference_found_frames"] == n_gt
    assert "found_where_reference_found" not in row["face"]["ground_truth"]
    # pooled again over the clips whose ground-truth face the judge sees: here that one clip or none
    fv = r["face_visible"]
    seen = r["face"]["ground_truth"]["face_found"] >= fv["min_ground_truth_found"]
    assert fv["of"] == 1 and fv["clips"] == int(seen)
    if seen:
        assert fv["systems"]["student"]["face_found"] == r["face"]["student"]["face_found"]
        # the bars again on those clips, beside the all-clip ones
        assert r["targets"]["visible_face_found_where_gt_ge_0.98"] == r["targets"]["face_found_where_gt_ge_0.98"]
    else:
        assert all(not v for v in fv["systems"].values())
        assert not any(k.startswith("visible_") for k in r["targets"])
    # and over the clips whose ground-truth lips the judge reads
    from talkingmachines.eval.runners import reads_lips

    fr = r["face_readable"]
    reads = reads_lips(row["face"]["ground_truth"])
    assert fr["of"] == 1 and fr["clips"] == int(reads)
    assert any(k.startswith("readable_") for k in r["targets"]) == reads
    # and per drawing style: the one clip's style
    style = clip.params["face"]["style"]
    assert list(r["face_by_style"]) == [style]
    assert q.to_json(r["face_by_style"][style]["systems"]["student"]) == q.to_json(r["face"]["student"])
    line = q.to_json(r)
    assert "\n" not in line and "NaN" not in line and "Infinity" not in line
    json.loads(line)
    # a VAE judged on its own: ground truth and round trip only
    v = q.evaluate_model(avatar, [clip], student=False, progress=False)
    assert set(v["summary"]) == {"ground_truth_signal", "ground_truth", "vae_roundtrip"} and "long_stream" not in v
    assert set(v["face"]) == {"ground_truth", "vae_roundtrip"}


def test_reads_lips_needs_a_close_lag_and_a_strong_correlation():
    """A clip counts as one whose ground-truth lips the judge reads only when their opening
    follows the speech at correlation >= 0.6 within 2 frames; no lip-sync reading (no speech, or
    no face) never counts."""
    from talkingmachines.eval.runners import READABLE_MIN_CORR, reads_lips

    assert READABLE_MIN_CORR == 0.6
    assert reads_lips({"lag": 1, "confidence": 0.6}) and reads_lips({"lag": -2, "confidence": 0.9})
    assert not reads_lips({"lag": 3, "confidence": 0.9}) and not reads_lips({"lag": 0, "confidence": 0.59})
    assert not reads_lips({"lag": None, "confidence": float("nan")}) and not reads_lips({"face_found": 1.0})


def test_fill_card_replaces_only_the_metrics_section(tmp_path):
    """`eval-model --card` rewrites the section between the markers from the report, and keeps
    the rest of the card; a card without the markers is refused."""
    from talkingmachines.errors import InputError
    from talkingmachines.eval.quality_cli import CARD_BEGIN, CARD_END, fill_card
    from talkingmachines.stream.generator import load_avatar

    avatar = load_avatar(None, "tiny")
    clip = make_clip(46, 1.6, size=128, speech="babble", listen_frac=0.4)
    r = json.loads(q.to_json(q.evaluate_model(avatar, [clip], long_seconds=0.5, progress=False)))
    r["data"] = {"dir": "runs/data", "held_out_clips": 1, "evaluated": 1}
    card = tmp_path / "card.md"
    card.write_text(f"# card\nbefore\n{CARD_BEGIN}\n| old | TBD |\n{CARD_END}\nafter\n")
    fill_card(card, r, "talkingmachines eval-model --n 1")
    text = card.read_text()
    assert text.startswith("# card\nbefore\n") and text.endswith(f"{CARD_END}\nafter\n") and "TBD" not in text
    lag = r["summary"]["student"]["lag"]
    assert f"| lip-sync best lag (frames) | {lag if lag is not None else 'n/a'} |" in text
    assert "`talkingmachines eval-model --n 1`" in text and "0.5 s stream" not in text.split(CARD_END)[1]
    assert ("clips it can see" in text) == bool(r["face_visible"]["clips"])
    bare = tmp_path / "bare.md"
    bare.write_text("# no markers\n")
    with pytest.raises(InputError, match="no '<!-- metrics:begin -->'"):
        fill_card(bare, r, "x")
    assert bare.read_text() == "# no markers\n"


def test_long_stream_audio_ends_as_it_starts():
    """The drift stream's last window repeats its first exactly (same speech, so only drift
    can tell them apart); the rest loops the clips with silences between them."""
    rng = np.random.default_rng(0)
    clips = [rng.normal(0, 0.1, int(16000 * s)).astype(np.float32) for s in (2.3, 3.1)]
    a = q.long_stream_audio(clips, 30.0, seed=1, repeat_first=5.0)
    assert len(a) == 30 * 16000
    np.testing.assert_array_equal(a[-5 * 16000:], a[:5 * 16000])
    np.testing.assert_array_equal(a[:len(clips[0])], clips[0])
    assert (a[len(clips[0]): len(clips[0]) + 8000] == 0).all()  # a silence of >= 0.5 s follows each clip
    b = q.long_stream_audio(clips, 30.0, seed=1)
    np.testing.assert_array_equal(a[: 20 * 16000], b[: 20 * 16000])  # same loop until the repeat
    assert not np.array_equal(b[-5 * 16000:], b[:5 * 16000])


def test_lipsync_pooled_and_gated_in_one_place():
    """The pixel metrics and the face judge pool per-clip lip-sync the same way (one
    `metrics.pool_lipsync`), and both report no lag when there is too little speech or too
    few readable frames (`metrics.lipsync_in_speech`)."""
    from talkingmachines.eval import face_judge, metrics

    a = {"frames": 100, "corr_by_lag": {-1: 0.2, 0: 0.5, 1: 0.3}, "lag": 0, "confidence": 0.5}
    b = {"frames": 300, "corr_by_lag": {-1: 0.1, 0: 0.2, 1: 0.6}, "lag": 1, "confidence": 0.6}
    pixel = metrics.summarize_signals([dict(m, stillness_ratio=2.0, stillness={}) for m in (a, b)])
    face = face_judge.summarize([dict(m, face_found=1.0) for m in (a, b)])
    want = {"lag": 1, "confidence": (30 + 180) / 400, "corr_at_0": (50 + 60) / 400, "mean_clip_confidence": 0.55,
            "clips_lag_within_2": 1.0, "clips_with_lipsync": 2}
    for k, v in want.items():
        assert pixel[k] == pytest.approx(v) and face[k] == pytest.approx(v), k

    t = np.arange(200)
    env = np.where((t // 20) % 2 == 0, 1.0, 0.1) + 0.05 * np.sin(t)
    mouth = np.roll(env, 2)
    speech = env > 0.5
    assert metrics.lipsync_in_speech(mouth, env, speech)["lag"] == 2
    few = speech & (t < 9)  # 9 speech frames
    assert metrics.lipsync_in_speech(mouth, env, few)["lag"] is None
    unread = np.where(t < 191, np.nan, mouth)  # the judge read 9 frames
    ls = metrics.lipsync_in_speech(unread, env, speech)
    assert ls["lag"] is None and all(np.isnan(v) for v in ls["corr_by_lag"].values())


def test_eval_model_clip_choice(tmp_path):
    """eval-model judges every clip of a set no stage saw (`--all-clips`), a stage's
    held_out.json, or training's own split; giving two choices is a one-line error."""
    from train_fixtures import make_clips

    from talkingmachines.dataset import ClipDataset, held_out_split
    from talkingmachines.errors import InputError
    from talkingmachines.eval.quality_cli import eval_clips

    ds = ClipDataset(make_clips(tmp_path / "data", n=5, frames=9, size=16))
    assert eval_clips(ds, 0.1, 0, all_clips=True).indices == ds.indices
    listed = tmp_path / "held_out.json"
    listed.write_text(json.dumps({"clips": [ds.indices[3], ds.indices[1], 999]}))
    assert eval_clips(ds, 0.1, 0, str(listed)).indices == [ds.indices[3], ds.indices[1]]
    assert eval_clips(ds, 0.4, 0).indices == held_out_split(ds, 0.4, 0)[1].indices
    with pytest.raises(InputError, match="give one"):
        eval_clips(ds, 0.1, 0, str(listed), all_clips=True)


def test_teacher_windows_cover_each_latent_once_at_training_length():
    from talkingmachines.eval.teacher_video import windows

    for n_lat, size in ((50, 6), (12, 6), (13, 6), (5, 6), (6, 6), (7, 6), (20, 0)):
        ws = windows(n_lat, size)
        kept = [i for a, b, keep in ws for i in range(keep, b)]
        assert kept == list(range(n_lat)), (n_lat, size, ws)
        if 0 < size <= n_lat:
            assert all(b - a == size for a, b, _ in ws)  # every window as long as a training crop
        else:
            assert ws == [(0, n_lat, 0)]


def test_teacher_spec_passes_keywords_and_labels_the_card_with_what_ran():
    from talkingmachines.errors import InputError
    from talkingmachines.eval.quality_cli import _load_teacher, metrics_markdown
    from talkingmachines.stream.generator import load_avatar

    av = load_avatar()
    gen = _load_teacher("talkingmachines.eval.teacher_video:factory:steps=3,cfg_audio=1.5,window_chunks=0", av)
    assert gen.sampling == "3 Euler steps, audio CFG 1.5, whole clip"
    assert _load_teacher("talkingmachines.eval.teacher_video:factory", av).sampling == \
        "16 Euler steps, audio CFG 2.5, 6-latent windows"
    for bad in ("talkingmachines.eval.teacher_video", "talkingmachines.eval.teacher_video:factory:steps",
                "talkingmachines.eval.teacher_video:factory:nosuch=1", "talkingmachines.eval.nosuch:factory"):
        with pytest.raises(InputError, match="--teacher"):
            _load_teacher(bad, av)
    from talkingmachines.stream.generator import SHIPPED_MODEL

    r = json.loads((SHIPPED_MODEL / "eval.json").read_text())  # the shipped card's report, which has a teacher
    r["teacher_sampling"] = gen.sampling
    assert "| teacher (3 Euler steps, audio CFG 1.5, whole clip) |" in metrics_markdown(r, "x")


def test_teacher_video_windowed_matches_whole_on_a_short_clip_and_fills_a_long_one():
    from talkingmachines.eval.teacher_video import factory
    from talkingmachines.stream.generator import load_avatar

    av = load_avatar()
    rng = np.random.default_rng(0)
    portrait = (rng.random((128, 128, 3)) * 255).astype(np.uint8)
    short = (rng.standard_normal(16000 // 25 * 20) * 0.1).astype(np.float32)  # 20 frames: 5 latents, one window
    a = factory(av, steps=2, window_chunks=2)(portrait, short)
    b = factory(av, steps=2, window_chunks=0)(portrait, short)
    assert a.shape == b.shape == (20, 128, 128, 3)
    assert np.array_equal(a, b)
    long = (rng.standard_normal(16000 // 25 * 70) * 0.1).astype(np.float32)  # 18 latents: three windows
    c = factory(av, steps=2, window_chunks=2)(portrait, long)
    assert c.shape == (70, 128, 128, 3) and c.std() > 0
