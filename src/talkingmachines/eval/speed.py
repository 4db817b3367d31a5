"""Speed on paper: per-chunk time and fps of a preset on a GPU kind, from counted work.

What is counted (`chunk_work`), per chunk, by running the real modules:
- DiT: one denoising pass of a chunk against the KV cache (sink + previous chunk), on the meta
  device in bf16 under `torch.utils.flop_counter.FlopCounterMode` (FLOPs), and the bytes every
  non-view op reads and writes (eager, unfused: an upper bound of the memory traffic). A chunk
  costs `steps + 1` such passes: the student's denoising steps, then one clean pass at t = 0 that
  writes the chunk's keys/values into the cache (the same cost as a step).
- Kernels per pass: the non-view ops the same code dispatches on the CPU for a narrow model of the
  preset's structure with 1 and 2 blocks (identical op sequence, small tensors), extrapolated to
  the preset's blocks. On the meta device attention would decompose into its math ops.
- VAE decode of one chunk (fp32, as load_avatar loads it), and the audio front end on the window
  a chunk needs (wav2vec2-base in fp32 for the real presets), on the meta device likewise.

Model (`predict`): each stage takes max(GPU time, host time). GPU time = FLOPs / (peak x MFU) +
bytes / (bandwidth x BW_UTIL); host time = kernels x HOST_US (eager PyTorch issues one kernel at
a time; the GPU idles when it is faster than that). The DiT runs bf16 on tensor cores; the fp32
VAE convolutions run TF32 (cuDNN's default); fp32 matmuls (wav2vec2) run plain fp32 (PyTorch's
default). Sequence parallelism over k GPUs divides the DiT's FLOPs and bytes, not its kernels,
and adds 4 all-to-alls per block per pass (q, k, v in, attention out) over the GPU link.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import torch

from ..config import Preset, get_preset

MFU = 0.45  # share of the dense peak reached by the DiT's matmuls and attention (stated, not measured)
BW_UTIL = 0.7  # share of the memory bandwidth reached by the unfused elementwise ops
HOST_US = 6.0  # host cost per eager kernel launch, in microseconds


@dataclasses.dataclass(frozen=True)
class GPU:
    name: str
    bf16_tflops: float  # dense tensor-core bf16 (fp32 accumulate), vendor datasheet
    tf32_tflops: float  # dense
    fp32_tflops: float  # plain fp32 (no tensor cores)
    mem_tbps: float
    mem_gib: float
    link_gbps: float  # GPU-GPU bandwidth per direction: NVLink on SXM parts, PCIe 4.0 x16 otherwise


GPUS = {g.name: g for g in (
    GPU("H100", 989, 495, 67, 3.35, 80, 450),
    GPU("H200", 989, 495, 67, 4.8, 141, 450),
    GPU("A100", 312, 156, 19.5, 2.04, 80, 300),
    GPU("L40S", 362, 183, 91.6, 0.864, 48, 32),
    GPU("RTX 4090", 165, 82.6, 82.6, 1.008, 24, 32),
)}

_VIEWS = {"view", "_unsafe_view", "t", "transpose", "expand", "unsqueeze", "squeeze", "permute", "slice", "select",
          "split", "unbind", "detach", "alias", "as_strided", "reshape", "split_with_sizes", "lift_fresh", "unflatten"}


class _OpTally(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts non-view ops (kernels) and the bytes of their tensor inputs and outputs."""

    def __init__(self):
        super().__init__()
        self.kernels = 0
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__.rstrip("_") not in _VIEWS:
            self.kernels += 1
            leaves = torch.utils._pytree.tree_leaves((args, kwargs, out))
            self.bytes += sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))
        return out


def _dit_pass(cfg, p: Preset, device, dtype, hw=None):
    """Build a DiT of `cfg`, fill its cache (sink, chunk 1) and return a closure running one
    cached pass of chunk 2."""
    from ..model.dit import AudioDiT

    with torch.device(device):
        m = AudioDiT(cfg).to(dtype).eval()
    h, w = hw or p.latent_hw
    F = p.stream.chunk_frames
    kw = {"device": device, "dtype": dtype}
    text = torch.zeros(1, p.text_len, cfg.text_dim, **kw)
    img = torch.zeros(1, p.image_len, cfg.image_dim, **kw) if cfg.image_dim else None
    au = torch.zeros(1, F, cfg.audio_window, cfg.audio_dim, **kw) if cfg.audio_dim else None
    x = torch.zeros(1, cfg.in_channels, F, h, w, **kw)
    t = torch.zeros(1, device=device)
    with torch.no_grad():
        ctx = m.encode_context(text, img)
    # the cache as after chunk 1 (its sink and previous chunk), without running those passes
    cache = m.new_cache()
    tokens = (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
    for i in range(cfg.num_layers):
        kv = torch.zeros(1, tokens, cfg.num_attention_heads, cfg.attention_head_dim, **kw)
        cache.write_sink(i, kv, kv)
    cache.allocate(F * tokens)
    cache.chunks_written = 1

    def run():
        with torch.no_grad():
            m.forward_chunk(cache, x, t, ctx, au, chunk=2)
    return run, m


def _fused_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """Attention as one fused kernel (what the GPU runs), also on the meta device, where
    `scaled_dot_product_attention` would fall back to its math ops and count the [Lq, Lk] score
    matrices as memory traffic."""
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~attn_mask, float("-inf"))
    if attn_mask is not None:
        attn_mask = attn_mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, attn_mask, False, dropout_p, is_causal,
                                                                  scale=scale)[0]


def _count(run, fused_attention: bool = True) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    fc, tally = FlopCounterMode(display=False), _OpTally()
    F = torch.nn.functional
    plain = F.scaled_dot_product_attention
    if fused_attention:
        F.scaled_dot_product_attention = _fused_sdpa
    try:
        with fc, tally:
            run()
    finally:
        F.scaled_dot_product_attention = plain
    return {"flops": int(fc.get_total_flops()), "bytes": int(tally.bytes), "kernels": tally.kernels}


def _narrow_passes(p: Preset):
    """One cached pass of narrow 1- and 2-block copies of the preset on the CPU: the same op
    sequence and Python path on tiny tensors."""
    narrow = dict(num_attention_heads=2, attention_head_dim=16, ffn_dim=32, freq_dim=16)
    for layers in (1, 2):
        cfg = dataclasses.replace(p.dit, num_layers=layers, **narrow,
                                  text_dim=8, image_dim=8 if p.dit.image_dim else None,
                                  audio_dim=8 if p.dit.audio_dim else None)
        q = dataclasses.replace(p, text_len=2, image_len=3 if p.dit.image_dim else 0)
        run, _ = _dit_pass(cfg, q, "cpu", torch.float32, hw=(4, 4))
        run()  # first calls build memoised tables (RoPE): not per-chunk work
        yield run


def _per_layers(p: Preset, one: float, two: float) -> float:
    return one + (two - one) * (p.dit.num_layers - 1)


def _dit_kernels(p: Preset) -> int:
    """Kernels of one pass, counted on the narrow 1- and 2-block copies, extrapolated."""
    counts = [_count(run, fused_attention=False)["kernels"] for run in _narrow_passes(p)]  # the CPU's fused attention
    return round(_per_layers(p, *counts))


def host_pass_s(p: Preset, repeats: int = 20) -> float:
    """Host time of one pass on this CPU: the narrow copies timed (best of 5), extrapolated to the
    preset's blocks. Their arithmetic is negligible, so this is dispatch + the Python between ops."""
    times = []
    for run in _narrow_passes(p):
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(repeats):
                run()
            best = min(best, (time.perf_counter() - t) / repeats)
        times.append(best)
    return _per_layers(p, *times)


def _vae_chunk(p: Preset) -> dict:
    return _vae_work(p.vae, p.height, p.width, p.stream.chunk_frames, p.dit.latent_channels, p.vae_spatial)


@functools.lru_cache(maxsize=8)
def _vae_work(kind: str, height: int, width: int, chunk_frames: int, latent_channels: int, spatial: int = 8) -> dict:
    """The VAE's streaming decode of one chunk; a tiny VAE as wide as the DiT's latents."""
    from ..model import vae as vae_mod

    with torch.device("meta"):
        if kind == "tiny":
            vae = vae_mod.TinyVAE(vae_mod.tiny_vae_config(spatial, latent_channels))
            channels = vae.latent_channels
        else:
            from diffusers import AutoencoderKLWan

            module = AutoencoderKLWan()
            vae = vae_mod.WanVAE(module)
            channels = module.config.z_dim
    dec = vae.stream_decoder()
    h, w = height // spatial, width // spatial
    with torch.no_grad():
        dec.decode_float(torch.empty(1, channels, 1, h, w, device="meta"))  # the sink primes the state
        return _count(lambda: dec.decode_float(torch.empty(1, channels, chunk_frames, h, w, device="meta")))


def _audio_chunk(p: Preset) -> dict:
    """The front end's work for one chunk: wav2vec2 on its sliding window (2 s before the chunk,
    the chunk and its audio context, 0.2 s after); the log-mel front end is negligible."""
    if p.audio_frontend != "wav2vec2":
        return {"flops": 0, "bytes": 0, "kernels": 0}
    return _wav2vec2_work(p.stream.chunk_video_frames, p.stream.audio_context)


@functools.lru_cache(maxsize=4)
def _wav2vec2_work(chunk_video_frames: int, audio_context: int) -> dict:
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from ..config import SAMPLE_RATE, SAMPLES_PER_FRAME

    with torch.device("meta"):
        m = Wav2Vec2Model(Wav2Vec2Config()).eval()
    n = int(2.2 * SAMPLE_RATE) + (chunk_video_frames + 8 * audio_context) * SAMPLES_PER_FRAME
    with torch.no_grad():
        return _count(lambda: m(torch.zeros(1, n, device="meta")))


_WORK: dict = {}


def _work(p: Preset, dtype=torch.bfloat16) -> dict:
    key = repr(p) + str(dtype)  # presets are plain (unhashable) dataclasses; their repr names every field
    if key in _WORK:
        return _WORK[key]
    run, m = _dit_pass(p.dit, p, "meta", dtype)
    dit = _count(run)
    dit["kernels"] = _dit_kernels(p)
    dit["weight_bytes"] = sum(t.numel() * t.element_size() for t in m.parameters())
    _WORK[key] = {"dit_pass": dit, "vae": _vae_chunk(p), "audio": _audio_chunk(p)}
    return _WORK[key]


def chunk_work(preset: str | Preset, dtype=torch.bfloat16) -> dict:
    """FLOPs, bytes and kernels of one DiT pass (in `dtype`), the VAE decode and the audio front
    end per chunk."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    return _work(p, dtype)


def _stage_s(w: dict, tflops: float, tbps: float, host_us: float, mfu: float) -> float:
    gpu = w["flops"] / (tflops * 1e12 * mfu) + w["bytes"] / (tbps * 1e12 * BW_UTIL)
    return max(gpu, w["kernels"] * host_us * 1e-6)


def _alltoall_s(p: Preset, k: int, g: GPU) -> float:
    """Per pass: 4 all-to-alls per block of the rank's [tokens / k, dim] bf16 activations."""
    if k == 1:
        return 0.0
    hw = (p.latent_hw[0] // p.dit.patch_size[1]) * (p.latent_hw[1] // p.dit.patch_size[2])
    n = p.stream.chunk_frames * hw
    sent = 4 * p.dit.num_layers * (n / k) * p.dit.dim * 2 * (k - 1) / k
    return sent / (g.link_gbps * 1e9) + 4 * p.dit.num_layers * 20e-6  # + ~20 us latency per collective


def predict(preset: str | Preset, gpu: str = "H200", steps: int | None = None, k: int = 1, mfu: float = MFU,
            host_us: float = HOST_US) -> dict:
    """Per-chunk stage times (ms) and fps on `gpu`, the DiT sequence-parallel over k GPUs."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    g = GPUS[gpu]
    w = chunk_work(p)
    steps = steps or p.stream.student_steps
    d = dict(w["dit_pass"])
    d["flops"], d["bytes"] = d["flops"] / k, d["bytes"] / k
    pass_s = _stage_s(d, g.bf16_tflops, g.mem_tbps, host_us, mfu) + _alltoall_s(p, k, g)
    vae_s = _stage_s(w["vae"], g.tf32_tflops, g.mem_tbps, host_us, mfu)
    audio_s = _stage_s(w["audio"], g.fp32_tflops, g.mem_tbps, host_us, mfu)
    dit_s = (steps + 1) * pass_s
    seq = audio_s + dit_s + vae_s
    piped = max(audio_s + dit_s, vae_s)  # the VAE decoder as its own stage (disaggregated)
    frames = p.stream.chunk_video_frames
    return {
        "gpu": gpu, "preset": p.name, "resolution": f"{p.width}x{p.height}", "steps": steps, "sp": k,
        "stage_ms": {"audio": 1e3 * audio_s, "dit": 1e3 * dit_s, "dit_pass": 1e3 * pass_s, "vae": 1e3 * vae_s},
        "chunk_ms": 1e3 * seq, "fps": frames / seq, "fps_pipelined": frames / piped,
        "fps_without_cache_write": frames / (seq - pass_s),
        "cache_write_share": pass_s / seq,
        "realtime_budget_ms": 1e3 * p.stream.chunk_seconds,
    }


def at_resolution(preset: str, side: int) -> Preset:
    p = get_preset(preset)
    return p if (p.height, p.width) == (side, side) else dataclasses.replace(p, height=side, width=side)


def gpus_for_realtime(preset: Preset, gpu: str, max_k: int = 16) -> dict:
    """The smallest sequence-parallel degree whose pipelined chunk (DiT on k GPUs, VAE on its own)
    keeps up with real time; the degrees the model allows come from `plan.sp_degrees`."""
    from .plan import sp_degrees

    best = 0.0
    for k in sp_degrees(preset, max_k):
        r = predict(preset, gpu, k=k)
        # one GPU: its stages share it (sequential); k > 1: k DiT ranks and the VAE on a GPU of its own
        fps = r["fps"] if k == 1 else r["fps_pipelined"]
        best = max(best, fps)
        if fps >= 25.0:
            return {"dit_gpus": k, "total_gpus": k + (1 if k > 1 else 0), "fps": fps}
    return {"dit_gpus": None, "total_gpus": None, "allowed_degrees": sp_degrees(preset, max_k), "fps_at_best": best}


def speed_table(preset: str, realtime: bool = False) -> dict:
    """Per-GPU-kind prediction for `preset`; with `realtime`, also the GPUs 25 fps needs for
    wan-1.3b-audio and the 18B at 512x512 and 720x720 (four more models counted: slower)."""
    p = get_preset(preset)
    rows = [predict(p, g) for g in GPUS]
    scale = {}
    if realtime:
        for name in ("wan-1.3b-audio", "wan-i2v-14b-audio"):
            for side in (512, 720):
                q = at_resolution(name, side)
                scale[f"{name}@{side}x{side}"] = {g: gpus_for_realtime(q, g) for g in ("H100", "H200")}
    return {"assumptions": {"mfu": MFU, "bw_util": BW_UTIL, "host_us_per_kernel": HOST_US},
            "work": chunk_work(p), "per_gpu": rows, "realtime_gpus": scale}


def format_speed(r: dict) -> str:
    a = r["assumptions"]
    w = r["work"]
    d = w["dit_pass"]
    first = r["per_gpu"][0]
    out = [f"speed on paper: {first['preset']} at {first['resolution']}, {first['steps']} steps + 1 cache-write pass "
           f"per chunk (MFU {a['mfu']:.0%} of dense peak, {a['bw_util']:.0%} of bandwidth, "
           f"{a['host_us_per_kernel']:g} us host time per eager kernel)",
           f"  per DiT pass: {d['flops'] / 1e12:.2f} TFLOP, {d['bytes'] / 1e9:.1f} GB moved (unfused), "
           f"{d['kernels']} kernels; VAE per chunk {w['vae']['flops'] / 1e12:.2f} TFLOP; audio "
           f"{w['audio']['flops'] / 1e12:.3f} TFLOP",
           f"  {'GPU':<9} {'audio':>7} {'DiT':>8} {'VAE':>7} {'chunk':>8} {'fps':>6} {'pipelined':>9} "
           f"{'no KV-write pass':>16}  (ms; budget {first['realtime_budget_ms']:.0f} ms per chunk)"]
    for x in r["per_gpu"]:
        s = x["stage_ms"]
        out.append(f"  {x['gpu']:<9} {s['audio']:7.1f} {s['dit']:8.1f} {s['vae']:7.1f} {x['chunk_ms']:8.1f} "
                   f"{x['fps']:6.1f} {x['fps_pipelined']:9.1f} {x['fps_without_cache_write']:16.1f}")
    out.append(f"  skipping the separate KV-cache-write pass saves {first['cache_write_share']:.0%} of a chunk "
               "(the cache would be written from the last denoising step's keys/values)")
    if not r["realtime_gpus"]:
        return "\n".join(out)
    out.append("  GPUs for 25 fps (1: all stages on one GPU; k + 1: k sequence-parallel DiT ranks and a VAE GPU; "
               "None: no degree the heads and tokens allow reaches it):")
    for name, per in r["realtime_gpus"].items():
        cells = ", ".join(f"{g}: {v['total_gpus']}" + (f" ({v['fps']:.0f} fps)" if v["total_gpus"] else
                                                        f" (best {v['fps_at_best']:.1f} fps, k in {v['allowed_degrees']})")
                          for g, v in per.items())
        out.append(f"    {name:<28} {cells}")
    return "\n".join(out)


# ----------------------------------------------------------------------------- CPU check
def cpu_calibration(repeats: int = 100) -> dict:
    """This process's CPU, measured now: seconds per FLOP of a matmul of the tiny DiT's size,
    seconds per byte of a large elementwise add, and seconds per kernel of a small block-like
    module chain (LayerNorm, Linear, GELU, Linear, as nn.Modules: dispatch and module-call
    overhead included, its FLOPs and bytes taken out). Best of 5 runs each: on a loaded machine
    the minimum is the stable figure."""
    p = get_preset("tiny")
    n, dim = p.stream.chunk_frames * (p.height // 16) * (p.width // 16), p.dit.dim
    a, b = torch.randn(n, dim), torch.randn(dim, p.dit.ffn_dim)
    x = torch.randn(n, dim)
    chain = torch.nn.Sequential(torch.nn.LayerNorm(dim), torch.nn.Linear(dim, dim), torch.nn.GELU("tanh"),
                                torch.nn.Linear(dim, dim)).eval()

    def best(fn):
        ts = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(repeats):
                fn()
            ts.append((time.perf_counter() - t) / repeats)
        return min(ts)

    big = torch.randn(1 << 22)  # 16 MB: past the caches
    with torch.no_grad():
        s_per_flop = best(lambda: a @ b) / (2 * n * dim * p.dit.ffn_dim)
        s_per_byte = best(lambda: torch.add(big, big)) / (3 * big.numel() * 4)
        c = _count(lambda: chain(x), fused_attention=False)
        chain_s = best(lambda: chain(x))
    rest = chain_s - c["flops"] * s_per_flop - c["bytes"] * s_per_byte
    return {"s_per_flop": s_per_flop, "s_per_byte": s_per_byte, "s_per_kernel": max(rest, 0.0) / c["kernels"]}


def predict_cpu(preset: str | Preset = "tiny", calib: dict | None = None) -> dict:
    """Per-chunk time on this CPU by the same counts: FLOPs x s_per_flop + bytes x s_per_byte +
    host time per stage (the CPU runs each op in turn: they add up). The DiT's host time is its
    narrow copy's measured pass (`host_pass_s`); the VAE's and audio's, kernels x s_per_kernel."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    c = calib or cpu_calibration()
    w = chunk_work(p, torch.float32)  # the CPU runs the DiT in fp32

    def t(x, host=None):
        return (x["flops"] * c["s_per_flop"] + x["bytes"] * c["s_per_byte"]
                + (x["kernels"] * c["s_per_kernel"] if host is None else host))

    c["host_pass_s"] = host_pass_s(p)
    dit = (p.stream.student_steps + 1) * t(w["dit_pass"], c["host_pass_s"])
    return {"dit_ms": 1e3 * dit, "vae_ms": 1e3 * t(w["vae"]), "audio_ms": 1e3 * t(w["audio"]),
            "chunk_ms": 1e3 * (dit + t(w["vae"]) + t(w["audio"])), **c}


def cpu_check(chunks: int = 14) -> dict:
    """The model against this CPU: the tiny preset's measured steady-state chunk time (same
    process, one calibration just before) against `predict_cpu`."""
    from ..audio_io import speech_like
    from ..stream.generator import load_avatar

    a = load_avatar(None, "tiny", "cpu")
    s = a.new_stream(seed=0)
    s.push_audio(speech_like((chunks + 4) * a.preset.stream.chunk_seconds))
    times = []
    for _ in range(chunks):
        t = time.perf_counter()
        s.next_chunk()
        times.append(time.perf_counter() - t)
    measured = 1e3 * min(times[2:])  # the minimum, as the calibration: what the CPU does unhindered
    pred = predict_cpu(a.preset)  # the loaded model's geometry (its preset.json), not the built-in preset
    return {"measured_chunk_ms": round(measured, 1), "predicted_chunk_ms": round(pred["chunk_ms"], 1),
            "predicted_over_measured": round(pred["chunk_ms"] / measured, 3), "threads": torch.get_num_threads(),
            "predicted_stage_ms": {k: round(pred[f"{k}_ms"], 1) for k in ("audio", "dit", "vae")},
            **{k: pred[k] for k in ("s_per_flop", "s_per_byte", "s_per_kernel", "host_pass_s")}}
