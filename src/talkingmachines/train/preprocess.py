"""`talkingmachines data prep`: ordinary talking-head videos -> a training cache for the real presets.

Input: a folder of MP4s (any container PyAV reads) with sound, as HDTF or a user's own
recordings, and a diffusers-format Wan2.1-I2V folder ``WAN_DIR`` (``vae/``, ``text_encoder/``,
``tokenizer/``, ``image_encoder/``, ``image_processor/`` (optional), and a wav2vec2 model in
``WAN_DIR/wav2vec2`` or ``--audio-model``). Per video:

1. **Audio**: decoded to 16 kHz mono (`media.load_audio`), aligned to the first video frame
   (the streams' start times), wav2vec2 features per video frame over the whole video
   (`model.audio.Wav2Vec2FrontEnd.features`), a speaking/silence flag per frame (RMS above
   ``max(-45 dBFS, noise floor + 12 dB)``).
2. **Face box**: OpenCV's Haar frontal-face cascade on a few frames (the key frames, decoded
   alone; a sequential sample when the file has too few), the largest face per frame; the
   median centre and size (robust to misses and outliers) give one square per video,
   enlarged ``face_scale`` times (head, hair and chin in view), moved inside the frame and
   shrunk to fit; no face found (or no OpenCV): the centre square.
3. **Video**: decoded once, resampled to 25 fps (nearest frame in time), cropped to the box
   and resized to ``size`` x ``size``, split into clips of ``1 + 12 n`` frames (``n =
   clip_chunks``; the tail becomes a shorter clip when it holds at least one chunk).
4. **Cache** (safetensors, each written atomically):

   * ``clips/<video>_<k>.safetensors``: ``latents`` [C, 1 + 3n, h, w] (`WanVAE.encode_video`,
     normalised with ``latents_mean``/``latents_std``), ``features`` [1 + 12n, F] (the audio
     features of the clip's frames), ``speaking`` [1 + 12n] uint8;
   * ``refs/<video>.safetensors``: ``latents`` [R, C, h, w] (`encode_image` of R reference
     frames of the same video, silent frames preferred: the sinks) and ``image_embeds``
     [R, L_img, D_img] (CLIP penultimate hidden states of each, as diffusers'
     `WanImageToVideoPipeline.encode_image`: ``CLIPImageProcessor`` then
     ``CLIPVisionModel(..., output_hidden_states=True).hidden_states[-2]``);
   * ``text/<hash>.safetensors``: ``text`` [text_len, D_text], the umT5 embedding of the
     video's prompt (``<video>.txt`` next to it, else ``--prompt``) exactly as diffusers'
     `_get_t5_prompt_embeds`: cleaned, tokenised padded to 512, ``last_hidden_state``
     trimmed to the real tokens and zero padded;
   * ``videos/<video>.json``: the video's record (written last: a video with a record is
     done); ``prep_index.json``: the index `train.real_data.RealClips` reads.

Resumable: a rerun skips videos whose record matches the source file and the settings, and
inside an interrupted video reuses every clip file already written. Unusable videos (no
audio, too short, unreadable) are skipped with a one-line warning each; `InputError` when
nothing usable remains.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import warnings
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME, VAE_TEMPORAL
from ..devices import resolve_device
from ..errors import InputError
from ..fileio import atomic_save_safetensors, atomic_write_text

INDEX_NAME = "prep_index.json"
FORMAT = "talkingmachines-prep"
PREP_VERSION = 1
DEFAULT_PROMPT = "a person talking to the camera"
VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
CHUNK_VIDEO_FRAMES = 12  # 3 latent frames x 4
MIN_FRAMES = 1 + CHUNK_VIDEO_FRAMES


class SkipVideo(Exception):
    """A video that cannot be used (the message is the one-line reason)."""


@dataclass
class PrepConfig:
    wan: str
    videos: str
    out: str
    size: int = 512
    audio_model: str | None = None  # default WAN_DIR/wav2vec2
    prompt: str = DEFAULT_PROMPT
    clip_chunks: int = 8  # clips of 1 + 12 n frames (n = 8: 97 frames, 3.9 s)
    refs: int = 4  # reference frames (sinks) per video
    text_len: int = 512  # umT5 tokens (Wan pads to 512)
    face_scale: float = 1.8
    detect_frames: int = 8
    device: str = "auto"
    seed: int = 0
    progress: bool = True

    def settings(self, ids: dict) -> dict:
        """What the cached clips depend on (a change redoes every video)."""
        return {"version": PREP_VERSION, "size": self.size, "clip_chunks": self.clip_chunks, "refs": self.refs,
                "face_scale": self.face_scale, "detect_frames": self.detect_frames, "seed": self.seed,
                "vae": ids["vae"], "image_encoder": ids["image_encoder"], "audio": ids["audio"]}


def _hash(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _warn(msg: str) -> None:
    try:
        from tqdm.auto import tqdm

        tqdm.write(f"warning: {msg}", file=sys.stderr)
    except Exception:  # pragma: no cover
        print(f"warning: {msg}", file=sys.stderr)


def _meta(path: Path) -> dict | None:
    """A safetensors file's metadata, or None when it is missing or unreadable."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except Exception:
        return None


# ============================================================================ face box
def detect_faces(frames: list[np.ndarray], max_side: int = 640) -> list[tuple[float, float, float]]:
    """The largest frontal face of each RGB frame as (centre x, centre y, side), in the frame's
    pixels; frames without a face give nothing. Empty when OpenCV is not installed."""
    try:
        import cv2
    except ImportError:  # pragma: no cover - a dependency; the centre square still works
        return []
    if not hasattr(cv2, "CascadeClassifier"):  # OpenCV 5 moved the Haar cascades out of the main package
        warnings.warn("this OpenCV has no CascadeClassifier (install opencv-python-headless<5): centre crop")
        return []
    cascade = cv2.CascadeClassifier(os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml"))
    if cascade.empty():  # pragma: no cover
        return []
    out = []
    for f in frames:
        H, W = f.shape[:2]
        s = min(1.0, max_side / max(H, W))
        gray = cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY)
        if s < 1.0:
            gray = cv2.resize(gray, (max(1, round(W * s)), max(1, round(H * s))), interpolation=cv2.INTER_AREA)
        gray = cv2.equalizeHist(gray)
        m = max(24, int(0.1 * min(gray.shape)))
        faces = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(m, m))
        if len(faces):
            x, y, w, h = max(faces, key=lambda b: b[2] * b[3])
            out.append(((x + w / 2) / s, (y + h / 2) / s, max(w, h) / s))
    return out


def face_square(dets: list[tuple[float, float, float]], height: int, width: int,
                scale: float = 1.8) -> tuple[int, int, int]:
    """One square crop (x0, y0, side) for a video from per-frame detections: the median centre
    and size (smoothing over frames, robust to a bad detection), enlarged ``scale`` times,
    shrunk to fit and moved inside the frame. No detections: the centre square."""
    full = min(height, width)
    if not dets:
        return (width - full) // 2, (height - full) // 2, full
    d = np.asarray(dets, dtype=np.float64)
    cx, cy, s = np.median(d[:, 0]), np.median(d[:, 1]), np.median(d[:, 2])
    side = int(round(min(full, max(16.0, s * scale))))
    x0 = int(round(min(max(cx - side / 2, 0), width - side)))
    y0 = int(round(min(max(cy - side / 2, 0), height - side)))
    return x0, y0, side


def crop_resize(frame: np.ndarray, box: tuple[int, int, int], size: int) -> np.ndarray:
    """Crop the square ``box`` (x0, y0, side) and resize to ``size`` x ``size`` (uint8 RGB)."""
    x0, y0, side = box
    c = frame[y0:y0 + side, x0:x0 + side]
    if c.shape[0] == size and c.shape[1] == size:
        return np.ascontiguousarray(c)
    try:
        import cv2

        interp = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC
        return cv2.resize(np.ascontiguousarray(c), (size, size), interpolation=interp)
    except ImportError:  # pragma: no cover
        from PIL import Image

        return np.asarray(Image.fromarray(c).resize((size, size), Image.LANCZOS))


# ============================================================================ decoding
def _open(path: Path):
    import av

    try:
        c = av.open(str(path), mode="r")
    except Exception as e:
        why = getattr(e, "strerror", None) or " ".join(str(e).split())[:120]
        raise SkipVideo(f"unreadable ({why})") from None
    if not c.streams.video:
        c.close()
        raise SkipVideo("no video stream")
    return c


def _start_seconds(stream) -> float:
    if stream is None or stream.start_time is None or not stream.time_base:
        return 0.0
    return float(stream.start_time * stream.time_base)


def detection_frames(path: Path, n: int) -> list[np.ndarray]:
    """Up to ``n`` RGB frames spread over the video for face detection: its key frames
    (decoded alone: cheap), topped up with frames of the first seconds when it has few."""
    frames: list[np.ndarray] = []
    c = _open(path)
    try:
        vs = c.streams.video[0]
        try:
            vs.codec_context.skip_frame = "NONKEY"
            stride = 1  # keep every stride-th key frame; halve the list when it grows: even coverage
            for i, f in enumerate(c.decode(vs)):
                if i % stride == 0:
                    frames.append(f.to_ndarray(format="rgb24"))
                if len(frames) >= 4 * max(n, 1):
                    frames, stride = frames[::2], stride * 2
        except Exception:
            frames = []
    finally:
        c.close()
    if len(frames) < n:  # few key frames: sample the first seconds instead
        c = _open(path)
        try:
            extra = []
            for i, f in enumerate(c.decode(c.streams.video[0])):
                if i % 10 == 0:
                    extra.append(f.to_ndarray(format="rgb24"))
                if len(extra) >= n:
                    break
        except Exception:
            extra = []
        finally:
            c.close()
        frames = frames + extra
    if len(frames) > n:
        frames = [frames[int(i)] for i in np.linspace(0, len(frames) - 1, n).round()]
    return frames


def frames_25fps(path: Path, limit: int | None = None):
    """Decode a video's frames resampled to 25 fps: yields (k, RGB frame) for k = 0, 1, ...,
    frame k being the source frame nearest to time k / 25 after the first frame."""
    c = _open(path)
    try:
        vs = c.streams.video[0]
        rate = vs.average_rate or vs.guessed_rate or vs.base_rate
        src_dt = 1.0 / float(rate) if rate else 1.0 / FPS
        k = 0
        t0 = None
        prev = prev_t = None
        i = 0
        for f in c.decode(vs):
            t = float(f.time) if f.time is not None else i * src_dt
            i += 1
            if t0 is None:
                t0 = t
            t -= t0
            img = f.to_ndarray(format="rgb24")
            if prev is not None:
                mid = (prev_t + t) / 2  # output times before the midpoint take the previous frame
                while k / FPS < mid - 1e-9:
                    yield k, prev
                    k += 1
                    if limit is not None and k >= limit:
                        return
            prev, prev_t = img, t
        if prev is not None:
            while k / FPS < prev_t + src_dt / 2 - 1e-9:
                yield k, prev
                k += 1
                if limit is not None and k >= limit:
                    return
    finally:
        c.close()


def aligned_audio(path: Path) -> np.ndarray:
    """16 kHz mono audio whose sample 0 is at the first video frame's time."""
    from .. import media

    try:
        audio = media.load_audio(path)
    except InputError as e:
        msg = str(e)
        if "no audio stream" in msg:
            raise SkipVideo("no audio") from None
        if "too short" in msg or "empty" in msg:
            raise SkipVideo("audio empty or too short") from None
        raise SkipVideo(f"audio unreadable ({msg.split(': ', 1)[-1][:120]})") from None
    c = _open(path)
    try:
        off = _start_seconds(c.streams.video[0]) - _start_seconds(c.streams.audio[0] if c.streams.audio else None)
    finally:
        c.close()
    n = int(round(off * SAMPLE_RATE))
    if n > 0:  # video starts later: drop the audio before its first frame
        audio = audio[n:]
    elif n < 0:
        audio = np.concatenate([np.zeros(-n, np.float32), audio])
    return audio


def speaking_flags(audio: np.ndarray, n_frames: int) -> np.ndarray:
    """Per video frame: RMS above ``max(-45 dBFS, noise floor + 12 dB)`` (floor: 5th percentile)."""
    from ..model.audio import frame_rms_db

    db = frame_rms_db(audio, n_frames)  # missing audio: silence (-200 dB)
    thr = max(-45.0, float(np.percentile(db, 5)) + 12.0) if len(db) else -45.0
    return db > thr


def clip_spans(n_frames: int, chunks: int) -> list[tuple[int, int]]:
    """[(start, length)] of consecutive clips of ``1 + 12 chunks`` frames; a tail of at least
    ``1 + 12`` frames becomes a shorter ``1 + 12 m`` clip."""
    L = 1 + CHUNK_VIDEO_FRAMES * chunks
    spans, s = [], 0
    while s + L <= n_frames:
        spans.append((s, L))
        s += L
    r = n_frames - s
    if r >= MIN_FRAMES:
        spans.append((s, 1 + CHUNK_VIDEO_FRAMES * ((r - 1) // CHUNK_VIDEO_FRAMES)))
    return spans


def pick_refs(speaking: np.ndarray, n: int, rng: np.random.Generator) -> list[int]:
    """``n`` reference frame indices, silent (mouth at rest) frames preferred, spread out."""
    T = len(speaking)
    cand = np.nonzero(~speaking.astype(bool))[0]
    if len(cand) < n:
        cand = np.arange(T)
    k = min(n, len(cand))
    # one per equal slice of the candidates: spread over the video
    parts = np.array_split(cand, k)
    return sorted(int(p[rng.integers(len(p))]) for p in parts if len(p))


# ============================================================================ encoders
def _need_dir(p: Path, what: str) -> Path:
    if not p.is_dir():
        raise InputError(f"{p}: no {what} folder (expected a diffusers-format Wan2.1-I2V folder)")
    return p


def prompt_clean(text: str) -> str:
    """diffusers' Wan `prompt_clean`: ftfy (when installed), html unescape, whitespace."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


@torch.no_grad()
def encode_prompts(wan: Path, prompts: list[str], text_len: int, device: torch.device) -> dict[str, torch.Tensor]:
    """{prompt: [text_len, D] float32}: umT5 ``last_hidden_state`` of the real tokens, zeros after
    (diffusers' `WanImageToVideoPipeline._get_t5_prompt_embeds`)."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    tdir, kdir = _need_dir(wan / "text_encoder", "text_encoder"), _need_dir(wan / "tokenizer", "tokenizer")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        tok = AutoTokenizer.from_pretrained(str(kdir), local_files_only=True)
        enc = UMT5EncoderModel.from_pretrained(str(tdir), local_files_only=True, torch_dtype=dtype).to(device).eval()
    except Exception as e:
        why = " ".join(str(e).split())[:200]
        raise InputError(f"{wan}: cannot load the umT5 text encoder/tokenizer ({why})") from None
    out = {}
    for p in prompts:
        t = tok([prompt_clean(p)], padding="max_length", max_length=text_len, truncation=True,
                add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        ids, mask = t.input_ids.to(device), t.attention_mask.to(device)
        n = int(mask.gt(0).sum())
        h = enc(ids, mask).last_hidden_state[0].float().cpu()
        e = torch.zeros(text_len, h.shape[-1])
        e[:n] = h[:n]
        out[p] = e
    del enc
    return out


class ImageEncoder:
    """CLIP image embeddings as Wan I2V feeds them: penultimate hidden states [L, D]."""

    def __init__(self, wan: Path, device: torch.device):
        from transformers import CLIPImageProcessor, CLIPVisionModel

        d = _need_dir(wan / "image_encoder", "image_encoder")
        try:
            self.model = CLIPVisionModel.from_pretrained(str(d), local_files_only=True).to(device).eval()
            pdir = wan / "image_processor"
            self.processor = (CLIPImageProcessor.from_pretrained(str(pdir), local_files_only=True)
                              if pdir.is_dir() else CLIPImageProcessor())
        except Exception as e:
            raise InputError(f"{wan}: cannot load the CLIP image encoder ({' '.join(str(e).split())[:200]})") from None
        self.device = device

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray]) -> torch.Tensor:
        px = self.processor(images=list(images), return_tensors="pt").pixel_values
        px = px.to(self.device, next(self.model.parameters()).dtype)
        return self.model(pixel_values=px, output_hidden_states=True).hidden_states[-2].float().cpu()


def _video_id(rel: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(rel).stem)[:48] or "video"
    return f"{stem}-{hashlib.sha1(rel.encode()).hexdigest()[:8]}"


def list_videos(root: Path) -> list[Path]:
    if not root.is_dir():
        raise InputError(f"{root}: no such video folder")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTS
                  and not p.name.startswith("."))


def _prompt_for(video: Path, default: str) -> str:
    side = video.with_suffix(".txt")
    if side.is_file():
        t = side.read_text(errors="replace").strip()
        if t:
            return t
    return default


# ============================================================================ one video
def prep_video(path: Path, rel: str, vid: str, cfg: PrepConfig, key: str, vae, clip_enc: ImageEncoder, frontend,
               out: Path, progress: bool = True) -> dict:
    """Process one video; returns its record (clips, refs). Raises `SkipVideo`."""
    from tqdm.auto import tqdm

    probe = _open(path)  # unreadable / no video stream: SkipVideo
    try:
        vs = probe.streams.video[0]
        H, W = vs.codec_context.height, vs.codec_context.width
        est = None
        if vs.frames and (vs.average_rate or vs.guessed_rate):
            est = int(vs.frames / float(vs.average_rate or vs.guessed_rate) * FPS)
        elif vs.duration and vs.time_base:
            est = int(float(vs.duration * vs.time_base) * FPS)
    finally:
        probe.close()
    if est is not None and est < MIN_FRAMES:
        raise SkipVideo(f"too short ({est} frames at 25 fps; need {MIN_FRAMES})")
    audio = aligned_audio(path)
    n_audio = len(audio) // SAMPLES_PER_FRAME
    if n_audio < MIN_FRAMES:
        raise SkipVideo(f"too short ({len(audio) / SAMPLE_RATE:.2f} s of audio; need {MIN_FRAMES} frames)")
    try:
        det = detection_frames(path, cfg.detect_frames)
    except SkipVideo:
        raise
    except Exception as e:
        raise SkipVideo(f"unreadable video ({' '.join(str(e).split())[:120]})") from None
    if det:
        H, W = det[0].shape[:2]
    if not H or not W:
        raise SkipVideo("no decodable video frames")
    faces = detect_faces(det)
    box = face_square(faces, H, W, cfg.face_scale)

    n_max = n_audio if est is None else min(n_audio, est)
    spk_all = speaking_flags(audio, n_audio)
    rng = np.random.default_rng([cfg.seed, int(hashlib.sha1(rel.encode()).hexdigest()[:8], 16), 5])
    ref_idx = set(pick_refs(spk_all[:max(MIN_FRAMES, n_max)], cfg.refs, rng))
    feats_all = frontend.features(audio[: n_audio * SAMPLES_PER_FRAME]).float().cpu()  # [n_audio, F]

    L = 1 + CHUNK_VIDEO_FRAMES * cfg.clip_chunks
    clips: list[dict] = []
    refs: dict[int, np.ndarray] = {}
    firsts: dict[int, np.ndarray] = {}
    buf: list[np.ndarray] = []
    start = 0
    bar = tqdm(total=n_max, desc=f"  {vid[:24]}", unit="frame", leave=False, disable=not progress)

    def flush(frames: list[np.ndarray], s: int) -> None:
        n = len(frames)
        f = out / "clips" / f"{vid}_{len(clips):04d}.safetensors"
        meta = _meta(f)
        if not (meta and meta.get("key") == key and meta.get("start") == str(s) and meta.get("frames") == str(n)):
            lat = vae.encode_video(np.stack(frames))[0].float().cpu()
            atomic_save_safetensors({"latents": lat, "features": feats_all[s:s + n].clone(),
                                     "speaking": torch.from_numpy(spk_all[s:s + n].astype(np.uint8))},
                                    f, {"key": key, "video": rel, "start": s, "frames": n}, mkdir=True)
            lat_frames = lat.shape[1]
        else:
            lat_frames = 1 + (n - 1) // VAE_TEMPORAL
        clips.append({"file": f"clips/{f.name}", "start": s, "frames": n, "latent_frames": lat_frames})

    n = 0
    try:
        for k, frame in frames_25fps(path, limit=n_audio):
            img = crop_resize(frame, box, cfg.size)
            if k in ref_idx:
                refs[k] = img
            if not buf:
                firsts[k] = img
            buf.append(img)
            n = k + 1
            bar.update(1)
            if len(buf) == L:
                flush(buf, start)
                start += L
                buf = []
    except SkipVideo:
        raise
    except Exception as e:  # decoding stopped early: keep what was read
        if n < MIN_FRAMES:
            raise SkipVideo(f"unreadable video ({' '.join(str(e).split())[:120]})") from None
        _warn(f"{rel}: video decoding stopped at frame {n} ({' '.join(str(e).split())[:80]}); using what was read")
    finally:
        bar.close()
    if n < MIN_FRAMES:
        raise SkipVideo(f"too short ({n} frames at 25 fps; need {MIN_FRAMES})")
    for s, m in clip_spans(len(buf), cfg.clip_chunks):  # the tail: at most one shorter clip
        flush(buf[s:s + m], start + s)
    if not clips:
        raise SkipVideo(f"too short ({n} frames)")

    # references: the chosen frames that were decoded, topped up with clips' first frames
    chosen = [refs[k] for k in sorted(refs)]
    ks = sorted(refs)
    for k in sorted(firsts):
        if len(chosen) >= cfg.refs:
            break
        if k not in refs:
            chosen.append(firsts[k])
            ks.append(k)
    rf = out / "refs" / f"{vid}.safetensors"
    meta = _meta(rf)
    if not (meta and meta.get("key") == key and meta.get("frames") == json.dumps(ks)):
        ref_lat = torch.cat([vae.encode_image(img)[0, :, 0][None].float().cpu() for img in chosen])
        emb = clip_enc(chosen)
        atomic_save_safetensors({"latents": ref_lat, "image_embeds": emb}, rf,
                                {"key": key, "video": rel, "frames": json.dumps(ks)}, mkdir=True)
    return {"clips": clips, "refs": f"refs/{rf.name}", "ref_frames": ks, "frames": n, "box": list(box),
            "faces_found": len(faces), "source_size": [H, W]}


# ============================================================================ the data set
def prep_dataset(cfg: PrepConfig) -> Path:
    """Build (or complete) the cache in ``cfg.out``; returns the index file."""
    from tqdm.auto import tqdm

    from ..model import audio as audio_fe
    from ..model.vae import load_vae
    from .latents import _file_id

    wan, root, out = Path(cfg.wan), Path(cfg.videos), Path(cfg.out)
    if not wan.is_dir():
        raise InputError(f"{wan}: no such Wan folder")
    if cfg.size < 16 or cfg.size % 16:
        raise InputError(f"--size must be a multiple of 16 (VAE 8x and patch 2), got {cfg.size}")
    if cfg.clip_chunks < 1 or cfg.refs < 1:
        raise InputError("--clip-chunks and --refs must be >= 1")
    videos = list_videos(root)
    if not videos:
        raise InputError(f"{root}: no video files ({', '.join(VIDEO_EXTS)})")
    amodel = Path(cfg.audio_model) if cfg.audio_model else wan / "wav2vec2"
    if not amodel.is_dir():
        raise InputError(f"{amodel}: no wav2vec2 model folder (pass --audio-model PATH, a saved Wav2Vec2Model)")
    _need_dir(wan / "vae", "vae")
    _need_dir(wan / "image_encoder", "image_encoder")
    device = torch.device(resolve_device(cfg.device))
    ids = {"vae": _file_id(wan / "vae"), "image_encoder": _file_id(wan / "image_encoder"), "audio": _file_id(amodel),
           "text_encoder": _file_id(wan / "text_encoder") if (wan / "text_encoder").is_dir() else ""}
    settings = cfg.settings(ids)
    key = _hash(settings)
    out.mkdir(parents=True, exist_ok=True)

    rels = [str(v.relative_to(root)) for v in videos]
    vids = [_video_id(r) for r in rels]
    stats = [{"size": v.stat().st_size, "mtime": int(v.stat().st_mtime)} for v in videos]
    records: dict[str, dict] = {}
    todo = []
    for v, rel, vid, st in zip(videos, rels, vids, stats):
        rp = out / "videos" / f"{vid}.json"
        try:
            rec = json.loads(rp.read_text()) if rp.is_file() else None
        except ValueError:
            rec = None
        if rec and rec.get("key") == key and rec.get("source_stat") == st and rec.get("source") == rel:
            records[vid] = rec
        else:
            todo.append((v, rel, vid, st))

    # text first (the largest model; freed before the video loop)
    prompts = {vid: _prompt_for(v, cfg.prompt) for v, vid in zip(videos, vids)}
    tkey = {p: _hash({"prompt": p, "text_len": cfg.text_len, "enc": ids["text_encoder"]})
            for p in set(prompts.values())}
    missing = [p for p, h in tkey.items() if (_meta(out / "text" / f"{h}.safetensors") or {}).get("key") != h]
    if missing:
        emb = encode_prompts(wan, sorted(missing), cfg.text_len, device)
        for p, e in emb.items():
            atomic_save_safetensors({"text": e}, out / "text" / f"{tkey[p]}.safetensors", {"key": tkey[p], "prompt": p},
                                    mkdir=True)

    for rec in records.values():  # done in an earlier run
        if rec.get("status") == "skipped":
            _warn(f"skipping {rec['source']}: {rec['reason']} (recorded earlier)")
    if todo:
        vae = load_vae("wan", wan, device=device)
        clip_enc = ImageEncoder(wan, device)
        fe = audio_fe.Wav2Vec2FrontEnd(amodel).to(device)
        bar = tqdm(todo, desc="data prep", unit="video", disable=not cfg.progress)
        for v, rel, vid, st in bar:
            bar.set_postfix_str(rel[-32:], refresh=False)
            try:
                rec = prep_video(v, rel, vid, cfg, key, vae, clip_enc, fe, out, progress=cfg.progress)
                rec.update(status="ok")
            except SkipVideo as e:
                _warn(f"skipping {rel}: {e}")
                rec = {"status": "skipped", "reason": str(e)}
            rec.update(source=rel, source_stat=st, key=key, id=vid)
            atomic_write_text(out / "videos" / f"{vid}.json", json.dumps(rec, indent=1), mkdir=True)
            records[vid] = rec
        bar.close()
        del vae, clip_enc, fe

    # the index
    clips, skipped, vlist = [], [], []
    dims = {}
    for vid in vids:
        rec = records[vid]
        if rec.get("status") != "ok":
            skipped.append({"video": rec["source"], "reason": rec.get("reason", "")})
            continue
        tfile = f"text/{tkey[prompts[vid]]}.safetensors"
        vlist.append({"id": vid, "source": rec["source"], "frames": rec["frames"], "box": rec["box"],
                      "faces_found": rec["faces_found"], "refs": rec["refs"], "text": tfile})
        for c in rec["clips"]:
            clips.append({"clip": len(clips), "video": vid, "file": c["file"], "refs": rec["refs"], "text": tfile,
                          "start": c["start"], "frames": c["frames"], "latent_frames": c["latent_frames"]})
    if not clips:
        raise InputError(f"{root}: no usable video ({len(skipped)} skipped: "
                         + "; ".join(f"{s['video']}: {s['reason']}" for s in skipped[:3]) + ")")
    from safetensors import safe_open

    with safe_open(str(out / clips[0]["file"]), "pt") as f:
        C, _, h, w = f.get_slice("latents").get_shape()
        F = f.get_slice("features").get_shape()[1]
    with safe_open(str(out / clips[0]["refs"]), "pt") as f:
        _, Li, Di = f.get_slice("image_embeds").get_shape()
    with safe_open(str(out / clips[0]["text"]), "pt") as f:
        Lt, Dt = f.get_slice("text").get_shape()
    dims = {"latent_channels": C, "latent_hw": [h, w], "audio_dim": F, "image_len": Li, "image_dim": Di,
            "text_len": Lt, "text_dim": Dt}
    index = {"format": FORMAT, "version": PREP_VERSION, "key": key, "settings": settings, "fps": FPS,
             "sample_rate": SAMPLE_RATE, "size": cfg.size, **dims, "wan": str(wan.resolve()),
             "audio_model": str(amodel.resolve()), "videos_dir": str(root.resolve()), "n_videos": len(vlist),
             "videos": vlist, "clips": clips, "skipped": skipped}
    idx = out / INDEX_NAME
    atomic_write_text(idx, json.dumps(index, indent=1), mkdir=True)
    return idx


# ============================================================================ CLI
def cmd_prep(args) -> int:
    cfg = PrepConfig(wan=args.wan, videos=args.videos, out=args.out, size=args.size, audio_model=args.audio_model,
                     prompt=args.prompt, clip_chunks=args.clip_chunks, refs=args.refs, text_len=args.text_len,
                     face_scale=args.face_scale, device=args.device, seed=args.seed, progress=not args.no_progress)
    idx = prep_dataset(cfg)
    d = json.loads(idx.read_text())
    print(f"data prep: {len(d['clips'])} clips from {d['n_videos']} videos ({len(d['skipped'])} skipped) -> {idx}")
    return 0


def add_prep_parser(ds) -> None:
    """``data prep`` under the ``data`` command group (``ds``: its subparsers)."""
    p = ds.add_parser("prep", help="talking-head videos with sound -> latent/audio/text/image cache (real presets)")
    p.add_argument("--wan", required=True, help="diffusers-format Wan2.1-I2V folder (vae, text_encoder, tokenizer, "
                                                "image_encoder)")
    p.add_argument("--videos", required=True, help="folder of talking-head videos with sound (searched recursively)")
    p.add_argument("--out", required=True, help="data folder to write (then: train teacher --data OUT)")
    p.add_argument("--size", type=int, default=512, help="square face crop size in pixels (multiple of 16)")
    p.add_argument("--audio-model", default=None, help="wav2vec2 model folder (default: WAN_DIR/wav2vec2)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt for every video without a VIDEO.txt beside it")
    p.add_argument("--clip-chunks", type=int, default=8, help="clips of 1 + 12 n frames (default 8: 97 frames)")
    p.add_argument("--refs", type=int, default=4, help="reference frames (sinks) per video")
    p.add_argument("--text-len", type=int, default=512, help="umT5 tokens (Wan: 512)")
    p.add_argument("--face-scale", type=float, default=1.8, help="crop side / detected face side")
    p.add_argument("--device", default="auto", help="auto (CUDA when there is a GPU, else CPU), cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_prep)


__all__ = ["PrepConfig", "prep_dataset", "prep_video", "face_square", "detect_faces", "crop_resize", "clip_spans",
           "frames_25fps", "encode_prompts", "ImageEncoder", "INDEX_NAME", "DEFAULT_PROMPT", "SkipVideo"]
