"""The model functions that training, evaluation and streaming share.

One place for each way the DiT is called:

* `dit_input` / `frame_timesteps`: the Wan I2V input layout and per-frame timesteps;
* `bidirectional_v`, `teacher_fns`, `guided_v`: the teacher's (guided) velocity on whole clips
  (teacher training, ODE pairs, DMD's real score, the teacher as a video generator);
* `causal_x0`, `rollout`: the student over a whole clip, sparse-causal, and its chunk-by-chunk
  generation with the few-step schedule (`diffusion.flow.denoise_chunk`), which the streaming
  engine (`stream.generator`) reproduces with its KV cache.

``model`` arguments are a DiT or anything that calls one (`train.distributed.Handle` under FSDP/DDP):
``model(...)`` is the forward, ``model.call("forward_causal", ...)`` (or the plain method) the
sparse-causal one.
"""

from __future__ import annotations

import torch

from .diffusion import flow


# ============================================================================ DiT inputs
def dit_input(x: torch.Tensor, ref: torch.Tensor, known: str = "sink") -> torch.Tensor:
    """Wan I2V input ``[x | mask (4 ch) | ref broadcast]``.

    x [B, C, T, h, w], ref [B, C, 1, h, w]. ``known="sink"``: mask 1 on frame 0 only (a clip
    whose frame 0 is the sink, the clean reference latent); ``"all"``: mask 1 everywhere (the
    sink alone, or a clean chunk written to the KV cache); ``"none"``: mask 0 everywhere (a
    noisy chunk on its own, as the streaming engine denoises it)."""
    B, _, T, h, w = x.shape
    if known not in ("sink", "all", "none"):
        raise ValueError(f"known must be 'sink', 'all' or 'none', got {known!r}")
    mask = torch.full((B, 4, T, h, w), 1.0 if known == "all" else 0.0, device=x.device, dtype=x.dtype)
    if known == "sink":
        mask[:, :, 0] = 1.0
    return torch.cat([x, mask, ref.to(x.dtype).expand(-1, -1, T, -1, -1)], dim=1)


def frame_timesteps(s: torch.Tensor, T: int) -> torch.Tensor:
    """Per-frame network timesteps [B, T]: 0 for the sink, ``1000 s`` for the others.
    ``s`` is [B] (one level per clip) or [B, T-1] (per frame)."""
    s = torch.as_tensor(s, dtype=torch.float32)
    if s.ndim == 1:
        s = s[:, None].expand(-1, T - 1)
    return torch.cat([torch.zeros(s.shape[0], 1, device=s.device), 1000.0 * s], dim=1)


def text_for(preset, batch: int, device) -> torch.Tensor:
    """The prompt embedding when the data has none: zeros (tiny has no text encoder; with a
    `data prep` cache the umT5 embeddings of the clips' prompts come with the batch)."""
    return torch.zeros(batch, preset.text_len, preset.dit.text_dim, device=device)


def _call(model, method: str, *args, **kwargs):
    if hasattr(model, "call"):  # a train.distributed.Handle (FSDP / DDP wrapping)
        return model.call(method, *args, **kwargs)
    return getattr(model, method)(*args, **kwargs)


# ============================================================================ the teacher
def bidirectional_v(model, x: torch.Tensor, t: torch.Tensor, ref: torch.Tensor, audio: torch.Tensor | None,
                    preset, drop_ref: torch.Tensor | None = None, text: torch.Tensor | None = None,
                    image: torch.Tensor | None = None) -> torch.Tensor:
    """Velocity on frames >= 1 of the teacher (or fake score) for ``x`` [B, C, F, h, w] (the
    frames after the sink) at network timesteps ``t`` ([B] or [B, F]). ``ref`` [B, C, 1, h, w]
    (zero for "no reference"), ``audio`` [B, 1 + F, W, D] or zeros for "no audio".
    ``text`` [B, Lt, text_dim] (default `text_for`: zeros) and ``image`` [B, Li, image_dim]
    (CLIP tokens of the reference; zeroed with it by ``drop_ref``; default: none)."""
    B, _, F = x.shape[:3]
    if drop_ref is not None:
        keep = (~drop_ref).to(ref.dtype)
        ref = ref * keep.view(B, 1, 1, 1, 1)
        if image is not None:
            image = image * keep.to(image.dtype).view(B, 1, 1)
    full = torch.cat([ref.to(x.dtype), x], dim=2)
    t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
    if t.ndim == 1:
        t = t[:, None].expand(B, F)
    tt = torch.cat([torch.zeros(B, 1, device=x.device), t], dim=1)
    txt = text_for(preset, B, x.device) if text is None else text
    if image is None:
        v = model(dit_input(full, ref), tt, txt, audio=audio)
    else:
        v = model(dit_input(full, ref), tt, txt, image=image, audio=audio)
    return v[:, :, 1:].float()


def teacher_fns(model, ref, audio, preset, cfg_audio: float = 1.0, cfg_ref: float = 1.0,
                text: torch.Tensor | None = None, image: torch.Tensor | None = None):
    """Velocity model(s) ``f(x, t)`` on frames >= 1 for `flow.euler_sample`, as a mapping of
    CFG branches (least to most conditioned) and their scales: ``uncond`` (no reference, no
    audio), ``image`` (reference, no audio), ``full``. Branches with scale 1 are skipped.
    ``text``/``image``: prompt and reference CLIP embeddings (real presets; ``uncond`` zeroes
    the image tokens with the reference)."""
    zero_audio = torch.zeros_like(audio)
    no_ref = torch.zeros_like(ref)
    img_tokens = image  # (the name `image` is the branch below)
    no_img = None if img_tokens is None else torch.zeros_like(img_tokens)

    def full(x, t):
        return bidirectional_v(model, x, t, ref, audio, preset, text=text, image=img_tokens)

    def image(x, t):
        return bidirectional_v(model, x, t, ref, zero_audio, preset, text=text, image=img_tokens)

    def uncond(x, t):
        return bidirectional_v(model, x, t, no_ref, zero_audio, preset, text=text, image=no_img)

    branches, scales = {}, {}
    if cfg_ref != 1.0:
        branches["uncond"] = uncond
    if cfg_audio != 1.0 or cfg_ref != 1.0:
        branches["image"] = image
        if cfg_ref != 1.0:
            scales["image"] = cfg_ref
    branches["full"] = full
    if cfg_audio != 1.0:
        scales["full"] = cfg_audio
    return branches, scales


def guided_v(model, ref, audio, preset, cfg_audio: float = 1.0, cfg_ref: float = 1.0,
             text: torch.Tensor | None = None, image: torch.Tensor | None = None, ref_max_sigma: float = 1.0):
    """The teacher's guided velocity ``f(x, t)`` (`teacher_fns` combined by `flow.guided_model_fn`).
    ``ref_max_sigma`` < 1: the reference guidance only at sigma <= it (the last, low-noise steps),
    plain audio guidance above. On new faces that kept the sharper face that reference guidance
    gives without its cost to the lips (docs/face_recipe.md)."""
    branches, scales = teacher_fns(model, ref, audio, preset, cfg_audio, cfg_ref, text=text, image=image)
    with_ref = flow.guided_model_fn(branches, scales)
    if cfg_ref == 1.0 or ref_max_sigma >= 1.0:
        return with_ref
    branches, scales = teacher_fns(model, ref, audio, preset, cfg_audio, 1.0, text=text, image=image)
    no_ref = flow.guided_model_fn(branches, scales)
    limit = ref_max_sigma * flow.NUM_TRAIN_TIMESTEPS

    def fn(x, t):  # t: a number, or one timestep per sample (DMD re-noises each sample to its own level)
        if not torch.is_tensor(t):
            return with_ref(x, t) if float(t) <= limit + 1e-3 else no_ref(x, t)
        low = t.reshape(-1) <= limit + 1e-3
        if bool(low.all()):
            return with_ref(x, t)
        if not bool(low.any()):
            return no_ref(x, t)
        a, b = with_ref(x, t), no_ref(x, t)
        return torch.where(low.to(a.device).view(-1, *[1] * (a.dim() - 1)), a, b)

    return fn


# ============================================================================ the student
def causal_x0(model, x, s_frames, ref, audio, context, preset, text=None, image=None) -> torch.Tensor:
    """Student x0 for noisy frames ``x`` [B, C, F, h, w] (after the sink) at per-frame sigmas
    ``s_frames`` [B, F], teacher-forced on clean ``context`` [B, C, F, h, w] (chunk i sees
    clean chunk i-1). ``audio`` [B, 1 + F, W, D]; ``text``/``image``: prompt and reference
    CLIP embeddings of a `data prep` cache (default: zeros / none). One sparse-causal forward."""
    B, _, F = x.shape[:3]
    cf = preset.stream.chunk_frames
    full = torch.cat([ref.to(x.dtype), x], dim=2)
    clean = torch.cat([ref.to(x.dtype), context.to(x.dtype)], dim=2)
    txt = text_for(preset, B, x.device) if text is None else text
    kw = {} if image is None else {"image": image}
    v = _call(model, "forward_causal", dit_input(full, ref), frame_timesteps(s_frames, 1 + F), txt, audio=audio,
              chunk_frames=cf, x_clean=dit_input(clean, ref, "all"), **kw)
    return x - s_frames[:, None, :, None, None].to(x.dtype) * v[:, :, 1:].to(x.dtype)


@torch.no_grad()
def rollout(model, ref, audio, preset, sigmas, gens, prefix: torch.Tensor | None = None, text=None, image=None):
    """Chunk-by-chunk generation with the few-step schedule (`flow.denoise_chunk`), as the
    streaming engine does it: each chunk sees the sink and the previous clean chunk; its
    noise is drawn from ``gens`` (one `torch.Generator` per sample) in the engine's order.

    Returns ``(out, last_in)``: the clean result [B, C, F, h, w] and the input of each chunk's
    last denoising step. ``prefix`` [B, C, p, h, w]: known first frames (whole chunks) taken
    as given (a continuation of a real clip)."""
    B, C = ref.shape[:2]
    h, w = ref.shape[-2:]
    cf = preset.stream.chunk_frames
    F = audio.shape[1] - 1
    n = F // cf
    dev = ref.device
    out = torch.zeros(B, C, F, h, w, device=dev)
    last_in = torch.zeros_like(out)
    first = 0
    if prefix is not None:
        out[:, :, : prefix.shape[2]] = prefix
        last_in[:, :, : prefix.shape[2]] = prefix
        first = prefix.shape[2] // cf

    def noise():
        return torch.stack([torch.randn((C, cf, h, w), generator=g) for g in gens]).to(dev)

    for c in range(first, n):
        sl, Fc = slice(c * cf, (c + 1) * cf), (c + 1) * cf

        def x0_fn(x, s, sl=sl, Fc=Fc):
            xin = torch.zeros(B, C, Fc, h, w, device=dev)
            xin[:, :, sl] = x
            sf = torch.zeros(B, Fc, device=dev)
            sf[:, sl] = s
            return causal_x0(model, xin, sf, ref, audio[:, : 1 + Fc], out[:, :, :Fc], preset, text, image)[:, :, sl]

        out[:, :, sl], last_in[:, :, sl] = flow.denoise_chunk(x0_fn, noise(), sigmas, noise)
    return out, last_in
