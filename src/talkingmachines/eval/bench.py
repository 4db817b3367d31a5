"""`talkingmachines bench`: speed and flatness of the streaming engine, measured in one process.

Each section prints its figures as soon as it finishes (with --json: one JSON line per section,
tagged "section", then the whole result tagged "all"), so a run cut short still leaves those.

- rtf: seconds of video per second of wall time over the steady state (chunks 3..end);
  fps: video frames per second over the same chunks, with the median per-stage ms (audio
  features, DiT: the denoising steps + the KV-cache write pass, VAE decode)
- first_frame_s: portrait + first audio in -> first chunk of frames out (session set-up included)
- chunk_ms_early / chunk_ms_late: median chunk time over chunks 3..12 and over the last 10
  chunks (>= 200 when --chunks >= 210)
- kv_cache_speedup: per-chunk time when the context (sink + previous chunk) is recomputed at
  every denoising step instead of cached (`NoCacheStream`, its attention masks built once, on
  the device), divided by the cached time; same process, same audio, seed and sampler
- rss_growth: resident memory at the end of the long stream vs after chunk min(10, n/2)
- disagg_speedup: wall time of M chunks made sequentially (DiT then decode, each chunk) over the
  wall time of the same M chunks (same seed, same audio) with the DiT and the VAE decoder as
  pipelined stages (`stream.disagg.PipelinedStream`: two threads, bounded queue; on CUDA a second
  stream, or `--decode-device cuda:1`). On CPU both runs use half the bench's threads per
  operation (`disagg_threads_per_stage`), so the two stages of the pipelined run together use
  what the process has; disagg_efficiency: pipelined throughput over the throughput of the
  slower stage alone (its summed per-chunk time in the sequential run), 1.0 being the ideal;
  disagg_overlap: the share of the hideable time (the faster stage's) that the pipeline hid,
  (sequential - pipelined) / (sequential - max(DiT, VAE)). On one GPU both stages share its
  SMs, so their busy times in the pipeline (disagg_stage_ms *_in_pipeline) grow; the
  two-process mode (NCCL) needs two GPUs
- baseline_speedup: seconds of wall time per second of video of diffusers'
  `WanImageToVideoPipeline` at the same model size and resolution with its usual settings
  (50 steps, CFG 5, UniPC flow_shift 3; see `baseline_settings` in the output), over ours
  (1 / rtf); measured in the same process. Text/CLIP encoders are not timed (precomputed
  embeddings), which favours the baseline. `--skip-baseline` leaves it out.
  baseline_dit_speedup: the same for the score networks alone (the baseline's transformer
  forward time vs our DiT stage time per chunk): no VAE in either.
- `--compile`: the DiT blocks go through `torch.compile` once per block shape
  (`model.compiled`; self-attention with its KV cache stays eager), inductor's default mode;
  the "compile" section says how many graphs the warm-up made and how long it took.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import time

import torch
from tqdm import tqdm

from ..audio_io import speech_like
from ..diffusion import flow
from ..stream.generator import StreamingGenerator


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _chunk_seconds(stream, k: int) -> list[float]:
    """Wall seconds of each of the stream's next `k` chunks."""
    out = []
    for _ in range(k):
        t = time.perf_counter()
        stream.next_chunk()
        _sync(stream.avatar.device)
        out.append(time.perf_counter() - t)
    return out


class NoCacheStream(StreamingGenerator):
    """The no-cache baseline: the engine with its own loop (`flow.denoise_chunk`) and noise
    draws, but every denoising step reruns [sink, previous clean chunk, current chunk] in one
    sparse-causal forward instead of reading the sink's and the previous chunk's keys/values
    from the KV cache. Where that window is the whole history (chunks 1 and 2) its latents are
    the engine's (tests/test_one_sampler.py); later chunks see the previous chunk recomputed
    without its own previous chunk, which costs the same."""

    prev: tuple | None = None  # the previous chunk's (latents, audio windows)

    def _strategy(self, n_chunks: int):
        """forward_causal's sparse-causal attention for n chunks after the sink, built once per
        window length, on the device: its mask is large, and rebuilding it on the host every
        step would inflate the cache's speed-up."""
        from ..model import attention as A

        cache = self.__dict__.setdefault("_strategies", {})
        if n_chunks not in cache:
            dit = self.avatar.dit
            _, ph, pw = dit.config.patch_size
            h, w = self.latent_shape[-2:]
            cache[n_chunks] = A.SparseCausal(n_chunks, self.chunk_frames, h // ph, w // pw, dit.head_dim,
                                             device=self.avatar.device)
        return cache[n_chunks]

    def denoise(self, au):
        dit, dev, fr = self.avatar.dit, self.avatar.device, self.chunk_frames
        known, audio = [self.dit_input(self.ref, True)], [self.sink_audio()]
        if self.prev is not None:
            known.append(self.dit_input(self.prev[0], True))
            audio.append(self.prev[1])
        t_known = 1 + fr * (len(known) - 1)
        ctx_audio = None if au is None else torch.cat([*audio, au], dim=1)

        strategy = self._strategy(len(known))

        def x0_fn(x, s):
            seq = torch.cat([*known, self.dit_input(x, False)], dim=2)
            t = torch.cat([torch.zeros(1, t_known, device=dev), torch.full((1, fr), s * 1000.0, device=dev)], dim=1)
            v = dit._run(seq, t, self.ctx, ctx_audio, strategy)[:, :, t_known:]  # forward_causal, mask reused
            return x - s * v

        x, _ = flow.denoise_chunk(x0_fn, self.new_noise(), self.sigmas, self.new_noise)
        self.prev = (x, au)
        return x


def _emit(res: dict, section: str, part: dict, as_json: bool) -> None:
    """Add a finished section's figures to `res` and print them now (a killed run keeps them)."""
    res.update(part)
    if as_json:
        print(json.dumps({"section": section, **part}), flush=True)
    else:
        for key, v in part.items():
            print(f"{key:<18} {v}", flush=True)


def run_bench(args) -> int:
    """The bench for the CLI's ``args`` (`eval.cli`); loading the model is timed as ``load_s``."""
    from ..errors import InputError
    from ..stream.options import load_from_args

    if args.chunks < 4:
        raise InputError("--chunks must be >= 4 (the steady state starts at chunk 3)")
    known = ("stream", "kv_cache", "disagg", "baseline")
    sections = set((args.sections or ",".join(known)).split(","))
    if sections - set(known):
        raise InputError(f"--sections: unknown {', '.join(sorted(sections - set(known)))} "
                         f"(choose from {', '.join(known)}; the long stream always runs)")
    torch.manual_seed(args.seed)
    res: dict = {}
    t0 = time.perf_counter()
    avatar = load_from_args(args)
    _sync(avatar.device)
    emit = functools.partial(_emit, res, as_json=args.json)
    emit("load", {"preset": avatar.preset.name, "device": str(avatar.device), "dtype": str(avatar.dtype)[6:],
                  "vae_dtype": str(avatar.vae.dtype)[6:], "resolution": f"{avatar.preset.width}x{avatar.preset.height}",
                  "random_weights": avatar.random_weights,
                  "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                  "load_s": round(time.perf_counter() - t0, 2)})
    graphs = None
    if args.compile:
        from ..model.compiled import compile_dit, graph_count

        emit("compile", compile_dit(avatar.dit, avatar.device, warm=avatar,
                                    backend=args.compile_backend))
        graphs = graph_count()
    else:
        res["compiled"] = False
    n = args.chunks
    stream_seconds = (n + 12) * avatar.preset.stream.chunk_seconds
    audio = speech_like(stream_seconds)

    # first frame: session set-up + the first chunk, with only its audio (+ look-ahead) arrived
    t0 = time.perf_counter()
    s = avatar.new_stream(seed=args.seed, steps=args.steps)
    s.push_audio(audio[: s.chunk_samples + s.lookahead_samples])
    s.next_chunk()
    _sync(avatar.device)
    first_frame_s = time.perf_counter() - t0
    s.push_audio(audio[s.chunk_samples + s.lookahead_samples:])
    emit("first_frame", {"first_frame_s": round(first_frame_s, 3)})

    times, rss, stage = [], {}, {"audio_ms": [], "dit_ms": [], "vae_ms": []}
    rss_at = min(10, n // 2)
    for i in tqdm(range(1, n), desc="long stream", unit="chunk", disable=args.json):
        t = time.perf_counter()
        c = s.next_chunk()
        _sync(avatar.device)
        times.append(time.perf_counter() - t)
        for k in stage:
            stage[k].append(c.timings.get(k, 0.0))
        if i == rss_at:
            rss["early"] = rss_bytes()
    rss["end"] = rss_bytes()
    chunk_s = s.chunk_video_frames / 25.0
    steady = times[2:]
    early = statistics.median(times[2:12])
    late = statistics.median(times[-10:])
    emit("stream", {
        "chunks": n,
        "rtf": round(chunk_s * len(steady) / sum(steady), 3),
        "fps": round(s.chunk_video_frames * len(steady) / sum(steady), 2),
        "steps": len(s.sigmas) - 1,
        "stage_ms": {k[:-3]: round(statistics.median(v[2:]), 2) for k, v in stage.items()},
        "chunk_ms_early": round(1e3 * early, 2),
        "chunk_ms_late": round(1e3 * late, 2),
        "late_over_early": round(late / early, 3),
        "rss_growth": round(rss["end"] / rss["early"] - 1.0, 4),
        "kv_cache_mb": round(s.cache.nbytes() / 2**20, 3),
        "dit_ms_median": round(statistics.median(stage["dit_ms"][2:]), 2),
        # graphs compiled while the stream was timed (0: the warm-up covered every shape)
        **({"recompiled_in_stream": graph_count() - graphs} if graphs is not None else {}),
    })
    if args.plot:
        _plot(times, chunk_s, args.plot)

    if "kv_cache" in sections:
        # KV cache vs recomputing the context (same audio, seed and sampler)
        k = min(8, n)
        cached = _chunk_seconds(s, k)
        nc = NoCacheStream(avatar, avatar.default_portrait(), seed=args.seed, steps=args.steps)
        nc.push_audio(audio)
        nc.next_chunk()
        nc.next_chunk()  # from here on the window is the sink + the previous chunk, as in the cached stream
        recompute = _chunk_seconds(nc, k)
        emit("kv_cache", {"kv_cache_speedup": round(statistics.median(recompute) / statistics.median(cached), 3)})

    if "disagg" in sections:
        emit("disagg", disagg_bench(avatar, args, min(n, 40)))
    if "baseline" in sections and not args.skip_baseline:
        ours_s_per_video_s = 1.0 / res["rtf"]
        b = baseline_bench(avatar.preset, avatar.device, avatar.dtype, args.baseline_frames,
                           args.baseline_steps)
        ours_dit = res["dit_ms_median"] / 1e3 / chunk_s
        emit("baseline", {"baseline_s_per_video_s": round(b["s_per_video_s"], 3),
                          "baseline_speedup": round(b["s_per_video_s"] / ours_s_per_video_s, 2),
                          "baseline_dit_speedup": round(b["dit_s_per_video_s"] / ours_dit, 2),
                          "baseline_settings": b["settings"]})
    if args.json:
        print(json.dumps({"section": "all", **res}), flush=True)
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
    from ..fileio import atomic_write

    atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))


# ----------------------------------------------------------------------------- disaggregation
def _timed_stream(avatar, args, audio, m: int, threads: int | None = None):
    """m chunks made sequentially: wall time and per-chunk stage times."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        s = avatar.new_stream(seed=args.seed, steps=args.steps)
        s.push_audio(audio)
        s.end_audio()
        s.next_chunk()  # warm-up (allocations, first-call costs), as in the pipelined run
        _sync(avatar.device)
        t = time.perf_counter()
        dit, vae = [], []
        for _ in range(m):
            c = s.next_chunk()
            dit.append(c.timings["audio_ms"] + c.timings["dit_ms"])
            vae.append(c.timings["vae_ms"])
        _sync(avatar.device)
        return time.perf_counter() - t, dit, vae
    finally:
        torch.set_num_threads(old)


def disagg_bench(avatar, args, m: int = 40) -> dict:
    """Sequential vs pipelined DiT / VAE stages on the same m chunks (same seed and audio)."""
    from ..stream.disagg import PipelinedStream

    audio = speech_like((m + 4) * avatar.preset.stream.chunk_seconds)
    cpu = avatar.device.type == "cpu"
    stage_threads = max(1, torch.get_num_threads() // 2) if cpu else None
    # sequential reference and the stages alone: the same kernels with the same thread count
    # per operation as in the pipelined run, so the difference is the overlap alone
    seq_wall, dit_ms, vae_ms = _timed_stream(avatar, args, audio, m, stage_threads)

    old = torch.get_num_threads()
    s = avatar.new_stream(seed=args.seed, steps=args.steps)
    p = PipelinedStream(s, decode_device=args.decode_device, depth=2, threads=stage_threads)
    p.push_audio(audio)
    p.end_audio()
    it = p.chunks(m + 1)
    next(it)  # warm-up chunk, as in the sequential runs
    t = time.perf_counter()
    k = sum(1 for _ in it)
    _sync(avatar.device)
    pipe_wall = time.perf_counter() - t
    torch.set_num_threads(old)  # the stage threads set their own count; restore the process's
    slower = max(sum(dit_ms), sum(vae_ms)) / 1e3
    ceiling = seq_wall - slower  # the faster stage's time: what a perfect pipeline hides
    res = {
        "disagg_chunks": k,
        "disagg_speedup": round(seq_wall / pipe_wall, 3),
        "disagg_efficiency": round(slower / pipe_wall, 3),
        "disagg_overlap": round((seq_wall - pipe_wall) / ceiling, 3) if ceiling > 0 else None,
        "disagg_stage_ms": {"dit": round(statistics.median(dit_ms), 2), "vae": round(statistics.median(vae_ms), 2),
                            "dit_in_pipeline": round(statistics.median(p.stage_ms["dit"]), 2),
                            "vae_in_pipeline": round(statistics.median(p.stage_ms["decode"]), 2),
                            "pipelined_chunk": round(1e3 * pipe_wall / k, 2),
                            "sequential_chunk": round(1e3 * seq_wall / m, 2)},
        "disagg_threads_per_stage": stage_threads,
        "decode_device": str(p.decode_device),
    }
    if avatar.device.type == "cuda" and torch.cuda.device_count() < 2:
        res["disagg_two_process"] = "not run: the NCCL two-process mode needs two GPUs (1 visible)"
    return res


# ----------------------------------------------------------------------------- the diffusers peer
class _StandInImageEncoder(torch.nn.Module):
    """Stands in for CLIP ViT-H (no download possible): returns fixed [1, 257, 1280] hidden states."""

    def __init__(self, tokens: int, dim: int):
        super().__init__()
        self.register_buffer("emb", torch.zeros(1, tokens, dim))

    def forward(self, pixel_values=None, output_hidden_states=True, **_):
        from types import SimpleNamespace

        e = self.emb.expand(pixel_values.shape[0] if pixel_values is not None else 1, -1, -1)
        return SimpleNamespace(hidden_states=[e, e])

    # diffusers' `DiffusionPipeline.device` asks each component for these, as on a PreTrainedModel
    @property
    def device(self) -> torch.device:
        return self.emb.device

    @property
    def dtype(self) -> torch.dtype:
        return self.emb.dtype


def _stand_in_processor(images=None, return_tensors="pt"):
    from transformers import BatchFeature

    n = len(images) if isinstance(images, list) else 1
    return BatchFeature({"pixel_values": torch.zeros(n, 3, 224, 224)})


def baseline_pipeline(preset, device, dtype):
    """diffusers' `WanImageToVideoPipeline` around a random `WanTransformer3DModel` with `preset`'s
    geometry (without our audio layers) and a random `AutoencoderKLWan` (the real Wan-VAE
    geometry for real presets; a small one with the tiny preset's 8 latent channels for `tiny`)."""
    from diffusers import (AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline,
                           WanTransformer3DModel)

    d = preset.dit
    torch.manual_seed(0)
    tr = WanTransformer3DModel(
        patch_size=tuple(d.patch_size), num_attention_heads=d.num_attention_heads,
        attention_head_dim=d.attention_head_dim, in_channels=d.in_channels, out_channels=d.out_channels,
        text_dim=d.text_dim, freq_dim=d.freq_dim, ffn_dim=d.ffn_dim, num_layers=d.num_layers,
        cross_attn_norm=d.cross_attn_norm, eps=d.eps, image_dim=d.image_dim,
        added_kv_proj_dim=d.dim if d.image_dim else None, rope_max_seq_len=d.rope_max_seq_len,
    ).to(device, dtype).eval()
    if preset.vae == "tiny":
        z = d.out_channels
        vae = AutoencoderKLWan(base_dim=16, z_dim=z, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                               latents_mean=[0.0] * z, latents_std=[1.0] * z)
        vae_desc = f"random AutoencoderKLWan(base_dim=16, z_dim={z}, num_res_blocks=1)"
    else:
        vae = AutoencoderKLWan()
        vae_desc = "random AutoencoderKLWan() (Wan2.1 VAE geometry)"
    vae = vae.to(device, torch.float32).eval()
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
                                    flow_shift=3.0)
    kw = {}
    if d.image_dim:
        kw = {"image_encoder": _StandInImageEncoder(preset.image_len, d.image_dim).to(device, dtype),
              "image_processor": _stand_in_processor}
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=sched, transformer=tr, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe, vae_desc


@torch.inference_mode()
def baseline_bench(preset, device, dtype, frames: int = 17, steps: int = 50, guidance: float = 5.0) -> dict:
    """Time one clip of `frames` video frames; returns wall seconds per second of video."""
    from PIL import Image

    pipe, vae_desc = baseline_pipeline(preset, device, dtype)
    d = preset.dit
    emb = torch.zeros(1, preset.text_len, d.text_dim, device=device, dtype=dtype)  # as our avatar's text
    image = Image.new("RGB", (preset.width, preset.height), (128, 100, 90))
    gen = torch.Generator(device="cpu").manual_seed(0)

    def run(n_frames, n_steps):
        _sync(device)
        t = time.perf_counter()
        pipe(image=image, prompt_embeds=emb, negative_prompt_embeds=emb, height=preset.height, width=preset.width,
             num_frames=n_frames, num_inference_steps=n_steps, guidance_scale=guidance, generator=gen,
             output_type="np")
        _sync(device)
        return time.perf_counter() - t

    spent = [0.0]
    forward = pipe.transformer.forward

    def timed_forward(*a, **k):  # the score network's share of the baseline's time
        _sync(device)
        t = time.perf_counter()
        out = forward(*a, **k)
        _sync(device)
        spent[0] += time.perf_counter() - t
        return out

    pipe.transformer.forward = timed_forward
    run(5, 2)  # warm-up (first-call allocations, kernel selection)
    spent[0] = 0.0
    wall = run(frames, steps)
    video_s = frames / 25.0
    settings = (f"WanImageToVideoPipeline, {frames} frames ({video_s:.2f} s) at {preset.width}x{preset.height}, "
                f"{steps} steps, guidance_scale={guidance} (CFG: 2 transformer passes per step), "
                f"UniPCMultistepScheduler(flow_prediction, flow_shift=3.0), random WanTransformer3DModel "
                f"({d.num_layers} layers, {d.num_attention_heads}x{d.attention_head_dim}, ffn {d.ffn_dim}, "
                f"{str(dtype).replace('torch.', '')}), {vae_desc}, text/image embeddings precomputed (not timed)")
    return {"wall_s": wall, "video_s": video_s, "s_per_video_s": wall / video_s,
            "dit_s_per_video_s": spent[0] / video_s, "settings": settings}
