"""`talkingmachines train tiny-recipe`: the whole `tiny` model from nothing, on one machine.

    synth data -> TinyVAE -> decoder -> teacher -> grow -> ode (pairs + regression) -> dmd -> export

``decoder`` (optional, ``decoder.steps`` > 0) fine-tunes the VAE's decoder alone on latents with
noise added (`vae_train.VAEOptions.latent_noise`): the encoder and its latent statistics stay bit
for bit, so the teacher and student train on the same latents, and the exported VAE decodes the
student's slightly-off latents into a face rather than into streaks. ``decoder.refine_steps`` > 0 then
fine-tunes that decoder again at lower noise (``OUT/decoder_refine``), which gives back some sharpness.
``grow`` (optional, ``grow.layers`` or ``grow.heads`` > 0) deepens and/or widens the finished teacher
(`weights.grow_depth`: the new blocks start as the identity; `weights.grow_width`: twice the features,
the same function) and trains it on (``OUT/teacher_grow``); the student stages then distil that one.

The config is `configs/tiny-recipe.json` with ``--config`` (and the chain of configs it names as
``base``) and the overrides merged onto it, typed by `recipe_config` (`config.RecipeConfig`).

Each stage writes into ``OUT/<stage>``, resumes from its last checkpoint, and is skipped once
it has finished (``OUT/<stage>/final/DONE.json``; the VAE: ``OUT/vae/DONE.json``). So the
recipe can be killed at any moment and started again with the same command.

**Budget.** ``--budget-minutes M`` (or ``budget_minutes`` in the config) sets every stage's
step count so the whole recipe fits in M minutes: after the data exists, a short calibration
times one step of each kind at the real shapes on this machine (``OUT/plan.json`` keeps the
timings and the chosen steps, so a resumed recipe keeps its plan), and each stage gets its
``share`` of the time left. Without a budget the configs' ``steps`` are used.

**Export** (``OUT/model`` by default, ``--export DIR``): ``preset.json``, ``dit/`` (the
student, `weights.save_dit`), ``vae/`` (`TinyVAE.save_pretrained`), ``teacher/`` (for the
side-by-side evaluation), the loss curves, and ``card.md`` (data, steps, wall times; the
metrics table is filled by the evaluation).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from .. import configs
from ..devices import resolve_device
from ..errors import InputError
from ..fileio import atomic_write_text
from .checkpoint import final_done
from .config import RecipeConfig, merge, read_config_file, stage_folder

STAGES = ("synth", "vae", "decoder", "teacher", "grow", "ode", "dmd", "export")
DEFAULT_CONFIG = "tiny-recipe"  # the shipped talkingmachines/configs/tiny-recipe.json: the one source of defaults


def read_recipe_file(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """The recipe config file ``path`` (a path or a shipped config's name) with its ``"base"`` chain
    resolved: a file that names ``"base": "tiny-face"`` (a shipped config's name, or a path relative
    to the file) holds only what differs from that config, and is merged onto it. So a candidate
    recipe is its difference from the one it varies, not a copy that drifts when that one changes."""
    p = configs.resolve(path)
    if p.is_file() and p.resolve() in _seen:
        chain = " -> ".join(str(s) for s in (*_seen, p.resolve()))
        raise InputError(f"recipe configs name each other as base in a loop: {chain}")
    d = read_config_file(p)
    base = d.pop("base", None)
    if base is None:
        return d
    if not isinstance(base, str) or not base:
        raise InputError(f"{p}: 'base' must be a config's name or path, got {base!r}")
    # a relative path is read beside the file that names it; a bare name is a shipped config
    near = p.parent / base
    base_path = near if near.is_file() else configs.resolve(base)
    if not base_path.is_file():
        raise InputError(f"{p}: its base {base!r} is neither a file beside it nor a shipped config "
                         f"(have: {', '.join(configs.names())})")
    return merge(read_recipe_file(base_path, (*_seen, p.resolve())), d)


def load_recipe(path: str | Path | None = None, **overrides) -> dict:
    """The shipped recipe (`configs/tiny-recipe.json`), with the config file ``path`` (a path or a
    shipped config's name, and its ``base`` chain: `read_recipe_file`) merged onto it, then the
    non-None ``overrides``: the raw mapping (`recipe_config` types it)."""
    cfg = read_config_file(configs.shipped(DEFAULT_CONFIG))
    if path is not None:
        cfg = merge(cfg, read_recipe_file(path))
    return merge(cfg, {k: v for k, v in overrides.items() if v is not None})


def recipe_config(path: str | Path | None = None, **overrides) -> RecipeConfig:
    """`load_recipe`, typed: a `RecipeConfig` (unknown or missing keys are an InputError)."""
    return RecipeConfig.from_dict(load_recipe(path, **overrides))


# ============================================================================ calibration
def _time(fn, reps: int = 2) -> float:
    fn()  # warm up
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def calibrate(r: dict, out: Path) -> dict:
    """Seconds per step of each kind, at the recipe's real shapes, on this machine."""
    from ..model.dit import AudioDiT
    from ..model.vae import TinyVAE
    from ..pipeline import dit_input

    tc = r.stage_config("teacher", out)
    p = tc.make_preset()
    dev = torch.device(resolve_device(tc.device))
    d = p.dit
    B = tc.batch_size
    F = tc.clip_chunks * p.stream.chunk_frames
    h, w = p.latent_hw
    torch.manual_seed(0)
    m = AudioDiT(d).to(dev)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-5)
    x = torch.randn(B, d.out_channels, 1 + F, h, w, device=dev)
    ref = x[:, :, :1]
    xin = dit_input(x, ref)
    t = torch.rand(B, 1 + F, device=dev) * 1000
    text = torch.zeros(B, p.text_len, d.text_dim, device=dev)
    au = torch.randn(B, 1 + F, d.audio_window, d.audio_dim, device=dev)

    def bi_fb():
        opt.zero_grad()
        m(xin, t, text, audio=au).float().pow(2).mean().backward()
        opt.step()

    def ca_fb():
        opt.zero_grad()
        m.forward_causal(xin, t, text, audio=au, chunk_frames=p.stream.chunk_frames, x_clean=xin).float().pow(2).mean().backward()
        opt.step()

    def bi_f():
        with torch.no_grad():
            m(xin, t, text, audio=au)

    def ca_f():
        with torch.no_grad():
            m.forward_causal(xin, t, text, audio=au, chunk_frames=p.stream.chunk_frames, x_clean=xin)

    res = {"bi_fb": _time(bi_fb), "ca_fb": _time(ca_fb), "bi_f": _time(bi_f), "ca_f": _time(ca_f)}
    vr = r.vae
    vae = TinyVAE().to(dev)
    vopt = torch.optim.AdamW(vae.parameters(), lr=1e-5)
    vx = torch.rand(vr.batch_size, 3, vr.clip_frames, p.height, p.width, device=dev) * 2 - 1

    def vae_step():
        vopt.zero_grad()
        mean, logvar = vae.encode_moments(vx)
        vae.decode_raw(mean).sub(vx).abs().mean().backward()
        vopt.step()

    res["vae"] = _time(vae_step)
    try:  # the VAE trainer reads whole clips from the npz files: count that too
        from ..dataset import ClipDataset

        ds = ClipDataset(r.data, clip_frames=vr.clip_frames, seed=r.seed)
        res["vae"] += _time(lambda: [ds[i % len(ds)] for i in range(vr.batch_size)], reps=1)
    except Exception:
        pass
    oc, dc = r.stage_config("ode", out), r.stage_config("dmd", out)
    n_branches = 1 + (oc.guidance.audio != 1.0) + (oc.guidance.ref != 1.0)
    pair_b = oc.ode.batch / B
    res["pair_file"] = (oc.ode.steps + 1) * n_branches * res["bi_f"] * pair_b
    n = tc.clip_chunks
    steps2 = p.stream.student_steps
    roll = n * steps2 * res["ca_f"] * 0.75  # growing prefixes: on average ~3/4 of the whole clip
    real_branches = 1 + (dc.guidance.audio != 1.0) + (dc.guidance.ref != 1.0)
    fake = roll + res["bi_fb"]
    gen = roll + 2 * res["ca_fb"] + (real_branches + 1) * res["bi_f"]
    k = dc.dmd.fake_ratio
    res["dmd"] = (k * fake + gen) / (k + 1)
    res["teacher"] = res["bi_fb"] * 1.1
    res["ode"] = res["ca_fb"] * 1.1
    res["device"] = str(dev)
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}


def make_plan(r: RecipeConfig, out: Path, budget_s: float, spent_s: float) -> dict:
    missing = [s for s in ("vae", *RecipeConfig.STAGES) if getattr(r, s).share is None]
    if missing:
        raise InputError(f"a budget needs each stage's share of the time: none for {', '.join(missing)}")
    cal = calibrate(r, out)
    left = max(60.0, budget_s - spent_s - 60.0)  # keep a minute for exports and caches
    plan = {"calibration": cal, "budget_s": budget_s, "left_at_plan_s": left}

    def steps(section, cost, share):
        n = int(share * left / max(cost, 1e-6))
        return int(min(max(n, section.min_steps), section.max_steps))

    plan["vae_steps"] = steps(r.vae, cal["vae"], r.vae.share)
    plan["teacher_steps"] = steps(r.teacher, cal["teacher"], r.teacher.share)
    o, oc = r.ode, r.stage_config("ode", out)
    pair_time = o.share * o.pairs_share * left
    files = max(1, int(pair_time / max(cal["pair_file"], 1e-6)))
    files = min(files, max(1, oc.ode.pairs // oc.ode.batch))
    plan["ode_pairs"] = files * oc.ode.batch
    plan["ode_steps_train"] = steps(o, cal["ode"], o.share * (1 - o.pairs_share))
    k = r.stage_config("dmd", out).dmd.fake_ratio + 1
    plan["dmd_steps"] = max(k, steps(r.dmd, cal["dmd"], r.dmd.share) // k * k)
    return plan


# ============================================================================ stages
def _log(msg: str) -> None:
    print(f"[tiny-recipe] {msg}", flush=True)


def run_synth(r: RecipeConfig) -> None:
    from .synth import synth_dataset

    data = Path(r.data)
    s = r.synth
    idx = data / "index.json"
    version = int(s.version)
    if idx.is_file():
        have = json.loads(idx.read_text())
        if have.get("n", 0) >= s.n and have.get("data_version", 1) == version:
            return
    from ..config import get_preset

    size = r.preset_overrides.get("height") or get_preset(r.preset).height
    synth_dataset(s.n, data, seed=r.seed, size=size, seconds=tuple(s.seconds), workers=s.workers,
                  speech=s.speech, video=s.video, version=version)


def _train_clips(r: RecipeConfig, clip_frames: int, features: bool = False, dark_repeat: int = 1,
                 refs: bool = False):
    """The training clips (without the held-out split every stage uses) as the uint8
    [T, H, W, 3] videos the VAE trainer reads; with ``features`` or ``refs``, as dicts with
    ``"video"`` and, with ``features``, each synthetic clip's eyes-and-mouth mask
    (`synth.features_mask_from_face`; None for a clip without face parameters) as ``"features"``,
    with ``refs`` the DiT stages' reference frame (`ClipDataset`: a listening frame outside the
    crop) as ``"ref"``. With ``dark_repeat`` k > 1 each synthetic clip whose skin
    is in the "dark" band (`synth.face.skin_band`) is listed k times, as the DiT stages'
    ``dark_skin_repeat`` does."""
    from ..dataset import ClipDataset, held_out_split
    from .latents import clip_face, clip_skin
    from .synth import features_mask_from_face

    _, held = held_out_split(ClipDataset(r.data), r.held_out, r.seed)
    ds = ClipDataset(r.data, clip_frames=clip_frames, seed=r.seed)
    train = ds.subset([i for i, c in enumerate(ds.indices) if c not in set(held.indices)])
    order = list(range(len(train)))
    if dark_repeat > 1:
        dark = [i for i in order if clip_skin(train.root / train.clips[train.indices[i]]["npz"]) == "dark"]
        order += [i for i in dark for _ in range(dark_repeat - 1)]
    masks: dict[int, np.ndarray | None] = {}

    def mask(i: int, video: np.ndarray):
        if i not in masks:
            face = clip_face(train.root / train.clips[train.indices[i]]["npz"])
            h, w = video.shape[1:3]
            try:
                masks[i] = None if face is None else features_mask_from_face(face, h, w)
            except (KeyError, TypeError, ValueError):  # older face parameters, or boxes off a tiny frame
                masks[i] = None
        return masks[i]

    class Videos:
        def __len__(self):
            return len(order)

        def __getitem__(self, k):
            i = order[k]
            item = train[i]
            video = item["video"]
            if not (features or refs):
                return video
            return {"video": video, **({"features": mask(i, video)} if features else {}),
                    **({"ref": item["ref"]} if refs else {})}

    return Videos()


def run_vae(r: RecipeConfig, out: Path, steps: int) -> None:
    from ..model.vae import TINY_WIDTHS, TinyVAEConfig
    from .vae_train import train_tiny_vae

    vdir = out / "vae"
    if (vdir / "DONE.json").is_file():
        return
    v = r.vae
    if v.init_from:
        _take_vae(r, Path(v.init_from), vdir)
        return
    shape = {k: getattr(v, k) for k in ("spatial", "enc_widths", "dec_widths") if getattr(v, k) is not None}
    if shape.get("spatial") in TINY_WIDTHS:  # widths not given: the ones this spatial factor was tuned with
        enc, dec = TINY_WIDTHS[shape["spatial"]]
        shape = {"enc_widths": enc, "dec_widths": dec, **shape}
    try:
        vcfg = TinyVAEConfig(latent_channels=int(TinyVAEConfig.latent_channels if v.latent_channels is None
                                                 else v.latent_channels), **shape)
    except ValueError as e:
        raise InputError(f"recipe section 'vae': {e}") from None
    # writes OUT/vae/DONE.json (steps, wall_seconds, the last step's losses) when it has finished
    train_tiny_vae(_train_clips(r, v.clip_frames, v.feature_weight > 0, v.dark_skin_repeat), vdir, steps=steps,
                   batch_size=v.batch_size, lr=v.lr, seed=r.seed, device=r.device, ckpt_every=max(50, steps // 10),
                   temporal_weight=v.temporal_weight, feature_weight=v.feature_weight, config=vcfg)


def _take_vae(r: RecipeConfig, src: Path, vdir: Path) -> None:
    """``vae.init_from``: the trained VAE in ``src`` copied in as the VAE stage's result (DONE.json says
    where from), after checking that it has the geometry the recipe asks for."""
    from ..model.vae import TinyVAEConfig

    try:
        have = TinyVAEConfig.from_dict(json.loads((src / "config.json").read_text()))
    except (OSError, ValueError, TypeError):
        where = "" if src.is_absolute() else f", relative to {Path.cwd()}"
        raise InputError(f"vae.init_from: {src} is not a VAE folder (no readable config.json{where})") from None
    if not (src / "model.safetensors").is_file():
        raise InputError(f"vae.init_from: {src} has no model.safetensors")
    for key in ("latent_channels", "spatial"):
        want, got = getattr(r.vae, key), getattr(have, key)
        if want is not None and got != want:
            raise InputError(f"vae.init_from: {src} has {key} {got}, the recipe asks for {want}")
    tmp = vdir.parent / f".{vdir.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(src / name, tmp / name)
    (tmp / "DONE.json").write_text(json.dumps({"stage": "vae", "steps": 0, "wall_seconds": 0.0,
                                               "init_from": str(src)}, indent=1))
    shutil.rmtree(vdir, ignore_errors=True)  # a half-trained VAE stage left there is replaced
    tmp.replace(vdir)
    _log(f"vae: taken from {src} (not trained)")


def run_decoder(r: RecipeConfig, out: Path) -> None:
    """The decoder-only fine-tune on latents + noise, into ``OUT/decoder`` (skipped when steps is 0), then,
    with ``refine_steps`` > 0, that decoder fine-tuned again at ``refine_latent_noise`` into ``OUT/decoder_refine``."""
    from .vae_train import train_tiny_vae

    d = r.decoder
    clips = None
    phases = [(out / "decoder", out / "vae", d.steps, d.latent_noise, d.dec_widths, d.dec_res_blocks)]
    if d.refine_steps > 0:  # the same geometry as the first phase's: it starts from that decoder
        phases.append((out / "decoder_refine", out / "decoder", d.refine_steps, d.refine_latent_noise, None, None))
    for ddir, init, steps, noise, widths, res_blocks in phases:
        if steps <= 0 or (ddir / "DONE.json").is_file():
            continue
        if clips is None:
            clips = _train_clips(r, r.vae.clip_frames, d.feature_weight > 0, d.dark_skin_repeat, refs=d.ref)
        train_tiny_vae(clips, ddir, steps=steps, batch_size=d.batch_size, lr=d.lr, seed=r.seed, device=r.device,
                       ckpt_every=max(50, steps // 10), init_from=init, freeze_encoder=True, latent_noise=noise,
                       temporal_weight=r.vae.temporal_weight, feature_weight=d.feature_weight,
                       adv_weight=d.adv_weight, adv_start=d.adv_start, decoder_ref=d.ref, latent_blur=d.latent_blur,
                       dec_widths=widths, dec_res_blocks=res_blocks)


def exported_vae(out: Path) -> Path:
    """The VAE the model ships: the last decoder fine-tune that finished (refined, then the first), else the
    VAE stage's."""
    for stage in ("decoder_refine", "decoder"):
        if (out / stage / "DONE.json").is_file():
            return out / stage
    return out / "vae"


def export_model(r: RecipeConfig, out: Path, dest: Path, timings: dict) -> Path:
    """The shipped folder: preset.json, dit/ (student), teacher/, vae/, loss curves, card.md."""
    from ..config import Preset
    from ..model.vae import TinyVAE

    dest.mkdir(parents=True, exist_ok=True)
    preset = Preset.load(out / "dmd" / "final" / "preset.json")
    tmp = dest.parent / f".{dest.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    preset.save(tmp / "preset.json")
    shutil.copytree(out / "dmd" / "final" / "dit", tmp / "dit")
    if r.export_teacher:
        shutil.copytree(r.teacher_dir(out) / "final" / "dit", tmp / "teacher")
    TinyVAE.from_pretrained(exported_vae(out)).save_pretrained(tmp / "vae")
    for stage in ("vae", "decoder", "decoder_refine", "teacher", stage_folder("grow"), "ode", "dmd"):
        if (out / stage / "loss.png").is_file():
            shutil.copy(out / stage / "loss.png", tmp / f"loss_{stage}.png")
    write_face_template(r, tmp)
    (tmp / "card.md").write_text(model_card(r, out, preset, timings, tmp))
    for f in tmp.iterdir():  # replace the destination's entries one by one
        target = dest / f.name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        f.replace(target)
    shutil.rmtree(tmp, ignore_errors=True)
    return dest


def write_face_template(r: RecipeConfig, folder: Path) -> None:
    """``face_template.json``: where the training faces' landmarks sit (`face_align`, for
    ``--align-face``), measured when the face judge (the eval extra) is installed."""
    from .. import face_align
    from ..dataset import ClipDataset, held_out_split

    try:
        judge = face_align.load_judge()
    except InputError:
        _log(f"export: no {face_align.TEMPLATE_FILE} (the face judge is not installed): "
             "--align-face will refuse this model")
        return
    train, _ = held_out_split(ClipDataset(r.data), r.held_out, r.seed)
    t = face_align.template_from_dataset(train, judge)
    if t is None:
        _log(f"export: the face judge found no face in the training clips: no {face_align.TEMPLATE_FILE}")
    else:
        face_align.save_template({**t, "data": str(r.data)}, folder)
        _log(f"export: {face_align.TEMPLATE_FILE} from {t['faces']} of {t['frames']} training faces")


def _done(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def model_card(r: RecipeConfig, out: Path, preset, timings: dict, folder: Path | None = None) -> str:
    data = _done(Path(r.data) / "index.json")
    n_clips = data.get("n", len(data.get("clips", [])))
    secs = sum(c.get("seconds", 0) for c in data.get("clips", []))
    st = {s: _done(out / s / "final" / "DONE.json") for s in ("teacher", "ode", "dmd")}
    grown = _done(out / stage_folder("grow") / "final" / "DONE.json")
    vae = _done(out / "vae" / "DONE.json")
    mb = sum(f.stat().st_size for f in (folder or out / "model").rglob("*.safetensors")) / 1e6
    from ..model.dit import count_parameters

    last = vae.get("last_loss", (vae.get("last") or {}).get("loss", float("nan")))  # last_loss: older runs' DONE.json
    # a section's loss knobs, as the card's row says them
    def knobs(sec) -> str:
        w, k = sec.feature_weight, sec.dark_skin_repeat
        return ((f"; eyes and mouth weighted {1 + w:g}x" if w > 0 else "")
                + (f"; dark-skinned clips {k}x as often" if k > 1 else "") + reference(sec) + adversary(sec))

    def reference(sec) -> str:
        blur = getattr(sec, "latent_blur", 0.0)
        return (("; beside the portrait's latent (decoder_ref)" if getattr(sec, "ref", False) else "")
                + (f"; latents smudged up to {blur:g} toward their 3x3 average" if blur > 0 else ""))

    def adversary(sec) -> str:
        adv = getattr(sec, "adv_weight", 0.0)
        return f"; against a patch discriminator, adversarial weight {adv:g}" if adv > 0 else ""

    if vae.get("init_from"):  # vae.init_from: a trained VAE taken as it is
        rows = [f"| VAE (TinyVAE), taken from `{vae['init_from']}`, not trained here | 0 | 0.0 | - |"]
    else:
        rows = [f"| VAE (TinyVAE{knobs(r.vae)}) | {vae.get('steps', '?')} | "
                f"{vae.get('wall_seconds', 0) / 60:.1f} | last loss {last:.4f} |"]
    # one row per finished stage: its steps, its wall minutes over every sitting, its last loss
    row = lambda label, d: (f"| {label} | {d.get('steps', '?')} | {d.get('wall_seconds', 0) / 60:.1f} | "  # noqa: E731
                            f"loss {(d.get('last') or {}).get('loss', float('nan')):.4f} |")
    dec = _done(out / "decoder" / "DONE.json")
    if dec:
        # a fresh decoder when its saved geometry differs from the VAE stage's: say its size
        c, v = (json.loads((out / s / "config.json").read_text()) for s in ("decoder", "vae"))
        geometry = lambda d: (d["dec_widths"], d["dec_res_blocks"])  # noqa: E731
        what = ("fine-tuned" if geometry(c) == geometry(v)
                else f"a new one (widths {c['dec_widths']}, {c['dec_res_blocks']} res blocks) trained")
        rows.append(row(f"VAE decoder, {what} on latents + noise (std up to {r.decoder.latent_noise:g}"
                        f"{knobs(r.decoder)})", dec))
    ref = _done(out / "decoder_refine" / "DONE.json")
    if ref:
        rows.append(row(f"VAE decoder, that one fine-tuned again at lower noise (std up to "
                        f"{r.decoder.refine_latent_noise:g}{reference(r.decoder)}{adversary(r.decoder)})", ref))
    start = r.stage_config("teacher", out).init_from
    rows.append(row("teacher (bidirectional, flow matching" + (f"), fine-tuned from `{start}`" if start else ")"),
                    st["teacher"]))
    if grown:
        what = [f"{preset.dit.num_layers} blocks (the new ones start as the identity)"] if r.grow.layers else []
        what += [f"width {preset.dit.dim} (twice the features, the same function)"] if r.grow.heads else []
        rows.append(row(f"teacher grown to {' and '.join(what)}, trained on", grown))
    rows.append(row("student init (ODE pairs)", st["ode"]))
    rows.append(row("student (asymmetric DMD)", st["dmd"]))
    # a stage's DONE.json counts its wall time over every sitting; timings.json only what each
    # call of the recipe saw finish, so it undercounts a stage that was interrupted and resumed.
    # The decoder stage is its two fine-tunes.
    done_wall = {"vae": [vae], "decoder": [dec, ref], "grow": [grown], **{k: [d] for k, d in st.items()}}
    walls = {k: sum((d or {}).get("wall_seconds") or 0 for d in done_wall.get(k, [])) or v for k, v in timings.items()}
    total = sum(walls.values()) / 60
    cfg = f" --config {r.config_path}" if r.config_path else ""
    reproduce = (f"This model's settings: `talkingmachines train tiny-recipe{cfg} --out {out} --data {r.data}`"
                 if not r.budget_minutes else
                 f"`talkingmachines train tiny-recipe{cfg} --out {out} --budget-minutes {r.budget_minutes:g}`")
    # a fine-tune (teacher.init_from) says where it started: its minutes are on top of that model's
    origin = "trained from scratch" if not start else (
        f"fine-tuned from a trained model (teacher `{start}`"
        + (f", VAE `{vae['init_from']}`" if vae.get("init_from") else "") + ")")
    trained = (f"Trained for {total:.0f} minutes" if not start
               else f"Fine-tuned for {total:.0f} minutes on top of the model it started from")
    from .synth import STEADY_GAZE, moves_head

    version = int(data.get("data_version", r.synth.version))
    motion = ("head motion" if moves_head(version) else "a still head") + (
        ", a steady gaze" if version in STEADY_GAZE else ", gaze shifts")
    return f"""# talkingmachines `tiny` model card

A {count_parameters(preset.dit) / 1e6:.2f} M-parameter audio-driven DiT (Wan2.1 layout, {preset.dit.num_layers} blocks,
width {preset.dit.dim}) with a TinyVAE ({preset.width}x{preset.height}, {preset.vae_spatial}x spatial, 4x temporal) and a log-mel audio
front end, {origin} with `talkingmachines train tiny-recipe` (TalkingMachines recipe: bidirectional
teacher -> ODE-pair student initialisation -> asymmetric DMD, sparse-causal student, {preset.stream.student_steps}
steps per chunk of {preset.stream.chunk_frames} latent frames).

## Data
{n_clips} procedural talking-face clips ({secs / 60:.1f} min at 25 fps, 16 kHz) from `talkingmachines data synth
--data-version {version}` (seed {r.seed}): varied faces and drawing styles, mouths driven by the speech, blinks,
{motion}, listening segments in silence. {int(r.held_out * 100)} % of the clips are held out of every stage for evaluation
(`OUT/<stage>/held_out.json`).

## Training (this run)
| stage | steps | wall (min) | final |
|---|---|---|---|
{chr(10).join(rows)}

Whole recipe: {total:.1f} min wall on {r.device_name or 'this machine'} ({'budget ' + format(r.budget_minutes, 'g') + ' min' if r.budget_minutes else 'no budget'}).
Per-stage wall seconds: {json.dumps({k: round(v) for k, v in walls.items()})}.
Weights in this folder (student DiT, teacher DiT, VAE): {mb:.1f} MB (safetensors, fp32).

## Metrics (held-out synthetic clips; filled by `talkingmachines eval-model --card`)
<!-- metrics:begin -->
| metric | teacher | student | ground truth |
|---|---|---|---|
| lip-sync best lag (frames) | TBD | TBD | TBD |
| mouth-energy correlation | TBD | TBD | TBD |
| mouth motion speech / silence | TBD | TBD | TBD |
| 2-min stream drift, last 10 s vs first (PSNR dB) | TBD | TBD | - |
<!-- metrics:end -->

## Limits
{trained}, only on procedural cartoon-to-shaded faces at {preset.width}x{preset.height}:
frames are soft and blurry, a few break into blotches, and the mouth opens less than in the data. Judge the
face with the landmark columns above (a packaged face-landmark model), not the pixel metrics alone, and look at a
frame grid (`talkingmachines eval VIDEO --grid grid.png`). A real photo is outside the training distribution:
its face stays recognisable but soft, and framed as it comes its mouth barely follows the speech, since the model
draws a mouth where its training faces had one. `--align-face` (generate, demo, serve) warps the photo so its
face landmarks land on the training faces' mean landmarks (`face_template.json`, measured at export), and then
the photo's own mouth opens in speech. The tiny model proves the pipeline; the real presets are for real faces.

## Reproduce
{reproduce}
(resumable: run it again after an interruption; the data set is synthesised by the recipe's first stage). To fit
any wall-time budget instead: `talkingmachines train tiny-recipe --out runs/tiny --budget-minutes 110`.
"""


def run_recipe(out: str | Path, config: str | Path | None = None, budget_minutes: float | None = None,
               data: str | None = None, export: str | Path | None = None, stages: list[str] | None = None,
               device: str | None = None) -> Path | None:
    """Runs ``stages`` (default all) of the recipe into the run folder ``out``, each resuming from what it
    finds there; returns the exported model folder, or None when "export" was not among the stages."""
    out = Path(out)
    r = recipe_config(config, budget_minutes=budget_minutes, device=device)  # a bad config makes no run folder
    out.mkdir(parents=True, exist_ok=True)
    r.config_path = str(config) if config else None
    r.data = str(Path(data) if data else (Path(r.data) if r.data else out / "data"))
    stages = list(stages or STAGES)
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise InputError(f"unknown recipe stages: {bad}; choose from {', '.join(STAGES)}")
    tfile = out / "timings.json"
    timings: dict = _done(tfile)

    def timed(name, fn):
        t0 = time.time()
        fn()
        timings[name] = timings.get(name, 0.0) + time.time() - t0
        atomic_write_text(tfile, json.dumps(timings, indent=1))
        _log(f"{name}: {timings[name]:.0f} s")

    if "synth" in stages:
        timed("synth", lambda: run_synth(r))
    pfile = out / "plan.json"
    plan = _done(pfile)
    if r.budget_minutes and not plan:
        _log("calibrating step times for the budget ...")
        t0 = time.time()
        plan = make_plan(r, out, 60.0 * float(r.budget_minutes), sum(timings.values()))
        timings["calibration"] = time.time() - t0
        atomic_write_text(pfile, json.dumps(plan, indent=1))
        _log(f"plan: {json.dumps({k: v for k, v in plan.items() if k != 'calibration'})}")
    r.device_name = plan.get("calibration", {}).get("device") or resolve_device(r.device)
    if plan:
        r.vae.steps = plan["vae_steps"]
        r.teacher.set(steps=plan["teacher_steps"])
        r.ode.set(steps=plan["ode_steps_train"], ode_pairs=plan["ode_pairs"])
        r.dmd.set(steps=plan["dmd_steps"])

    from .student import train_dmd, train_ode
    from .teacher import train_teacher

    if any(s in stages for s in ("teacher", "grow", "ode", "dmd")):
        teacher_preset = r.stage_config("teacher", out).make_preset()
        why = teacher_preset.dit.token_bottleneck()
        if why:
            _log(f"warning: {why}")
        first = teacher_preset.dit
        if r.grow.layers and r.grow.layers <= first.num_layers:
            raise InputError(f"grow.layers ({r.grow.layers}) must be more than the teacher's {first.num_layers} blocks")
        if r.grow.heads and r.grow.heads != 2 * first.num_attention_heads:
            raise InputError(f"grow.heads ({r.grow.heads}) must be twice the teacher's {first.num_attention_heads} "
                             "(widening doubles every feature)")

    if "vae" in stages:
        timed("vae", lambda: run_vae(r, out, int(r.vae.steps)))
    if "decoder" in stages and r.decoder.steps > 0:
        timed("decoder", lambda: run_decoder(r, out))
    dit_stages = (("teacher", train_teacher), ("grow", train_teacher), ("ode", train_ode), ("dmd", train_dmd))
    for name, fn in dit_stages:
        if name == "grow" and not r.grow.enabled:
            continue
        if name in stages and not final_done(out / stage_folder(name)):
            timed(name, lambda fn=fn, name=name: fn(r.stage_config(name, out)))
    if "export" not in stages:
        return None
    dest = Path(export) if export else out / "model"
    timed("export", lambda: export_model(r, out, dest, {k: v for k, v in timings.items()}))
    return dest
