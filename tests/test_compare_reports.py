"""scripts/compare_reports.py: eval-model reports side by side, and the per-clip difference of the
lip correlation and of the face found where the ground truth's is, against the first report."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "scripts" / "compare_reports.py"


def _report(path: Path, corrs: list[float], found: float, where: list[float] | None = None) -> str:
    where = where or [found] * len(corrs)
    clips = [{"name": f"clip_{i:05d}", "face": {"student": {"confidence": c, "face_found": found,
                                                            "found_where_reference_found": w}}}
             for i, (c, w) in enumerate(zip(corrs, where))]
    pooled = {"face_found": found, "found_where_reference_found": found, "face_found_speech": found,
              "face_found_silence": found, "lag": 1, "confidence": sum(corrs) / len(corrs), "open_ratio_median": 3.0}
    path.write_text(json.dumps({"face": {"student": pooled}, "clips": clips}))
    return str(path)


def test_compare_reports_pools_and_pairs(tmp_path):
    a = _report(tmp_path / "a.json", [0.5, 0.6, 0.7, 0.4], 0.9)
    b = _report(tmp_path / "b.json", [0.6, 0.7, 0.7, 0.5], 0.95, where=[1.0, 0.9, 0.8, 0.9])
    out = subprocess.run([sys.executable, str(SCRIPT), f"base={a}:student", f"new={b}:student"],
                         capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert lines[1].startswith("base") and "90.0 %" in lines[1] and "0.550" in lines[1]
    assert lines[2].startswith("new") and "95.0 %" in lines[2] and "0.625" in lines[2]
    # differences 0.1, 0.1, 0, 0.1: mean 0.075, s.e. 0.025, higher on 3 of 4
    assert "new against base: lip corr per clip +0.075 (s.e. 0.025), higher on 3, lower on 0 of 4" in out
    # found where GT's is: 0.1, 0, -0.1, 0 against 0.9 each: mean 0, s.e. sqrt(0.02/3/4)
    assert "found where GT's is per clip +0.000 (s.e. 0.041), higher on 1, lower on 1 of 4" in out


def test_compare_reports_bad_input_is_one_line(tmp_path):
    a = _report(tmp_path / "a.json", [0.5, 0.6], 0.9)
    for args in ([f"x={tmp_path / 'missing.json'}:student"], [f"x={a}:teacher"], ["no-label"]):
        r = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)
        assert r.returncode != 0 and r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1


NEW_FACES = Path(__file__).parents[1] / "scripts" / "new_faces_figure.py"


def test_new_faces_figure_rows_line_up(tmp_path):
    """scripts/new_faces_figure.py: per clip a ground-truth row, then one row per model of the same frames,
    written atomically; bad input is a one-line error."""
    import numpy as np
    from PIL import Image

    data = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "talkingmachines", "data", "synth", "--out", str(data), "--n", "1",
                    "--seed", "3", "--data-version", "4", "--min-seconds", "2", "--max-seconds", "2", "--workers", "1",
                    "--no-video"], check=True, capture_output=True)
    out = tmp_path / "fig.png"
    r = subprocess.run([sys.executable, str(NEW_FACES), str(out), "--data", str(data), "--clips", "0",
                        "--model", "shipped=" + str(Path(__file__).parents[1] / "src/talkingmachines/weights/tiny"),
                        "--scale", "1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    fig = np.asarray(Image.open(out).convert("RGB")).astype(float)
    assert fig.shape == (2 * (128 + 14), 13 * 128, 3)  # 13 frames (every 2nd of a second), 2 rows
    gt, model = fig[14:142], fig[142 + 14:]
    assert gt.std() > 10 and model.std() > 10  # pictures, not blanks
    assert 0 < np.abs(gt - model).mean() < 60  # the model's video of the same face, not a copy of the clip
    assert not list(tmp_path.glob(".fig.png.tmp*"))
    bad = subprocess.run([sys.executable, str(NEW_FACES), str(out), "--data", str(data), "--clips", "5",
                          "--model", "x=y"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and len(bad.stderr.strip().splitlines()) == 1


def test_compare_reports_one_skin_band(tmp_path):
    """``--skin dark``: the pooled rows are the report's dark-skin figures and the per-clip differences run
    over the clips whose synthetic face (read from the report's data folder) has dark skin only."""
    from talkingmachines.train.latents import clip_skin
    from talkingmachines.train.synth import synth_dataset

    data = synth_dataset(12, tmp_path / "data", seed=3, size=32, seconds=(1.0, 1.2), speech="babble", video=False,
                         progress=False, version=4).parent
    names = [f"clip_{i:05d}" for i in range(12)]
    dark = [n for n in names if clip_skin(data / f"{n}.npz") == "dark"]
    assert 2 <= len(dark) < 12, "the fixture needs a few dark-skinned clips and some others"
    a = json.loads(Path(_report(tmp_path / "a.json", [0.5] * 12, 0.9)).read_text())
    # the new report's lip corr is 0.2 higher on the dark clips and 0.4 lower on the others
    b = json.loads(Path(_report(tmp_path / "b.json", [0.7 if n in dark else 0.1 for n in names], 0.9)).read_text())
    for rep, corr in ((a, 0.5), (b, 0.7)):
        rep["data"] = {"dir": str(data)}
        rep["face_by_skin"] = {"dark": {"clips": len(dark), "systems": {"student": {
            **rep["face"]["student"], "confidence": corr}}}}
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    out = subprocess.run([sys.executable, str(SCRIPT), "--skin", "dark", f"base={tmp_path / 'a.json'}:student",
                          f"new={tmp_path / 'b.json'}:student"], capture_output=True, text=True, check=True).stdout
    assert "0.700" in out.splitlines()[2]
    assert f"lip corr per clip +0.200 (s.e. 0.000), higher on {len(dark)}, lower on 0 of {len(dark)}" in out
    r = subprocess.run([sys.executable, str(SCRIPT), "--skin", "light", f"base={tmp_path / 'a.json'}:student"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.strip().startswith("error:") and "'light'" in r.stderr


MOUTH_SIGNAL = Path(__file__).parents[1] / "scripts" / "mouth_latent_signal.py"


def test_mouth_latent_signal_per_skin_band(tmp_path):
    """scripts/mouth_latent_signal.py: per skin band, how much the drawn opening moves the shipped VAE's
    latents in the mouth box (written atomically as JSON); a folder without clips is a one-line error."""
    from talkingmachines.train.synth import synth_dataset

    data = synth_dataset(4, tmp_path / "data", seed=3, size=128, seconds=(4.2, 4.4), speech="babble", video=False,
                         progress=False, version=4).parent
    r = subprocess.run([sys.executable, str(MOUTH_SIGNAL), str(data), "--json", str(tmp_path / "s.json")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = json.loads((tmp_path / "s.json").read_text())
    assert sum(b["clips"] for b in got.values()) == 4 and set(got) <= {"dark", "medium", "light"}
    for b in got.values():
        # the mouth moves more than the rest of a still-headed frame, and the opening explains some of it
        assert b["box_rms"] > b["rest_rms"] > 0 and b["slope_rms"] > 0 and b["opening_std"] > 0
    (tmp_path / "empty").mkdir()
    r = subprocess.run([sys.executable, str(MOUTH_SIGNAL), str(tmp_path / "empty")], capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1


def test_compare_reports_several_seeds_per_label(tmp_path):
    """LABEL=R1,R2:SYSTEM: one row per report, and the per-clip differences taken on each clip's mean
    over the reports (the same model at several noise seeds)."""
    a1 = _report(tmp_path / "a1.json", [0.5, 0.6, 0.7], 0.9)
    a2 = _report(tmp_path / "a2.json", [0.7, 0.6, 0.5], 0.8)
    b1 = _report(tmp_path / "b1.json", [0.8, 0.6, 0.8], 0.9)
    b2 = _report(tmp_path / "b2.json", [0.6, 0.8, 0.6], 0.9)
    out = subprocess.run([sys.executable, str(SCRIPT), f"base={a1},{a2}:student", f"new={b1},{b2}:student"],
                         capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert [ln.split()[0] for ln in lines[1:5]] == ["base/1", "base/2", "new/1", "new/2"]
    assert "80.0 %" in lines[2] and "0.600" in lines[2]
    # per-clip means: base 0.6, 0.6, 0.6; new 0.7, 0.7, 0.7 -> +0.1 on each of 3
    assert "new against base: lip corr per clip +0.100 (s.e. 0.000), higher on 3, lower on 0 of 3" in out
    # found where GT's is: base means 0.85 each, new 0.9 each
    assert "found where GT's is per clip +0.050 (s.e. 0.000), higher on 3, lower on 0 of 3" in out
