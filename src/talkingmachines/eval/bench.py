"""`talkingmachines bench`: speed and flatness of the streaming engine, measured in one process.

- rtf: seconds of video per second of wall time over the steady state (chunks 3..end)
- first_frame_s: portrait + first audio in -> first chunk of frames out (session set-up included)
- chunk_ms_early / chunk_ms_late: median chunk time over chunks 3..12 and over the last 10
  chunks (>= 200 when --chunks >= 210)
- kv_cache_speedup: per-chunk time when the context (sink + previous chunk) is recomputed at
  every denoising step instead of cached, divided by the cached time; same process, same chunks
- rss_growth: resident memory after the long stream vs after chunk 10
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..config import SAMPLES_PER_FRAME


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def speech_like(seconds: float, sr: int = 16000, seed: int = 0) -> np.ndarray:
    """The bundled speech, looped to length (falls back to modulated noise)."""
    from ..media import load_audio

    src = Path(__file__).resolve().parent.parent / "assets" / "speech.wav"
    n = int(seconds * sr)
    if src.exists():
        a = load_audio(src)
        return np.resize(a, n).astype(np.float32)
    rng = np.random.default_rng(seed)
    env = (np.sin(np.arange(n) / sr * 2 * np.pi * 3) > 0).astype(np.float32)
    return (0.2 * env * rng.standard_normal(n)).astype(np.float32)


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@torch.inference_mode()
def recompute_chunk(stream, x_prev_clean):
    """The no-cache baseline: every denoising step reruns [sink, previous chunk, current chunk]."""
    a, dit = stream.avatar, stream.avatar.dit
    dev = a.device
    x = torch.randn(stream.latent_shape, generator=stream.gen).to(dev, a.dtype)
    au = stream._audio_windows(stream.index * stream.chunk_video_frames, stream.chunk_frames)
    ctx_audio = None
    if au is not None:
        z = stream._zero_audio(1)
        ctx_audio = torch.cat([z, au, au], dim=1)
    sink = stream._dit_input(stream.ref, True)
    prev = stream._dit_input(x_prev_clean, True)
    fr = stream.chunk_frames
    for i, s in enumerate(stream.sigmas[:-1]):
        seq = torch.cat([sink, prev, stream._dit_input(x, False)], dim=2)
        t = torch.cat([torch.zeros(1, 1 + fr), torch.full((1, fr), s * 1000.0)], dim=1).to(dev)
        v = dit.forward_causal(seq, t, audio=ctx_audio, chunk_frames=fr, ctx=stream.ctx)[:, :, 1 + fr:]
        x0 = x - s * v
        s_next = stream.sigmas[i + 1]
        x = (1 - s_next) * x0 + s_next * torch.randn_like(x0) if s_next > 0 else x0
    _sync(dev)
    return x


def run_bench(args) -> int:
    from ..cli import _load

    torch.manual_seed(args.seed)
    avatar = _load(args)
    n = max(args.chunks, 20)
    stream_seconds = (n + 2) * avatar.preset.stream.chunk_seconds
    audio = speech_like(stream_seconds)

    # first frame: session set-up + the first chunk, with only its audio (+ look-ahead) arrived
    t0 = time.perf_counter()
    s = avatar.new_stream(seed=args.seed, steps=args.steps)
    s.push_audio(audio[: s.chunk_samples + s.lookahead_samples])
    s.next_chunk()
    _sync(avatar.device)
    first_frame_s = time.perf_counter() - t0
    s.push_audio(audio[s.chunk_samples + s.lookahead_samples:])

    times, rss = [], {}
    for i in tqdm(range(1, n), desc="long stream", unit="chunk", disable=args.json):
        t = time.perf_counter()
        s.next_chunk()
        _sync(avatar.device)
        times.append(time.perf_counter() - t)
        if i == 10:
            rss[10] = rss_bytes()
    rss["end"] = rss_bytes()
    chunk_s = s.chunk_video_frames / 25.0
    steady = times[2:]
    early = statistics.median(times[2:12])
    late = statistics.median(times[-10:])

    # KV cache vs recomputing the context, on the same stream state
    k = 8
    cached = []
    for _ in range(k):
        t = time.perf_counter()
        s.next_chunk()
        _sync(avatar.device)
        cached.append(time.perf_counter() - t)
    x_prev = torch.randn(s.latent_shape).to(avatar.device, avatar.dtype)
    recompute = []
    for _ in range(k):
        t = time.perf_counter()
        x_prev = recompute_chunk(s, x_prev)
        s.decoder.decode(x_prev)
        recompute.append(time.perf_counter() - t)

    res = {
        "preset": avatar.preset.name,
        "device": str(avatar.device),
        "random_weights": avatar.random_weights,
        "chunks": n,
        "rtf": round(chunk_s * len(steady) / sum(steady), 3),
        "first_frame_s": round(first_frame_s, 3),
        "chunk_ms_early": round(1e3 * early, 2),
        "chunk_ms_late": round(1e3 * late, 2),
        "late_over_early": round(late / early, 3),
        "kv_cache_speedup": round(statistics.median(recompute) / statistics.median(cached), 3),
        "rss_growth": round(rss["end"] / rss[10] - 1.0, 4),
        "kv_cache_mb": round(s.cache.nbytes() / 2**20, 3),
        "torch_threads": torch.get_num_threads(),
    }
    if args.plot:
        _plot(times, chunk_s, args.plot)
    if args.json:
        print(json.dumps(res))
    else:
        for key, v in res.items():
            print(f"{key:<18} {v}")
    return 0


def _plot(times, chunk_s, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3))
    ax.plot(range(2, 2 + len(times)), [1e3 * t for t in times], lw=0.8, label="chunk time")
    ax.axhline(1e3 * chunk_s, color="r", ls="--", lw=0.8, label="real-time budget")
    ax.set_xlabel("chunk")
    ax.set_ylabel("ms")
    ax.legend()
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
