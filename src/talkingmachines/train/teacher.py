"""Stage 1: the bidirectional teacher (flow matching over whole clips, CFG dropout).

Per sample (all randomness from `rng.sample_generator(seed, step, j)`): a level
``s`` (uniform or logit-normal, then Wan's shift ``preset.stream.flow_shift``), noise ``e``,
``x_s = (1 - s) z + s e`` on frames >= 1 while the sink (frame 0) stays the clean reference
latent at timestep 0; the audio is dropped (zero windows) with ``p_drop_audio`` and the
reference (sink frame, reference channels) with ``p_drop_ref``, so the sampler can use
classifier-free guidance on both. Loss: ``mse(v(x_s), e - z)`` on frames >= 1, with the
mouth box weighted ``1 + mouth_weight`` when the clips know it (`mouth_weighted_mse`).

`DiTStage` (shared by the student stages) owns the data side: VAE, audio front end, latent
cache, held-out split, deterministic global batches. The teacher's (guided) velocity on the frames
after the sink, which the samplers use, is `pipeline.bidirectional_v` / `pipeline.guided_v`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from ..diffusion import flow
from ..errors import InputError
from ..model.dit import AudioDiT
from ..fileio import atomic_write_text
from .checkpoint import FINAL
from .config import TrainConfig
from .rng import GlobalOrder, sample_generator
from .trainer import Trainer
from ..pipeline import bidirectional_v
from .latents import Batch, LatentClips

SALT_TEACHER = 1


# ============================================================================ model files
def resolve_dit_dir(path: str | Path) -> Path:
    """A stage run folder (``RUN/final/dit``), a model folder (``MODEL/dit``) or a DiT folder."""
    p = Path(path)
    for cand in (p / FINAL / "dit", p / "dit", p):
        if (cand / "config.json").is_file():
            return cand
    if p.exists():
        return p  # a Wan checkpoint (file or folder): weights.load_wan_into sorts it out
    raise InputError(f"{path}: no such model folder")


def _is_our_dit(path: Path) -> bool:
    from ..model.weights import FORMAT

    cj = Path(path) / "config.json"
    if not cj.is_file():
        return False
    try:
        return json.loads(cj.read_text()).get("_format") == FORMAT
    except ValueError:
        return False


def _check_wan_geometry(preset, src: Path) -> None:
    """The preset's DiT must have the checkpoint's geometry (audio fields aside)."""
    from ..model import weights

    try:
        have = weights.wan_config(src)
    except InputError:
        return  # let the loader report what is wrong with the checkpoint
    fields = ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim", "freq_dim",
              "ffn_dim", "num_layers", "image_dim", "patch_size")
    bad = [f"{f} {getattr(have, f)} (preset {getattr(preset.dit, f)})" for f in fields
           if _as_tuple(getattr(have, f)) != _as_tuple(getattr(preset.dit, f))]
    if bad:
        raise InputError(f"{src}: the checkpoint is not preset {preset.name!r}'s geometry: " + ", ".join(bad))


def _as_tuple(v):
    return tuple(v) if isinstance(v, (list, tuple)) else (v,)


def dit_from_wan(preset, src: str | Path, seed: int = 0) -> AudioDiT:
    """The preset's DiT with a Wan2.1 checkpoint's weights (`weights.from_wan`: built on the meta
    device, the checkpoint's tensors become the parameters, the audio layers get their
    initialisation, drawn from ``seed``, with a zero output projection, so the model computes
    exactly what the Wan transformer computes). float32."""
    from ..model import weights

    src = Path(src)
    _check_wan_geometry(preset, src)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model, _ = weights.from_wan(src, device="cpu", dtype=torch.float32, config=preset.dit)
        except FileNotFoundError as e:
            raise InputError(f"{src}: {e}") from None
    return model.float()


def new_dit(preset, init_from: str | Path | None = None, seed: int = 0) -> AudioDiT:
    """The preset's DiT, randomly initialised from ``seed``; with ``init_from`` its weights are
    loaded from our DiT folder (`weights.load_wan_into`) or, for a Wan2.1 checkpoint (a
    diffusers pipeline root such as WAN_DIR, its ``transformer/`` folder, or the original
    release), with `dit_from_wan` (`weights.from_wan`: audio layers missing from a Wan
    checkpoint keep their zero-output initialisation). Our DiT with fewer blocks than the preset
    is grown into it (`weights.grow_depth`: the new blocks start as the identity), and one with half
    its heads is widened first (`weights.grow_width`: the same function, twice the features)."""
    src = resolve_dit_dir(init_from) if init_from else None
    if src is not None and not _is_our_dit(src):
        return dit_from_wan(preset, src, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AudioDiT(preset.dit)
    if src is not None:
        from ..model import weights

        try:
            saved = json.loads((Path(src) / "config.json").read_text())
            layers, heads = saved.get("num_layers"), saved.get("num_attention_heads")
            if heads is not None and heads < preset.dit.num_attention_heads:  # a wider run from a trained DiT
                small = AudioDiT.from_pretrained(src).float()
                wide_cfg = dataclasses.replace(preset.dit, num_layers=small.config.num_layers)
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    wide = weights.grow_width(AudioDiT(wide_cfg), small, seed)
                if wide.config.num_layers == preset.dit.num_layers:
                    return wide.float()
                return weights.grow_depth(model, wide).float()  # and deeper
            if layers is not None and layers < preset.dit.num_layers:  # a deeper run grown from a trained DiT
                return weights.grow_depth(model, AudioDiT.from_pretrained(src)).float()
            weights.load_wan_into(model, src, strict_base=True)
        except InputError:
            raise
        except FileNotFoundError as e:
            raise InputError(f"{init_from}: {e}") from None
    return model.float()


def save_dit_weights(preset, sd: dict, directory: Path) -> Path:
    """Write full weights ``sd`` as a loadable DiT folder (`weights.save_dit`)."""
    from ..model.weights import save_dit

    with torch.device("meta"):
        m = AudioDiT(preset.dit)
    m.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True, assign=True)
    return save_dit(m, directory)


# ============================================================================ shared data side
class DiTStage(Trainer):
    """A DiT stage: the data is crops from the latent cache of ``cfg.data`` encoded by ``cfg.vae``.

    `exported` names the parameter group written to ``final/dit`` at the end."""

    exported = "student"

    def export(self, final: Path) -> None:
        sd = self.full_weights(self.exported, ema=self.cfg.ema.export)
        if self.env.is_main:
            save_dit_weights(self.preset, sd, final / "dit")
            self.preset.save(final / "preset.json")
            if (self.out / "loss.png").is_file():
                shutil.copy(self.out / "loss.png", final / "loss.png")

    @classmethod
    def run_to_end(cls, cfg: TrainConfig) -> Path:
        """Run the stage to the end (or resume it) and return ``RUN/final``."""
        t = cls(cfg)
        try:
            return t.run()
        finally:
            t.cleanup()

    def make_data(self) -> None:
        cfg, p = self.cfg, self.preset
        if not cfg.data:
            raise InputError("no data folder (--data)")
        if (Path(cfg.data) / "prep_index.json").is_file():  # a `data prep` cache (real videos)
            from .real_data import load_real_clips

            self.data = load_real_clips(self, cfg, p)
        else:
            self.data = self.load_latent_clips(cfg, p)
        self.order = GlobalOrder(len(self.data), cfg.batch_size, cfg.seed)

    def load_latent_clips(self, cfg: TrainConfig, p) -> LatentClips:
        from ..dataset import ClipDataset, held_out_split
        from .latents import ensure_latent_cache

        if not cfg.vae:
            raise InputError("no VAE folder (--vae): train one first (train tiny-recipe does)")
        vae_dir = Path(cfg.vae)
        if not vae_dir.exists():
            raise InputError(f"{vae_dir}: no such VAE folder")
        # encodes what is missing (a new VAE, clips added to the data folder)
        cache = ensure_latent_cache(cfg.data, vae_dir, p, 1 + 12 * cfg.clip_chunks, cache=cfg.cache or None,
                                    device=self.device, progress=cfg.progress, rank=self.env.rank,
                                    world=self.env.world, barrier=self.env.barrier if self.env.distributed else None)
        ds = ClipDataset(cfg.data)
        train, held = held_out_split(ds, cfg.held_out, cfg.seed)
        if self.env.is_main:
            atomic_write_text(self.out / "held_out.json", json.dumps({"clips": held.indices, "data": cfg.data}))
        self.cache_dir = cache
        repeat, dark = None, None
        if cfg.dark_skin_repeat > 1 or cfg.flow.dark_mouth_weight is not None:
            from .latents import clip_skin

            dark = {int(i) for i in train.indices if clip_skin(ds.root / ds.clips[i]["npz"]) == "dark"}
        if cfg.dark_skin_repeat > 1:
            repeat = {i: cfg.dark_skin_repeat for i in dark}
        return LatentClips(cache, cfg.clip_chunks, p.stream.chunk_frames, p.stream.audio_context, cfg.seed,
                           clip_ids=train.indices, repeat=repeat,
                           dark=dark if cfg.flow.dark_mouth_weight is not None else None)

    def batch(self, step: int) -> Batch:
        glob = self.order.global_batch(step)
        js = list(self.local_indices())
        b = self.data.collate([self.data.get(*glob[j]) for j in js])
        b.js = js
        return b.to(self.device)


# ============================================================================ the teacher stage
class TeacherTrainer(DiTStage):
    exported = "teacher"
    stage = "teacher"

    def build(self) -> None:
        cfg = self.cfg
        model = new_dit(self.preset, cfg.init_from, cfg.seed)
        self.add_group("teacher", model, cfg.optim.lr)

    def loss(self, batch: Batch, step: int):
        cfg, p = self.cfg, self.preset
        z = batch.z
        B, C, T, h, w = z.shape
        s, noise, drop_a, drop_r = [], [], [], []
        for j in batch.js:
            g = sample_generator(cfg.seed, step, j, SALT_TEACHER)
            s.append(flow.sample_train_timesteps(1, p.stream.flow_shift, generator=g, dist=cfg.flow.t_dist))
            noise.append(torch.randn((C, T - 1, h, w), generator=g))
            u = torch.rand(2, generator=g)
            drop_a.append(u[0] < cfg.flow.p_drop_audio)
            drop_r.append(u[1] < cfg.flow.p_drop_ref)
        dev = z.device
        s = torch.cat(s).to(dev)
        noise = torch.stack(noise).to(dev)
        drop_a = torch.stack(drop_a).to(dev)
        drop_r = torch.stack(drop_r).to(dev)
        x0 = z[:, :, 1:]
        x_s = flow.add_noise(x0, noise, s)
        audio = batch.audio * (~drop_a).float().view(B, 1, 1, 1)
        v = bidirectional_v(self.groups["teacher"].handle, x_s, 1000.0 * s, batch.ref, audio, p, drop_ref=drop_r,
                            text=getattr(batch, "text", None), image=getattr(batch, "image", None))
        target = flow.velocity_target(x0, noise).float()
        weight = cfg.flow.mouth_weight
        dark = getattr(batch, "dark", None)
        if cfg.flow.dark_mouth_weight is not None and dark is not None:  # per sample: dark faces' own weight
            weight = torch.where(dark, float(cfg.flow.dark_mouth_weight), float(weight)).to(v.device)
        per = mouth_weighted_mse(v - target, getattr(batch, "mouth", None), weight)
        return "teacher", per.mean(), {}


def mouth_weighted_mse(diff: torch.Tensor, mouth: torch.Tensor | None,
                       mouth_weight: float | torch.Tensor) -> torch.Tensor:
    """Per-sample weighted mean of ``diff**2`` ([B, C, F, h, w]): weight ``1 + mouth_weight`` on the
    mouth mask ([B, h, w], 0/1), 1 elsewhere, normalised by the sum of the weights (so a clip
    without a mouth box, or a weight of 0, gives the plain mean). ``mouth_weight`` is one number
    or one per sample ([B])."""
    err = diff.float().pow(2)
    per_sample = torch.is_tensor(mouth_weight)
    if mouth is None or (not per_sample and mouth_weight <= 0):
        return err.flatten(1).mean(1)
    mw = mouth_weight.float().view(-1, 1, 1) if per_sample else mouth_weight
    w = (1.0 + mw * mouth.float())[:, None, None].expand_as(err)  # [B, 1, 1, h, w] -> err
    return (err * w).flatten(1).sum(1) / w.flatten(1).sum(1)


def train_teacher(cfg: TrainConfig) -> Path:
    return TeacherTrainer.run_to_end(cfg)


__all__ = ["TeacherTrainer", "DiTStage", "train_teacher", "mouth_weighted_mse", "new_dit", "dit_from_wan", "resolve_dit_dir",
           "save_dit_weights"]
