"""`--align-face`: a photo framed any way is warped so its face lands where the model's training
faces sat (their mean landmarks, `face_template.json`), as the landmark model reads both."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from talkingmachines import face_align
from talkingmachines.errors import InputError


def test_similarity_recovers_a_known_transform():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, (20, 2))
    a = np.radians(17.0)
    m = np.array([[0.4 * np.cos(a), -0.4 * np.sin(a), 12.0], [0.4 * np.sin(a), 0.4 * np.cos(a), -7.0]])
    dst = src @ m[:, :2].T + m[:, 2]
    np.testing.assert_allclose(face_align.similarity(src, dst), m, atol=1e-9)
    # a mirror image is not a similarity: the fit keeps a rotation (det > 0) and leaves a residual
    fit = face_align.similarity(src, src * [-1, 1])
    assert np.linalg.det(fit[:, :2]) > 0


def test_a_model_without_a_template_is_refused(tmp_path):
    with pytest.raises(InputError, match="has no face_template.json"):
        face_align.load_template(tmp_path)
    (tmp_path / face_align.TEMPLATE_FILE).write_text(json.dumps({"points": [[0.5, 0.5]] * 3}))
    with pytest.raises(InputError, match="68"):
        face_align.load_template(tmp_path)


dlib = pytest.importorskip("dlib", reason="the eval extra (dlib-bin) is part of the dev install; see README")


@pytest.fixture(scope="module")
def judge():
    return face_align.load_judge()  # as `--align-face` reads photos: HOG, no contrast step


PHOTO = Path(__file__).parent / "assets" / "astronaut_face.jpg"  # a real face (public domain; assets/README.md)


@pytest.fixture(scope="module")
def photo():
    from PIL import Image

    return np.asarray(Image.open(PHOTO).convert("RGB"))


def _placed(img, deg, scale, shift, size):
    """``img`` turned ``deg`` degrees (counter-clockwise), scaled and moved into a ``size`` canvas."""
    import cv2

    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), deg, scale)
    m[:, 2] += shift
    return cv2.warpAffine(img, m, size, flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)


def test_a_real_face_lands_on_the_template_however_it_was_framed(judge, photo):
    from talkingmachines.stream.generator import SHIPPED_MODEL, fit_image

    t = face_align.load_template(SHIPPED_MODEL)
    tp = t[face_align.FIT_POINTS] * 128

    def err(frame):
        p = judge.landmarks(frame)
        return np.inf if p is None else float(np.linalg.norm(p[face_align.FIT_POINTS] - tp, axis=1).mean())

    base, how0 = face_align.align_face(photo, t, 128, 128, judge)
    assert base.shape == (128, 128, 3) and base.dtype == np.uint8
    assert err(base) < 3.0  # pixels of the 128 px frame
    assert err(fit_image(photo, 128, 128)) > 8  # as given, the face is far from where the model draws one
    # turned 12 degrees and shrunk off-centre into a wide canvas; turned the other way, doubled
    for deg, scale, shift, size in ((12, 0.7, (300, 40), (720, 400)), (-20, 2.0, (60, 90), (600, 640))):
        framed = _placed(photo, deg, scale, shift, size)
        aligned, how = face_align.align_face(framed, t, 128, 128, judge)
        assert err(aligned) < 3.0, (deg, err(aligned))
        assert how["scale"] == pytest.approx(how0["scale"] / scale, rel=0.05)
        assert how["rotation_deg"] == pytest.approx(how0["rotation_deg"] + deg, abs=2.0)
        assert np.abs(aligned.astype(float) - base).mean() < 8  # the same picture, whatever the framing


def test_no_face_is_a_one_line_error(judge):
    noise = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    with pytest.raises(InputError, match="no face found in noise.png"):
        face_align.align_face(noise, np.zeros((68, 2)), 128, 128, judge, source="noise.png")


def test_generate_align_face_refuses_a_faceless_image(tmp_path, capsys):
    from PIL import Image

    from talkingmachines.audio_io import SPEECH_WAV
    from talkingmachines.cli import main

    img = tmp_path / "wall.png"
    Image.fromarray(np.full((256, 256, 3), 180, np.uint8)).save(img)
    out = tmp_path / "o.mp4"
    rc = main(["generate", "--image", str(img), "--audio", str(SPEECH_WAV), "-o", str(out), "--align-face"])
    err = capsys.readouterr().err
    assert rc != 0 and not out.exists()
    assert "no face found in" in err and "Traceback" not in err


def test_the_shipped_model_has_a_template_of_its_training_faces():
    from talkingmachines.stream.generator import SHIPPED_MODEL

    t = face_align.load_template(SHIPPED_MODEL)
    # eyes above the nose above the mouth, the face roughly centred
    eyes, nose, mouth = t[36:48, 1].mean(), t[27:36, 1].mean(), t[48:68, 1].mean()
    assert eyes < nose < mouth
    assert abs(t[17:68, 0].mean() - 0.5) < 0.1


def test_export_measures_the_template_on_training_clips(tmp_path, judge):
    from talkingmachines.cli import main
    from talkingmachines.train.recipe import write_face_template

    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--n", "4", "--seed", "3", "--data-version", "4",
                 "--no-video", "--workers", "1"]) == 0
    write_face_template(SimpleNamespace(data=str(data), held_out=0.25, seed=0), tmp_path)
    t = json.loads((tmp_path / face_align.TEMPLATE_FILE).read_text())
    assert t["frames"] == 3 and 1 <= t["faces"] <= 3 and t["judge"] == "hog"
    assert face_align.load_template(tmp_path).shape == (68, 2)


def test_serve_frames_uploaded_portraits(judge, photo):
    import asyncio
    import base64
    import io

    import aiohttp
    from PIL import Image
    from serve_fakes import FakeAvatar
    from serve_helpers import Server, client_offer, post_offer

    from talkingmachines.stream.generator import SHIPPED_MODEL

    class Avatar(FakeAvatar):
        preset = SimpleNamespace(height=128, width=128)

    def data_url(img):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    t = face_align.load_template(SHIPPED_MODEL)
    avatar = Avatar()

    async def main():
        async with Server(avatar=avatar, align_template=t) as srv, aiohttp.ClientSession() as s:
            pc, sdp = await client_offer()
            try:
                status, j = await post_offer(s, srv, sdp, portrait=data_url(np.full((200, 200, 3), 90, np.uint8)))
                assert status == 400 and "no face found in the uploaded portrait" in j["message"], j
                assert not avatar.streams
                status, j = await post_offer(s, srv, sdp, portrait=data_url(_placed(photo, 10, 0.8, (200, 30), (600, 360))))
                assert status == 200, j
            finally:
                await asyncio.wait_for(pc.close(), 3)

    asyncio.run(main())
    (stream,) = avatar.streams
    p = judge.landmarks(stream.base)
    assert p is not None
    assert np.linalg.norm(p[face_align.FIT_POINTS] - t[face_align.FIT_POINTS] * 128, axis=1).mean() < 3.0
