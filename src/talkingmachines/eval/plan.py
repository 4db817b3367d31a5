"""`talkingmachines plan`: where each stage goes on N GPUs and the memory each device needs.

Everything is arithmetic on the real modules, built on the meta device (nothing allocated):

- DiT weights: `weights.parameter_breakdown(preset.dit)["total"]` x bytes of `--dtype`.
  Sequence parallelism (Ulysses, `model/parallel.py`) splits tokens and the KV cache, not
  weights: every DiT rank holds all of them.
- KV cache (per DiT rank, k ranks): layers x 2 (K and V) x (sink + previous chunk tokens) x dim
  x bytes / k, plus the chunk being written during the clean pass (F frames more) before it
  replaces the previous one: layers x 2 x (1 + 2F) x hw x dim x bytes / k at peak.
- Cross-attention context cache (per session, replicated): layers x 2 x (text + image
  tokens) x dim x bytes.
- Activations of one chunk forward (per rank, local tokens Lr = F x hw / k), one block live at a
  time: Lr x dim x (16 [four fp32 temporaries of the adaLN / norm path] + 9 x bytes [x, q, k,
  v, attention out, and the gathered q/k/v/out after the all-to-all]) + Lr x ffn_dim x 2 x
  bytes (FFN hidden, before/after the GELU) + the concatenated keys/values
  2 x (1 + 2F) x hw x dim / k x bytes; flash/SDPA attention needs no L x L matrix on GPU.
- VAE: all its weights (the encoder runs once per session for the portrait), the streaming
  decoder's causal cache after a chunk (measured by running our `StreamDecoder` on meta
  tensors), and 3 x its largest intermediate (input, output and one temporary of the widest
  conv) as activations, at `--vae-dtype` (fp32, as `load_avatar` loads it today).
- wav2vec2-base (real presets): its parameters (meta count) x 4 bytes (fp32) + 64 MiB of
  activations for a few seconds of audio; the tiny preset's log-mel front end needs none.
- Per device: 1.0 GiB of CUDA context and allocator reserve.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from ..config import Preset, get_preset

GiB = 2**30
BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp8": 1}
CUDA_RESERVE = 1.0 * GiB
W2V_ACT = 64 * 2**20


@functools.lru_cache(maxsize=8)
def _dit_params(preset_name: str) -> int:
    from ..model.weights import parameter_breakdown

    return int(parameter_breakdown(get_preset(preset_name).dit)["total"])


def _dit_params_for(p: Preset) -> int:
    try:
        if dataclasses.asdict(get_preset(p.name)) == dataclasses.asdict(p):
            return _dit_params(p.name)
    except ValueError:
        pass
    from ..model.weights import parameter_breakdown

    return int(parameter_breakdown(p.dit)["total"])


@functools.lru_cache(maxsize=8)
def _vae_numbers(kind: str, height: int, width: int, chunk_frames: int, spatial: int = 8,
                 latent_channels: int = 8) -> dict:
    """Parameters, causal-state elements and the largest intermediate of one streaming decode,
    from the real modules on the meta device."""
    from ..model import vae as vae_mod

    with torch.device("meta"):
        if kind == "tiny":
            vae = vae_mod.TinyVAE(vae_mod.tiny_vae_config(spatial, latent_channels))
            module = vae
            dec = vae.stream_decoder()
            channels = vae.latent_channels
        else:
            from diffusers import AutoencoderKLWan

            module = AutoencoderKLWan()
            vae = vae_mod.WanVAE(module)
            dec = vae.stream_decoder()
            channels = module.config.z_dim
    params = sum(p.numel() for p in module.parameters())
    peak = [0]

    def hook(_m, _i, o):
        if isinstance(o, torch.Tensor):
            peak[0] = max(peak[0], o.numel())

    hooks = [m.register_forward_hook(hook) for m in module.modules()]
    try:
        with torch.no_grad():
            h, w = height // spatial, width // spatial
            dec.decode_float(torch.empty(1, channels, 1, h, w, device="meta"))  # the sink
            dec.decode_float(torch.empty(1, channels, chunk_frames, h, w, device="meta"))
        state = dec.state_numel()
    finally:
        for hk in hooks:
            hk.remove()
    return {"params": params, "state_numel": state, "peak_numel": peak[0]}


@functools.lru_cache(maxsize=2)
def _wav2vec2_params() -> int:
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    with torch.device("meta"):
        m = Wav2Vec2Model(Wav2Vec2Config())
    return sum(p.numel() for p in m.parameters())


def sp_degrees(p: Preset, max_k: int) -> list[int]:
    """Sequence-parallel degrees the model allows: k divides the heads and the tokens per frame."""
    hw = (p.latent_hw[0] // p.dit.patch_size[1]) * (p.latent_hw[1] // p.dit.patch_size[2])
    return [k for k in range(1, max_k + 1) if p.dit.num_attention_heads % k == 0 and hw % k == 0]


def dit_memory(p: Preset, k: int, b: int) -> dict:
    d = p.dit
    F = p.stream.chunk_frames
    hw = (p.latent_hw[0] // d.patch_size[1]) * (p.latent_hw[1] // d.patch_size[2])
    L, dim = d.num_layers, d.dim
    local = F * hw / k
    kv = L * 2 * (1 + F) * hw * dim * b / k
    kv_peak = L * 2 * (1 + 2 * F) * hw * dim * b / k
    ctx_tokens = p.text_len + (p.image_len if d.image_dim else 0)
    ctx = L * 2 * ctx_tokens * dim * b
    act = (local * dim * (16 + 9 * b) + local * d.ffn_dim * 2 * b + 2 * (1 + 2 * F) * hw * dim / k * b)
    params = _dit_params_for(p)
    return {
        "params": params,
        "weights": params * b,
        "kv_cache": kv,
        "kv_cache_peak": kv_peak,
        "context_cache": ctx,
        "activations": act,
        "tokens_per_chunk": F * hw,
        "tokens_per_rank": int(local),
    }


def vae_memory(p: Preset, vb: int) -> dict:
    n = _vae_numbers(p.vae, p.height, p.width, p.stream.chunk_frames, p.vae_spatial, p.dit.latent_channels)
    return {"params": n["params"], "weights": n["params"] * vb, "causal_cache": n["state_numel"] * vb,
            "activations": 3 * n["peak_numel"] * vb}


def audio_memory(p: Preset) -> dict:
    if p.audio_frontend != "wav2vec2":
        return {"params": 0, "weights": 0, "activations": 0, "name": p.audio_frontend}
    n = _wav2vec2_params()
    return {"params": n, "weights": n * 4, "activations": W2V_ACT, "name": "wav2vec2-base (fp32)"}


def plan(preset: str | Preset, gpus: int, gpu_mem_gib: float, dtype: str = "bf16", vae_dtype: str = "fp32") -> dict:
    p = get_preset(preset) if isinstance(preset, str) else preset
    if dtype not in BYTES or vae_dtype not in BYTES:
        raise ValueError(f"dtype must be one of {', '.join(BYTES)}")
    if gpus < 1:
        raise ValueError("--gpus must be >= 1")
    b, vb = BYTES[dtype], BYTES[vae_dtype]
    cap = gpu_mem_gib * GiB
    vae = vae_memory(p, vb)
    aud = audio_memory(p)
    aud_total = aud["weights"] + aud["activations"]
    notes = []
    if gpus == 1:
        k, dit_gpus, vae_gpu = 1, [0], 0
    else:
        ks = sp_degrees(p, gpus - 1)
        k = ks[-1]
        dit_gpus, vae_gpu = list(range(k)), gpus - 1
        if k < gpus - 1:
            notes.append(f"{gpus - 1 - k} GPU(s) idle: the sequence-parallel degree must divide "
                         f"{p.dit.num_attention_heads} heads and the tokens per frame (allowed: {ks})")
    dm = dit_memory(p, k, b)
    devices = []
    for g in range(gpus):
        items = {}
        stages = []
        if g in dit_gpus:
            stages.append(f"DiT (sequence parallel rank {dit_gpus.index(g)}/{k})" if k > 1 else "DiT")
            items.update({"dit_weights": dm["weights"], "kv_cache": dm["kv_cache_peak"],
                          "context_cache": dm["context_cache"], "dit_activations": dm["activations"]})
        if g == vae_gpu:
            stages.append("VAE (portrait encode + streaming decode)")
            items.update({"vae_weights": vae["weights"], "vae_causal_cache": vae["causal_cache"],
                          "vae_activations": vae["activations"]})
        devices.append({"gpu": g, "stages": stages, "bytes": items})
    # the audio encoder goes where it fits: the VAE GPU first (far lighter than a DiT rank), else
    # the least loaded busy GPU, else an idle one
    if aud_total:
        def load(g):
            return sum(devices[g]["bytes"].values())

        busy = sorted((g for g in range(gpus) if devices[g]["stages"]), key=load)
        order = [vae_gpu] + [g for g in busy if g != vae_gpu] + [g for g in range(gpus) if g not in busy]
        g = next((g for g in order if load(g) + aud_total + CUDA_RESERVE <= cap), vae_gpu)
        devices[g]["stages"].append(f"audio encoder ({aud['name']})")
        devices[g]["bytes"].update({"audio_weights": aud["weights"], "audio_activations": aud["activations"]})
    fits = True
    for d in devices:
        if not d["stages"]:
            d["stages"] = ["idle"]
            d["total"] = 0
            d["fits"] = True
            continue
        d["bytes"]["cuda_reserve"] = CUDA_RESERVE
        d["total"] = sum(d["bytes"].values())
        d["fits"] = d["total"] <= cap
        fits &= d["fits"]
    if dm["weights"] + CUDA_RESERVE > cap:
        notes.append(f"the DiT's weights alone ({dm['weights'] / GiB:.1f} GiB in {dtype}) exceed one GPU's "
                     f"{gpu_mem_gib:g} GiB: sequence parallelism does not shard weights; this needs weight "
                     "sharding (FSDP / tensor parallel, not implemented for inference here), bigger GPUs or "
                     "a smaller dtype")
    elif not fits:
        notes.append("does not fit (see the devices marked DOES NOT FIT): more GPUs (a higher sequence-parallel degree "
                     "shrinks the KV cache and activations per rank) or a smaller dtype")
    return {
        "preset": p.name,
        "resolution": f"{p.width}x{p.height}",
        "gpus": gpus,
        "gpu_mem_gib": gpu_mem_gib,
        "dtype": dtype,
        "vae_dtype": vae_dtype,
        "sequence_parallel": k,
        "fits": fits,
        "dit": dm,
        "vae": vae,
        "audio": aud,
        "devices": devices,
        "notes": notes,
    }


def _gib(x: float) -> str:
    return f"{x / GiB:8.3f} GiB"


def format_plan(r: dict) -> str:
    d = r["dit"]
    out = [
        f"plan: {r['preset']} at {r['resolution']}, {r['gpus']} x {r['gpu_mem_gib']:g} GiB, DiT {r['dtype']}, "
        f"VAE {r['vae_dtype']}",
        f"  DiT: {d['params'] / 1e9:.3f} B parameters, {d['tokens_per_chunk']} tokens per chunk "
        f"({d['tokens_per_rank']} per rank), sequence parallel degree {r['sequence_parallel']}",
        f"  VAE: {r['vae']['params'] / 1e6:.1f} M parameters; audio: {r['audio']['name']} "
        f"{r['audio']['params'] / 1e6:.1f} M parameters",
    ]
    for dev in r["devices"]:
        mark = "" if not dev["total"] else ("fits" if dev["fits"] else "DOES NOT FIT")
        out.append(f"  GPU {dev['gpu']}: {', '.join(dev['stages'])}")
        for name, v in dev["bytes"].items():
            out.append(f"      {name:<20} {_gib(v)}")
        if dev["total"]:
            out.append(f"      {'total':<20} {_gib(dev['total'])}   of {r['gpu_mem_gib']:g} GiB: {mark}")
    out.append("  => " + ("fits" if r["fits"] else "DOES NOT FIT"))
    for n in r["notes"]:
        out.append(f"  note: {n}")
    return "\n".join(out)


def run_plan(args) -> int:
    import json

    from ..errors import InputError

    try:
        r = plan(args.preset, args.gpus, args.gpu_mem, args.dtype, args.vae_dtype)
    except ValueError as e:
        raise InputError(str(e)) from None
    if args.speed or args.realtime:
        from .speed import speed_table

        r["speed"] = speed_table(args.preset, realtime=args.realtime)
    if args.cpu_check:
        from .speed import cpu_check

        r["cpu_check"] = cpu_check()
    if args.json:
        print(json.dumps(r))
    else:
        print(format_plan(r), flush=True)
        if "speed" in r:
            from .speed import format_speed

            print(format_speed(r["speed"]))
        if "cpu_check" in r:
            c = r["cpu_check"]
            print(f"speed model on this CPU (tiny, {c['threads']} threads): predicted {c['predicted_chunk_ms']} ms "
                  f"per chunk, measured {c['measured_chunk_ms']} ms (x{c['predicted_over_measured']})")
    return 0
