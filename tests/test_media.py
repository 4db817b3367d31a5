import os
import struct
import wave
import zlib
from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

from talkingmachines import media
from talkingmachines.errors import InputError
from talkingmachines.media import Mp4Writer, load_audio, load_image, probe, read_video, write_mp4

SR = 16000
FREQ = 440.0


def _has_encoder(name):
    try:
        av.codec.Codec(name, "w")
        return True
    except Exception:
        return False


def encode_audio(path, codec, rate, layout, fmt, seconds=1.3, container_format=None):
    """Write a 440 Hz sine (amplitude 0.5, same in every channel) with a PyAV encoder."""
    n = int(rate * seconds)
    x = (0.5 * np.sin(2 * np.pi * FREQ * np.arange(n) / rate)).astype(np.float32)
    ch = 2 if layout == "stereo" else 1
    planar = av.AudioFormat(fmt).is_planar
    with av.open(str(path), "w", format=container_format) as c:
        s = c.add_stream(codec, rate=rate, layout=layout)
        s.format = fmt
        pos = 0
        while pos < n:
            k = min(1024, n - pos)
            seg = x[pos : pos + k]
            arr = np.stack([seg] * ch) if planar else np.stack([seg] * ch, 1).reshape(1, -1)
            if fmt.startswith("s16"):
                arr = (arr * 32767).astype(np.int16)
            elif fmt.startswith("s32"):
                arr = (arr * 2**31 - 1).astype(np.int32)
            f = av.AudioFrame.from_ndarray(np.ascontiguousarray(arr), format=fmt, layout=layout)
            f.sample_rate = rate
            f.pts = pos
            f.time_base = Fraction(1, rate)
            for p in s.encode(f):
                c.mux(p)
            pos += k
        for p in s.encode(None):
            c.mux(p)
    return seconds


def check_sine(y, seconds):
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(len(y) - seconds * SR) <= 640, len(y)
    assert np.abs(y).max() <= 1.0
    mid = y[len(y) // 4 : 3 * len(y) // 4]
    rms = np.sqrt(np.mean(mid**2))
    assert abs(rms - 0.5 / np.sqrt(2)) < 0.05, rms  # channels averaged, not summed
    spec = np.abs(np.fft.rfft(mid * np.hanning(len(mid))))
    peak = np.fft.rfftfreq(len(mid), 1 / SR)[spec.argmax()]
    assert abs(peak - FREQ) < 5, peak


AUDIO_CASES = [
    ("a.wav", "pcm_s16le", 44100, "stereo", "s16", None),
    ("a.mp3", "libmp3lame", 44100, "stereo", "s16p", None),
    ("a.flac", "flac", 48000, "mono", "s16", None),
    ("a.ogg", "libopus", 48000, "stereo", "flt", None),
    ("a.m4a", "aac", 22050, "mono", "fltp", "ipod"),
]


@pytest.mark.parametrize("name,codec,rate,layout,fmt,cfmt", AUDIO_CASES, ids=[c[0] for c in AUDIO_CASES])
def test_load_audio_formats(tmp_path, name, codec, rate, layout, fmt, cfmt):
    if not _has_encoder(codec):
        pytest.skip(f"this PyAV wheel has no {codec} encoder")
    p = tmp_path / name
    secs = encode_audio(p, codec, rate, layout, fmt, container_format=cfmt)
    check_sine(load_audio(p), secs)


def test_load_audio_from_video(tmp_path):
    a = (0.5 * np.sin(2 * np.pi * FREQ * np.arange(SR) / SR)).astype(np.float32)
    write_mp4(tmp_path / "v.mp4", np.zeros((25, 32, 32, 3), np.uint8), a)
    check_sine(load_audio(tmp_path / "v.mp4"), 1.0)


def _wav(path, n, rate=16000):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.zeros(n, np.int16).tobytes())


def test_load_audio_errors(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="not found"):
        load_audio(tmp_path / "missing.wav")
    with pytest.raises(InputError, match="directory"):
        load_audio(tmp_path)
    noise = tmp_path / "noise.wav"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    with pytest.raises(InputError, match="noise.wav"):
        load_audio(noise)
    (tmp_path / "zero.mp3").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        load_audio(tmp_path / "zero.mp3")
    (tmp_path / "text.mp3").write_text("hello, this is not audio\n" * 50)
    with pytest.raises(InputError):
        load_audio(tmp_path / "text.mp3")
    write_mp4(tmp_path / "silent.mp4", np.zeros((5, 32, 32, 3), np.uint8))
    with pytest.raises(InputError, match="no audio stream"):
        load_audio(tmp_path / "silent.mp4")
    _wav(tmp_path / "empty.wav", 0)
    with pytest.raises(InputError, match="empty.wav"):
        load_audio(tmp_path / "empty.wav")
    _wav(tmp_path / "short.wav", 300)  # < one video frame
    with pytest.raises(InputError, match="too short"):
        load_audio(tmp_path / "short.wav")
    # a FLAC whose STREAMINFO claims 2.5 h: rejected from the header, nothing decoded
    long = tmp_path / "long.flac"
    encode_audio(long, "flac", 48000, "mono", "s16", seconds=0.5)
    raw = bytearray(long.read_bytes())
    assert raw[:4] == b"fLaC"
    v = int.from_bytes(raw[18:26], "big")
    raw[18:26] = ((v >> 36 << 36) | (48000 * 9000)).to_bytes(8, "big")  # 36-bit total samples
    long.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="too long"):
        load_audio(long)
    # the decode-time limit (for files whose header does not say)
    monkeypatch.setattr(media, "MAX_AUDIO_SECONDS", 0.5)
    _wav(tmp_path / "one_s.wav", 16000)
    with pytest.raises(InputError, match="too long"):
        load_audio(tmp_path / "one_s.wav")


# ----------------------------------------------------------------------------- images


def _png_header_only(path, w, h):
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)))


def test_load_image_crop_and_modes(tmp_path):
    a = np.zeros((100, 300, 3), np.uint8)
    a[:, :100, 0] = 255  # red | green | blue thirds
    a[:, 100:200, 1] = 255
    a[:, 200:, 2] = 255
    Image.fromarray(a).save(tmp_path / "wide.png")
    out = load_image(tmp_path / "wide.png", (64, 64))
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert out[:, 5:-5, 1].min() > 200 and out[:, 5:-5, 0].max() < 30  # centre crop: all green
    tall = load_image(tmp_path / "wide.png", (96, 32))  # (height, width)
    assert tall.shape == (96, 32, 3)
    whole = load_image(tmp_path / "wide.png", None)  # as it is (--align-face frames it itself)
    assert np.array_equal(whole, a)

    rgba = np.zeros((80, 80, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:40, :, 3] = 255  # top half opaque red, bottom transparent -> white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    o = load_image(tmp_path / "rgba.png", (80, 80))
    assert tuple(o[10, 10]) == (255, 0, 0) and tuple(o[70, 10]) == (255, 255, 255)

    Image.fromarray(np.full((70, 90), 128, np.uint8), "L").save(tmp_path / "gray.jpg")
    o = load_image(tmp_path / "gray.jpg", (64, 64))
    assert o.shape == (64, 64, 3) and abs(int(o.mean()) - 128) <= 2

    Image.fromarray(a).convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(tmp_path / "pal.gif")
    assert load_image(tmp_path / "pal.gif", (32, 32)).shape == (32, 32, 3)


def test_load_image_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_image(tmp_path / "nope.png", (64, 64))
    with pytest.raises(InputError, match="directory"):
        load_image(tmp_path, (64, 64))
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(InputError, match="text.png"):
        load_image(tmp_path / "text.png", (64, 64))
    Image.fromarray(np.zeros((50, 200, 3), np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(InputError, match="too small"):
        load_image(tmp_path / "small.png", (64, 64))
    Image.fromarray(np.zeros((64, 12001, 3), np.uint8)).save(tmp_path / "wide.png")
    with pytest.raises(InputError, match="too large"):
        load_image(tmp_path / "wide.png", (64, 64))
    _png_header_only(tmp_path / "mp.png", 11000, 10000)  # 110 MP, under PIL's hard limit
    with pytest.raises(InputError, match="too large"):
        load_image(tmp_path / "mp.png", (64, 64))
    _png_header_only(tmp_path / "bomb.png", 60000, 60000)  # PIL's DecompressionBombError path
    with pytest.raises(InputError, match="too large"):
        load_image(tmp_path / "bomb.png", (64, 64))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="trunc.png"):
        load_image(tmp_path / "trunc.png", (64, 64))


# ----------------------------------------------------------------------------- mp4


def frames_ramp(T, H=48, W=64):
    y, x = np.mgrid[0:H, 0:W]
    return np.stack(
        [np.stack([(x * 4 + 3 * t) % 256, (y * 5) % 256, np.full_like(x, (t * 8) % 256)], -1) for t in range(T)]
    ).astype(np.uint8)


def tone(n):
    return (0.4 * np.sin(2 * np.pi * 300 * np.arange(n) / SR) * np.hanning(n) ** 0.1).astype(np.float32)


@pytest.mark.parametrize("n_audio", [30 * 640, 30 * 640 - 1000, 30 * 640 + 2345, 7777])
def test_write_mp4_durations(tmp_path, n_audio):
    T = 30
    fr = frames_ramp(T)
    a = tone(n_audio)
    out = write_mp4(tmp_path / "o.mp4", fr, a)
    assert out == tmp_path / "o.mp4"
    info = probe(out)
    assert info["frames"] == T and info["fps"] == 25.0 and (info["width"], info["height"]) == (64, 48)
    assert abs(info["video_duration"] - T / 25) < 1e-6
    assert info["has_audio"] and abs(info["audio_duration"] - n_audio / SR) < 0.040
    assert sorted(os.listdir(tmp_path)) == ["o.mp4"]  # no temp file left


def test_write_read_roundtrip_and_sync(tmp_path):
    T = 25
    fr = frames_ramp(T)
    n = T * 640
    a = np.zeros(n, np.float32)
    a[8000:8160] = 0.8 * np.sin(2 * np.pi * 1000 * np.arange(160) / SR)  # a click at 0.5 s
    chunks = (fr[i : i + 12] for i in range(0, T, 12))  # a generator of chunks
    write_mp4(tmp_path / "c.mp4", chunks, a)
    frames, audio, fps = read_video(tmp_path / "c.mp4")
    assert frames.shape == fr.shape and fps == 25.0
    assert np.abs(frames.astype(int) - fr.astype(int)).mean() < 6
    assert audio is not None and abs(len(audio) - n) <= 2
    env = np.convolve(np.abs(audio), np.ones(160), "same")
    assert abs(int(env.argmax()) - 8080) < 80  # no A/V offset (AAC priming is trimmed)


def test_mp4_writer_streaming_and_odd_size(tmp_path):
    H, W = 49, 65
    fr = frames_ramp(24, H, W)
    with Mp4Writer(tmp_path / "s.mp4", width=W, height=H) as w:
        for i in range(0, 24, 12):
            w.write(fr[i : i + 12], tone(12 * 640))
        w.write(fr[0])  # a single [H, W, 3] frame, no audio
        assert w.frames_written == 25 and w.samples_written == 24 * 640
    info = probe(tmp_path / "s.mp4")
    assert info["frames"] == 25 and (info["width"], info["height"]) == (64, 48)
    assert abs(info["audio_duration"] - 24 * 640 / SR) < 0.002
    write_mp4(tmp_path / "na.mp4", fr[:3])
    info = probe(tmp_path / "na.mp4")
    assert info["frames"] == 3 and not info["has_audio"] and info["audio_duration"] is None
    assert sorted(os.listdir(tmp_path)) == ["na.mp4", "s.mp4"]


def test_mp4_atomic_on_error(tmp_path):
    fr = frames_ramp(12)

    def bad_chunks():
        yield fr
        yield fr
        raise RuntimeError("generator died")

    with pytest.raises(RuntimeError, match="generator died"):
        write_mp4(tmp_path / "x.mp4", bad_chunks(), tone(36 * 640))
    assert os.listdir(tmp_path) == []

    with pytest.raises(ValueError):
        with Mp4Writer(tmp_path / "y.mp4", 64, 48) as w:
            w.write(fr, tone(12 * 640))
            w.write(np.zeros((2, 10, 10, 3), np.uint8))  # wrong size
    assert os.listdir(tmp_path) == []

    (tmp_path / "keep.mp4").write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with Mp4Writer(tmp_path / "keep.mp4", 64, 48) as w:
            w.write(fr)
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == ["keep.mp4"] and (tmp_path / "keep.mp4").read_bytes() == b"old"

    w = Mp4Writer(tmp_path / "z.mp4", 64, 48)
    w.write(fr)
    w.abort()
    assert os.listdir(tmp_path) == ["keep.mp4"]


def test_read_video_and_probe_errors(tmp_path):
    with pytest.raises(InputError):
        probe(tmp_path / "missing.mp4")
    (tmp_path / "junk.mp4").write_bytes(os.urandom(5000))
    with pytest.raises(InputError, match="junk.mp4"):
        read_video(tmp_path / "junk.mp4")
    _wav(tmp_path / "a.wav", 16000)
    with pytest.raises(InputError, match="no video stream"):
        read_video(tmp_path / "a.wav")
    info = probe(tmp_path / "a.wav")
    assert not info["has_video"] and info["has_audio"] and abs(info["audio_duration"] - 1.0) < 1e-6
