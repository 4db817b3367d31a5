"""Training inputs: a latent cache of the clips, deterministic crops, and the DiT input layout.

The DiT never sees pixels during training: each clip of a `ClipDataset` is encoded once
(`build_latent_cache`) into ``clip_XXXXX.safetensors`` holding

* ``latents``  [C, 1 + k, h, w]  the whole clip (``1 + 4k`` frames), `VideoVAE.encode_video`;
* ``refs``     [R, C, h, w]      `encode_image` of R reference frames of the same identity
  (listening frames, mouth closed, when the clip has them): the sinks;
* ``features`` [1 + 4k, F]       the audio front end's per-video-frame features.

Synthetic clips know where their mouth is: the index holds each clip's mouth box in latent
pixels (`mouth_box`, from the renderer's face parameters, widened for head motion) and every
crop comes with a 0/1 mask of it (``Batch.mouth``), which `TrainConfig.flow.mouth_weight` uses to
give the mouth a larger share of the teacher's loss. Real clips have no box (all zeros).

A training crop is ``1 + 12 n`` video frames starting at frame ``4 m`` (so its latents are
exactly the whole clip's latents ``m .. m + 3n``: TinyVAE encodes each group of 4 frames
independently; for the causal Wan-VAE it is the usual approximation). Exactly as the
streaming generator sees it:

* latent frame 0 (the sink) is replaced by a reference latent (``encode_image(ref)``);
* generated frame ``g`` (0-based after the sink) is clip frame ``4m + g + 1``; its audio
  features are the front end's features of that frame; the windows are
  ``audio_windows(features[4m+1 : 4m+1+12n], context)`` (zero outside the crop, as
  ``audio_windows(frontend.features(crop_audio[640:]))``; the log-mel STFT edges use the
  real neighbouring samples here) with a zero window prepended for the sink;
* the DiT input is ``[latent | 4 mask channels (1 on known frames) | reference latent
  broadcast over frames]`` (`pipeline.dit_input`), the timestep of the sink is 0.

Crops, references and noise depend only on ``(seed, clip, epoch)`` and ``(seed, step,
sample)`` (see `rng.sample_generator`), so a resumed or distributed run sees the same data
as a single uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import VAE_TEMPORAL
from ..errors import InputError
from ..fileio import atomic_save_safetensors, atomic_write_text
from ..model import audio as audio_fe

CACHE_VERSION = 2  # 2: index entries carry the mouth box (the clip files are unchanged)
MOUTH_MARGIN = 0.06  # of the frame side, around the mouth's largest opening: head motion
N_REFS = 4


@dataclass
class Batch:
    """A batch of crops, ready for the DiT (all float32 on the training device).

    ``z`` [B, C, 1+3n, h, w] with ``z[:, :, 0] = ref`` (the sink); ``ref`` [B, C, 1, h, w];
    ``audio`` [B, 1+3n, W, F] (zero window on the sink); ``speaking`` [B, 12 n] bool per
    generated frame; ``clips``/``starts``: where the crops come from; ``mouth`` [B, h, w]
    1 on the clip's mouth box (zeros when unknown), or None; ``dark`` [B] bool, whether each crop's
    synthetic face has dark skin, when the data set was asked for it (else None)."""

    z: torch.Tensor
    ref: torch.Tensor
    audio: torch.Tensor
    speaking: torch.Tensor
    clips: list
    starts: list
    js: list = field(default_factory=list)  # indices of these samples in the global batch
    mouth: torch.Tensor | None = None
    dark: torch.Tensor | None = None

    def to(self, device) -> "Batch":
        return Batch(self.z.to(device), self.ref.to(device), self.audio.to(device), self.speaking.to(device),
                     self.clips, self.starts, self.js, None if self.mouth is None else self.mouth.to(device),
                     None if self.dark is None else self.dark.to(device))

    def __len__(self) -> int:
        return self.z.shape[0]


# ----------------------------------------------------------------------------- cache
def cache_dir(data: str | Path, vae_id: str) -> Path:
    """Where a data set's latents under the VAE of id `vae_id` (`_file_id`) are cached: one folder
    per VAE, beside the clips, so every VAE trained on the same data keeps its own."""
    return Path(data) / f"latents-{vae_id}"


def _file_id(path: Path) -> str:
    """A cheap identity of a weights folder/file: names, sizes and the first MiB of each."""
    h = hashlib.sha1()
    path = Path(path)
    files = sorted(p for p in (path.rglob("*") if path.is_dir() else [path]) if p.is_file()
                   and p.suffix in (".safetensors", ".json", ".bin", ".pth"))
    for p in files:
        h.update(p.name.encode())
        h.update(str(p.stat().st_size).encode())
        with open(p, "rb") as f:
            h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def mouth_box(face: dict | None, height: int, width: int, spatial: int) -> list[int] | None:
    """A synthetic face's mouth box in latent pixels ``[y0, y1, x0, x1]`` (end exclusive): the
    pixel box of any opening (`synth.mouth_roi_from_face`) widened by `MOUTH_MARGIN`
    for head motion. None without face parameters (real clips)."""
    if not face:
        return None
    from .synth import mouth_roi_from_face

    try:
        y0, y1, x0, x1 = mouth_roi_from_face(face, height, width, margin=MOUTH_MARGIN)
    except (KeyError, TypeError, ValueError):
        return None
    h, w = height // spatial, width // spatial
    return [max(0, y0 // spatial), min(h, -(-y1 // spatial)), max(0, x0 // spatial), min(w, -(-x1 // spatial))]


def clip_face(npz: Path) -> dict | None:
    """A synthetic clip's face parameters (its metadata's ``face``), None for other clips."""
    with np.load(npz) as z:  # an npz member is read only when asked for: just the metadata
        if "meta" not in z.files:
            return None
        return json.loads(str(z["meta"])).get("face")


def clip_skin(npz: Path) -> str | None:
    """A synthetic clip's skin band ("dark", "medium", "light"; `synth.face.skin_band`), None for other clips."""
    from .synth.face import skin_band

    return skin_band(clip_face(npz) or {})


def _clip_mouth_box(npz: Path, size: int, spatial: int) -> list[int] | None:
    return mouth_box(clip_face(npz), size, size, spatial)  # synthetic frames are square


def _pick_refs(speaking: np.ndarray, n: int, rng: np.random.Generator) -> list[int]:
    cand = np.nonzero(~speaking.astype(bool))[0]
    if len(cand) == 0:
        cand = np.arange(len(speaking))
    k = min(n, len(cand))
    return sorted(int(i) for i in rng.choice(cand, size=k, replace=False))


def cache_is_current(cache: str | Path, vae_id: str, n: int) -> bool:
    """Whether ``cache`` holds this VAE's latents of all ``n`` clips, in this cache version (clips
    added to the data folder later, or another VAE, make it stale: `build_latent_cache` then
    encodes only what is missing)."""
    f = Path(cache) / "index.json"
    if not f.is_file():
        return False
    idx = json.loads(f.read_text())
    return idx.get("vae_id") == vae_id and idx.get("version") == CACHE_VERSION and idx.get("n") == n


def ensure_latent_cache(data_dir: str | Path, vae_dir: str | Path, preset, min_frames: int,
                        cache: str | Path | None = None, device: torch.device | str = "cpu", progress: bool = True,
                        rank: int = 0, world: int = 1, barrier=None) -> Path:
    """The latent cache of ``vae_dir``'s VAE for every clip of ``data_dir`` (``cache``, default its
    folder under ``data_dir``), encoded first where it is missing or stale (`cache_is_current`):
    the VAE and the audio frontend are loaded only then."""
    from ..dataset import ClipDataset
    from ..model import audio as audio_fe
    from ..model.vae import load_vae

    vae_id = _file_id(Path(vae_dir))
    cache = Path(cache) if cache else cache_dir(data_dir, vae_id)
    if not cache_is_current(cache, vae_id, len(ClipDataset(data_dir))):
        vae = load_vae(preset.vae, vae_dir, device=device)
        build_latent_cache(data_dir, vae, audio_fe.build_frontend(preset), cache, vae_id, min_frames=min_frames,
                           progress=progress, rank=rank, world=world, barrier=barrier)
    return cache


@torch.no_grad()
def build_latent_cache(data_dir: str | Path, vae, frontend, cache_dir: str | Path, vae_id: str = "",
                       min_frames: int = 13, progress: bool = True, rank: int = 0, world: int = 1,
                       barrier=None) -> Path:
    """Encode every clip of ``data_dir`` (a `ClipDataset` folder) into ``cache_dir``.

    Resumable (a clip file written is kept) and rebuilt when ``vae_id`` changes. Under
    torch.distributed each rank encodes its share; rank 0 writes the index after ``barrier``."""
    from ..dataset import ClipDataset

    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    ds = ClipDataset(data_dir)
    idx_file = cache / "index.json"
    if cache_is_current(cache, vae_id, len(ds)):
        return idx_file
    from tqdm.auto import tqdm

    entries = []
    todo = list(range(len(ds)))
    mine = todo[rank::world]
    bar = tqdm(mine, desc="latent cache", unit="clip", disable=not progress or rank != 0)
    for i in bar:
        c = ds.clips[ds.indices[i]]
        f = cache / f"{Path(c['npz']).stem}.safetensors"
        if f.is_file():
            try:
                from safetensors import safe_open

                with safe_open(str(f), "pt") as sf:
                    if sf.metadata().get("vae_id") == vae_id:
                        continue
            except Exception:
                pass
        z = ds.load(i)
        frames, audio, speaking = z["frames"], z["audio"], z["speaking"]
        T = 1 + VAE_TEMPORAL * ((frames.shape[0] - 1) // VAE_TEMPORAL)
        if T < min_frames:
            continue
        lat = vae.encode_video(frames[:T])[0].float().cpu()  # [C, 1+k, h, w]
        rng = np.random.default_rng([ds.seed, int(ds.indices[i]), 7])
        ref_idx = _pick_refs(speaking[:T], N_REFS, rng)
        refs = torch.cat([vae.encode_image(frames[r])[0, :, 0][None].float().cpu() for r in ref_idx])
        feats = frontend.features(audio[: T * 640]).float().cpu()
        if feats.shape[0] != T:
            raise RuntimeError(f"{c['npz']}: audio front end gave {feats.shape[0]} frames for {T} video frames")
        atomic_save_safetensors({"latents": lat, "refs": refs, "features": feats,
                                 "speaking": torch.from_numpy(speaking[:T].astype(np.uint8))}, f,
                                {"vae_id": vae_id, "ref_frames": json.dumps(ref_idx)})
    if barrier is not None:
        barrier()
    if rank == 0:
        from safetensors import safe_open

        for i in range(len(ds)):
            c = ds.clips[ds.indices[i]]
            f = cache / f"{Path(c['npz']).stem}.safetensors"
            if not f.is_file():
                continue
            with safe_open(str(f), "pt") as sf:
                shape = sf.get_slice("latents").get_shape()
            spatial = _spatial_factor(ds, shape)
            box = _clip_mouth_box(ds.root / c["npz"], ds.size, spatial) if spatial else None
            entries.append({"clip": int(ds.indices[i]), "file": f.name, "latent_frames": shape[1],
                            **({"mouth_box": box} if box else {})})
        atomic_write_text(idx_file, json.dumps({"version": CACHE_VERSION, "vae_id": vae_id, "n": len(ds),
                                                "data": str(Path(data_dir).resolve()), "clips": entries}, indent=1))
    if barrier is not None:
        barrier()
    return idx_file


def _spatial_factor(ds, latent_shape) -> int | None:
    """Pixels per latent pixel, from the data set's frame size and the latents' width."""
    size = ds.index.get("size")
    if not size or not latent_shape[-1]:
        return None
    return int(size) // int(latent_shape[-1])


class LatentClips:
    """Crops of ``1 + 12 n`` frames (``n = chunks``) from a latent cache; deterministic.

    ``get(i, epoch)`` -> dict of tensors for one crop (see `Batch`); ``collate(items)`` ->
    `Batch`. ``clip_ids`` restricts to some source clips (held-out split); ``repeat`` {clip:
    k} lists a clip k times per epoch (each copy its own crops); with ``dark`` (the ids of the clips
    whose face has dark skin) each crop says whether it is one of them."""

    def __init__(self, cache_dir: str | Path, chunks: int, chunk_frames: int = 3, context: int = 2,
                 seed: int = 0, clip_ids: list[int] | None = None, repeat: dict[int, int] | None = None,
                 dark: set[int] | None = None):
        self.root = Path(cache_dir)
        idx = json.loads((self.root / "index.json").read_text())
        need = 1 + chunks * chunk_frames
        ents = [e for e in idx["clips"] if e["latent_frames"] >= need]
        if clip_ids is not None:
            keep = set(int(c) for c in clip_ids)
            ents = [e for e in ents if e["clip"] in keep]
        if not ents:
            raise InputError(f"{self.root}: no clip has the {need} latent frames a crop of {chunks} chunks needs")
        reps = [max(1, int((repeat or {}).get(e["clip"], 1))) for e in ents]
        self.entries = [e for e, n in zip(ents, reps) for _ in range(n)]
        self.copy = [k for n in reps for k in range(n)]  # which copy of its clip: its own crops
        self.chunks, self.chunk_frames, self.context, self.seed = chunks, chunk_frames, context, int(seed)
        self.dark = None if dark is None else {int(c) for c in dark}
        self._mem: dict[str, dict] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def _load(self, i: int) -> dict:
        f = self.entries[i]["file"]
        if f not in self._mem:
            from safetensors.torch import load_file

            self._mem[f] = load_file(str(self.root / f))
        return self._mem[f]

    def get(self, i: int, epoch: int = 0) -> dict:
        e = self.entries[i]
        d = self._load(i)
        n_lat = self.chunks * self.chunk_frames
        key = [self.seed, int(e["clip"]), int(epoch), 11] + ([self.copy[i]] if self.copy[i] else [])
        rng = np.random.default_rng(key)
        m = int(rng.integers(0, e["latent_frames"] - n_lat))  # crop = latents m .. m + n_lat
        r = int(rng.integers(d["refs"].shape[0]))
        ref = d["refs"][r][:, None]  # [C, 1, h, w]
        z = torch.cat([ref, d["latents"][:, m + 1: m + 1 + n_lat]], dim=1)
        f0 = VAE_TEMPORAL * m + 1
        nf = VAE_TEMPORAL * n_lat
        feats = d["features"][f0: f0 + nf]
        win = audio_fe.audio_windows(feats, self.context, n_latent=n_lat)  # [n_lat, W, F]
        audio = torch.cat([torch.zeros_like(win[:1]), win])
        spk = d["speaking"][f0: f0 + nf].bool()
        mouth = torch.zeros(z.shape[-2:])
        if e.get("mouth_box"):
            y0, y1, x0, x1 = e["mouth_box"]
            mouth[y0:y1, x0:x1] = 1.0
        item = {"z": z, "ref": ref, "audio": audio, "speaking": spk, "clip": int(e["clip"]), "start": 4 * m,
                "mouth": mouth}
        if self.dark is not None:
            item["dark"] = torch.tensor(int(e["clip"]) in self.dark)
        return item

    @staticmethod
    def collate(items: list[dict]) -> Batch:
        return Batch(torch.stack([it["z"] for it in items]), torch.stack([it["ref"] for it in items]),
                     torch.stack([it["audio"] for it in items]), torch.stack([it["speaking"] for it in items]),
                     [it["clip"] for it in items], [it["start"] for it in items],
                     mouth=torch.stack([it["mouth"] for it in items]) if all("mouth" in it for it in items) else None,
                     dark=torch.stack([it["dark"] for it in items]) if all("dark" in it for it in items) else None)
