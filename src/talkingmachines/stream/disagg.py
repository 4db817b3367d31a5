"""Disaggregated streaming: the DiT (score network) and the VAE decoder as separate stages.

The sequential engine (`StreamingGenerator.next_chunk`) runs, per chunk, 2 DiT steps + the
clean KV write and then the streaming VAE decode, so a chunk costs DiT + VAE. Here the two
stages run side by side and a chunk costs max(DiT, VAE) once the pipe is full (the paper's
score-network / VAE disaggregation):

- `PipelinedStream` (one process): a DiT thread produces each chunk's clean latents into a
  bounded `queue.Queue(maxsize=2)` (backpressure: the DiT runs at most 2 chunks ahead, memory
  is bounded), a decode thread turns them into frames. On CUDA the decoder can live on
  another GPU (`decode_device="cuda:1"`: peer copy, or through pinned host memory when the
  GPUs cannot reach each other) or on a second CUDA stream of the same GPU; the latent copy
  runs on its own stream, ordered by events, `non_blocking=True`.
- `run_two_process` / `disagg_worker` (two processes over torch.distributed: gloo on CPU,
  NCCL on GPUs; spawned by `run_two_process`, or by torchrun for `talkingmachines bench-disagg`,
  see `torchrun_main`): rank 0 runs the DiT and
  `isend`s each chunk's latents (at most `depth` sends in flight), rank 1 has posted the
  `irecv` of chunk i+1 before it decodes chunk i. Each process sets its own thread count.

Both produce exactly the frames of the sequential path (same seed): the DiT stage *is*
`StreamingGenerator.next_latents`, the first half of `next_chunk`, and the decode stage is the
same streaming decoder, primed with the same portrait latent. No generator code is duplicated.

Barge-in: the DiT stage runs up to `depth` chunks ahead of what has been shown, so a
`clear_audio()` takes effect `depth` chunks later than in the sequential engine
(0.48 s per chunk); use `depth=1` where interruption latency matters more than throughput.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
import queue
import threading
import time
from typing import Callable, Iterator

import numpy as np
import torch

from ..devices import indexed_device
from .types import Chunk, LatentChunk

log = logging.getLogger(__name__)

_STOP = object()


# ----------------------------------------------------------------------------- the DiT stage
class LatentStage:
    """The DiT half of a `StreamingGenerator` (`next_latents`) as a pipeline stage: adds the
    stage's wall time and, on CUDA, an event recorded on the current (DiT) stream after the
    chunk's kernels, so the consumer orders its copy/decode without a host synchronisation.
    The stream's own decoder (primed with the portrait latent) is the decode stage's to use."""

    def __init__(self, stream):
        self.stream = stream

    def next_latents(self, wait: bool = False) -> LatentChunk | None:
        t0 = time.perf_counter()
        lc = self.stream.next_latents(wait=wait)
        if lc is None:
            return None
        if lc.latents.is_cuda:
            lc.event = torch.cuda.Event()
            lc.event.record(torch.cuda.current_stream(lc.latents.device))
        lc.timings["dit_stage_ms"] = 1e3 * (time.perf_counter() - t0)
        return lc


def sequential_chunks(stream, n: int) -> list[Chunk]:
    """The reference: the non-disaggregated path, `n` chunks."""
    return [stream.next_chunk() for _ in range(n)]


# ----------------------------------------------------------------------------- latent transfer
class LatentTransfer:
    """Moves a chunk's latents from the DiT device to the decode device, off the compute streams.

    - same device (CPU, or one GPU with the decoder on a second stream): no copy; on CUDA the
      decode stream waits on the DiT's event (see `PipelinedStream._decode`).
    - GPU -> GPU: a peer copy issued on copy streams of both devices (so it queues behind
      neither the DiT's next kernels nor the decode), after the DiT's event, `non_blocking=True`;
      when the GPUs cannot access each other, through pinned host memory (D2H on the source's
      copy stream, H2D on the target's, ordered by an event).
    - GPU <-> CPU: through pinned host memory, `non_blocking=True`.
    Returns the tensor on the decode device and an event the decode stream must wait on (None
    when the tensor is ready for any stream / the host)."""

    def __init__(self, src, dst):
        self.src, self.dst = indexed_device(src), indexed_device(dst)
        cuda_src, cuda_dst = self.src.type == "cuda", self.dst.type == "cuda"
        self.same = self.src == self.dst
        self.src_stream = torch.cuda.Stream(self.src) if cuda_src and not self.same else None
        self.dst_stream = torch.cuda.Stream(self.dst) if cuda_dst and not self.same else None
        self.peer = (cuda_src and cuda_dst and not self.same
                     and torch.cuda.can_device_access_peer(self.dst.index or 0, self.src.index or 0))

    def __call__(self, x: torch.Tensor, event=None):
        if x.device == self.dst:
            return x, (event if x.is_cuda else None)
        if x.is_cuda:  # the source side: after the DiT's kernels, on our own stream
            s = self.src_stream
            if event is not None:
                s.wait_event(event)
            with torch.cuda.stream(s):
                x.record_stream(s)  # x may be freed by the DiT side while the copy is queued
                if self.dst.type == "cpu" or not self.peer:
                    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
                    host.copy_(x, non_blocking=True)
                    staged = torch.cuda.Event()
                    staged.record(s)
                    if self.dst.type == "cpu":
                        staged.synchronize()
                        return host, None
                    d = self.dst_stream
                    d.wait_event(staged)
                    with torch.cuda.stream(d):
                        y = host.to(self.dst, non_blocking=True)  # pinned: the host allocator keeps it alive
                else:
                    with torch.cuda.stream(self.dst_stream):  # peer copy, on the source's copy stream
                        y = x.to(self.dst, non_blocking=True)
                        self.dst_stream.wait_stream(s)
        else:  # CPU -> GPU
            host = x.pin_memory() if torch.cuda.is_available() else x
            with torch.cuda.stream(self.dst_stream):
                y = host.to(self.dst, non_blocking=True)
        done = torch.cuda.Event()
        done.record(self.dst_stream)
        return y, done


def decoder_on(avatar, ref: torch.Tensor, device) -> object:
    """A streaming decoder for `avatar`'s VAE on `device`, primed with the portrait latent `ref`
    exactly as `StreamingGenerator.__init__` primes its own."""
    dev = torch.device(device)
    vae = avatar.vae
    if torch.device(getattr(vae, "device", avatar.device)) != dev:
        vae = copy.deepcopy(vae).to(dev)
    dec = vae.stream_decoder()
    with torch.inference_mode():
        dec.decode(ref.to(dev))
    return dec


# ----------------------------------------------------------------------------- (a) threads
class PipelinedStream:
    """DiT thread -> bounded queue -> decode thread, for one `StreamingGenerator`.

    Usage::

        s = avatar.new_stream(portrait, seed=0)
        p = PipelinedStream(s)                 # or decode_device="cuda:1"
        p.push_audio(samples); p.end_audio()
        for chunk in p.chunks(n):              # Chunk objects, same frames as s.next_chunk()
            ...
        p.close()

    `chunks(n)` runs both threads until n chunks were produced (None: until the audio has
    ended and been consumed, or `close()`). With `wait=True`, the DiT thread waits for each
    chunk's audio (live audio) instead of padding with silence.
    """

    def __init__(self, stream, decode_device=None, depth: int = 2, threads: int | None = None,
                 wait: bool = False):
        self.stream = stream
        self.avatar = stream.avatar
        self.dit = LatentStage(stream)
        self.dit_device = indexed_device(self.avatar.device)
        self.decode_device = indexed_device(decode_device) if decode_device is not None else self.dit_device
        self.decode_stream = torch.cuda.Stream(self.decode_device) if self.decode_device.type == "cuda" else None
        if self.decode_stream is not None:
            # a new decoder primed on the stream that will use it: the stream's own one was primed
            # on the DiT's stream, whose allocator pool could hand its causal state to the DiT while
            # decode kernels still read it
            self.decode_stream.wait_stream(torch.cuda.current_stream(self.dit_device))  # `ref` is ready
            with torch.cuda.stream(self.decode_stream):
                self.decoder = decoder_on(self.avatar, stream.ref, self.decode_device)
        elif self.decode_device == self.dit_device:
            self.decoder = stream.decoder
        else:
            self.decoder = decoder_on(self.avatar, stream.ref, self.decode_device)
        self.transfer = LatentTransfer(self.dit_device, self.decode_device)
        self.depth = depth
        self.threads = threads
        self.wait = wait
        self._stop = threading.Event()
        self.stage_ms: dict[str, list[float]] = {"dit": [], "decode": []}

    # audio in: the AvatarStream methods, delegated
    def push_audio(self, samples):
        self.stream.push_audio(samples)

    def end_audio(self):
        self.stream.end_audio()

    def clear_audio(self) -> int:
        return self.stream.clear_audio()

    def buffered_samples(self) -> int:
        return self.stream.buffered_samples()

    def close(self):
        self._stop.set()

    def _finished(self) -> bool:
        a = self.stream.audio
        return bool(a.ended) and self.stream.pos >= a.end

    def _dit_loop(self, n, q: queue.Queue, errors: list):
        try:
            if self.threads:
                torch.set_num_threads(self.threads)
            made = 0
            while not self._stop.is_set() and (n is None or made < n):
                if n is None and self._finished():
                    break
                t = time.perf_counter()
                lc = self.dit.next_latents(wait=self.wait)
                if lc is None:
                    time.sleep(0.005)
                    continue
                self.stage_ms["dit"].append(1e3 * (time.perf_counter() - t))
                made += 1
                while not self._stop.is_set():
                    try:
                        q.put(lc, timeout=0.1)  # blocks while `depth` chunks wait: backpressure
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            errors.append(e)
        finally:
            q.put(_STOP)

    @torch.inference_mode()
    def _decode(self, lc: LatentChunk) -> Chunk:
        t = time.perf_counter()
        if self.decode_stream is not None:
            x, ev = self.transfer(lc.latents, lc.event)
            with torch.cuda.stream(self.decode_stream):
                if ev is not None:
                    self.decode_stream.wait_event(ev)
                if x.is_cuda:
                    x.record_stream(self.decode_stream)
                frames = self.decoder.decode(x)  # .cpu() inside synchronises this stream only
        else:
            x, _ = self.transfer(lc.latents, lc.event)
            frames = self.decoder.decode(x)
        ms = 1e3 * (time.perf_counter() - t)
        self.stage_ms["decode"].append(ms)
        return Chunk(lc.index, frames, lc.audio, lc.speaking, {**lc.timings, "vae_ms": ms})

    def chunks(self, n: int | None = None) -> Iterator[Chunk]:
        """Yield decoded chunks in order; the decode runs in a second thread so that the
        caller's consumption (encoding, sending) overlaps too."""
        lat_q: queue.Queue = queue.Queue(maxsize=self.depth)
        out_q: queue.Queue = queue.Queue(maxsize=self.depth)
        errors: list = []
        dit_t = threading.Thread(target=self._dit_loop, args=(n, lat_q, errors), name="tm-dit", daemon=True)

        def decode_loop():
            try:
                if self.threads:
                    torch.set_num_threads(self.threads)
                while True:
                    lc = lat_q.get()
                    if lc is _STOP:
                        break
                    out_q.put(self._decode(lc))
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
                self._stop.set()
                while lat_q.get() is not _STOP:  # drain so the DiT thread can finish
                    pass
            finally:
                out_q.put(_STOP)

        dec_t = threading.Thread(target=decode_loop, name="tm-decode", daemon=True)
        dit_t.start()
        dec_t.start()
        try:
            while True:
                c = out_q.get()
                if c is _STOP:
                    break
                yield c
        finally:
            self._stop.set()
            while dec_t.is_alive():  # unblock the decode thread if the caller stopped early
                try:
                    out_q.get(timeout=0.05)
                except queue.Empty:
                    pass
            dit_t.join()
            dec_t.join()
            self._stop.clear()
        if errors:
            raise errors[0]


# ----------------------------------------------------------------------------- (b) two processes
_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _vae_only(model, preset: str, device):
    """The VAE of a model folder (or the random one the avatar would build); True if random."""
    from ..config import Preset, get_preset
    from .generator import SHIPPED_MODEL, _random_vae, model_vae

    folder = Path(model) if model else (SHIPPED_MODEL if preset == "tiny" else None)
    if folder is not None and (folder / "preset.json").exists():
        return model_vae(folder, Preset.load(folder / "preset.json"), torch.device(device)), False
    p = get_preset(preset)
    return _random_vae(p.vae, torch.device(device)), True


def _vae_module(vae) -> torch.nn.Module:
    return vae if isinstance(vae, torch.nn.Module) else vae.vae


def disagg_worker(rank: int, n_chunks: int, audio: np.ndarray | None, *, model=None, preset="tiny",
                  seed: int = 0, steps: int | None = None, devices=("cpu", "cpu"), threads: int = 1,
                  depth: int = 2, on_chunk: Callable[[Chunk], None] | None = None,
                  portrait: np.ndarray | None = None) -> dict:
    """One rank of the two-process pipeline (the process group must already be initialised).

    Rank 0: DiT + KV cache + audio; rank 1: VAE decoder. Rank 1 calls `on_chunk(Chunk)` for each
    decoded chunk (frames, with the audio that plays with them). Returns per-stage timings."""
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dev = torch.device(devices[rank])
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    peer = 1 - rank
    timings: list[float] = []
    done_at: list[float] = []  # when each chunk left this rank (sent / decoded)
    t_start = time.perf_counter()
    with torch.inference_mode():
        if rank == 0:
            from .generator import load_avatar

            avatar = load_avatar(model, preset, str(dev))
            if avatar.random_weights:  # rank 1 built its own random VAE: make it this one
                for p_ in _vae_module(avatar.vae).state_dict().values():
                    dist.broadcast(p_.contiguous(), src=0)
            stream = avatar.new_stream(portrait, seed=seed, steps=steps)
            stage = LatentStage(stream)
            if audio is not None:
                stream.push_audio(audio)
                stream.end_audio()
            ref = stream.ref.contiguous()
            meta = list(ref.shape) + [stream.chunk_samples, stream.chunk_frames, _DTYPES.index(ref.dtype)]
            dist.send(torch.tensor(meta, dtype=torch.int64, device=dev), peer)
            dist.send(ref, peer)
            pending: list = []
            for _ in range(n_chunks):
                t = time.perf_counter()
                lc = stage.next_latents()
                timings.append(1e3 * (time.perf_counter() - t))
                done_at.append(time.perf_counter())
                header = torch.tensor([1, lc.index, int(lc.speaking)], dtype=torch.int64, device=dev)
                msg = [header, torch.as_tensor(lc.audio, dtype=torch.float32).to(dev), lc.latents.contiguous()]
                pending.append([dist.isend(m, peer) for m in msg] + msg)  # keep tensors alive
                while len(pending) > depth:  # backpressure: at most `depth` chunks in flight
                    for w in pending.pop(0)[:3]:
                        w.wait()
            for p in pending:
                for w in p[:3]:
                    w.wait()
            dist.send(torch.tensor([0, -1, 0], dtype=torch.int64, device=dev), peer)
        else:
            vae, random = _vae_only(model, preset, dev)
            if random:
                for p_ in _vae_module(vae).state_dict().values():
                    buf = p_.contiguous()
                    dist.broadcast(buf, src=0)
                    if buf.data_ptr() != p_.data_ptr():
                        p_.copy_(buf)
            meta = torch.zeros(8, dtype=torch.int64, device=dev)
            dist.recv(meta, peer)
            m = meta.tolist()
            shape, chunk_samples, chunk_frames, dtype = m[:5], m[5], m[6], _DTYPES[m[7]]
            ref = torch.empty(shape, dtype=dtype, device=dev)  # latents travel in the DiT's dtype
            dist.recv(ref, peer)
            dec = vae.stream_decoder()
            dec.decode(ref)  # primes the causal state exactly as StreamingGenerator.__init__ does
            lat_shape = [shape[0], shape[1], chunk_frames, shape[3], shape[4]]
            while True:
                h = torch.empty(3, dtype=torch.int64, device=dev)
                dist.recv(h, peer)
                flag, index, speaking = h.tolist()
                if not flag:
                    break
                au = torch.empty(chunk_samples, dtype=torch.float32, device=dev)
                lat = torch.empty(lat_shape, dtype=dtype, device=dev)
                w1, w2 = dist.irecv(au, peer), dist.irecv(lat, peer)
                w1.wait()
                w2.wait()
                t = time.perf_counter()
                frames = dec.decode(lat)
                timings.append(1e3 * (time.perf_counter() - t))
                done_at.append(time.perf_counter())
                if on_chunk is not None:
                    on_chunk(Chunk(index, frames, au.cpu().numpy(), bool(speaking), {"vae_ms": timings[-1]}))
    period = 1e3 * (done_at[-1] - done_at[0]) / (len(done_at) - 1) if len(done_at) > 1 else None
    return {"rank": rank, "stage_ms": timings, "wall_s": time.perf_counter() - t_start, "chunk_period_ms": period}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_entry(rank, world, port, kwargs, result_q):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dev = torch.device(kwargs.get("devices", ("cpu", "cpu"))[rank])
    dist.init_process_group(_backend_for(dev), rank=rank, world_size=world)
    try:
        frames_dir = kwargs.pop("frames_dir", None)
        got: list = []

        def keep(c: Chunk):
            got.append(c)

        res = disagg_worker(rank, on_chunk=keep if rank == 1 else None, **kwargs)
        if rank == 1 and frames_dir is not None:
            np.save(os.path.join(frames_dir, "frames.npy"), np.stack([c.frames for c in got]))
            np.save(os.path.join(frames_dir, "audio.npy"), np.stack([c.audio for c in got]))
        result_q.put(res)
    finally:
        dist.destroy_process_group()


def run_two_process(n_chunks: int, audio: np.ndarray | None, frames_dir: str | None = None, **kwargs) -> list[dict]:
    """Spawn the two ranks with `torch.multiprocessing` (gloo on CPU, NCCL when `devices` are
    GPUs) and run `n_chunks`; rank 1 saves frames.npy/audio.npy in `frames_dir` if given.
    Returns both ranks' timings."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    result_q = ctx.Queue()
    port = _free_port()
    kw = dict(kwargs, n_chunks=n_chunks, audio=audio, frames_dir=frames_dir)
    pc = mp.start_processes(_spawn_entry, args=(2, port, kw, result_q), nprocs=2, join=False, start_method="spawn")
    res = []
    while len(res) < 2:  # read before joining: a child only exits once its result was taken
        try:
            res.append(result_q.get(timeout=1.0))
        except queue.Empty:
            pc.join(timeout=0)  # raises if a rank died
    pc.join()
    return sorted(res, key=lambda r: r["rank"])


def torchrun_main(args) -> int:
    """`talkingmachines bench-disagg` under torchrun (``--nproc_per_node 2``): this process is
    rank 0 (the DiT) or rank 1 (the VAE decoder); prints its rank's timings as one JSON line."""
    import json

    import torch.distributed as dist

    from ..devices import resolve_device
    from ..errors import InputError

    if os.environ.get("WORLD_SIZE") != "2" or "RANK" not in os.environ:
        raise InputError("bench-disagg runs as two processes: torchrun --nproc_per_node 2 -m talkingmachines "
                         "bench-disagg ...")
    if args.chunks < 1:
        raise InputError("--chunks must be >= 1")
    dit_dev = resolve_device(args.device)
    devices = (dit_dev, resolve_device(args.decode_device) if args.decode_device else dit_dev)
    rank = int(os.environ["RANK"])
    dist.init_process_group(_backend_for(torch.device(devices[rank])))
    from ..audio_io import speech_like

    audio = speech_like((args.chunks + 2) * 0.48)
    try:
        res = disagg_worker(rank, args.chunks, audio, model=args.model, preset=args.preset, seed=args.seed,
                            devices=devices, threads=args.threads)
    finally:
        dist.destroy_process_group()
    st = res["stage_ms"]
    line = json.dumps({"rank": rank, "stage": "dit" if rank == 0 else "vae", "chunks": len(st),
                       "median_ms": round(float(np.median(st)), 2) if st else None,
                       "chunk_period_ms": res["chunk_period_ms"] and round(res["chunk_period_ms"], 2),
                       "wall_s": round(res["wall_s"], 3)})
    # one write per line: the ranks share torchrun's stdout, and print's separate "\n" write let
    # two ranks' lines run together
    print(line + "\n", end="", flush=True)
    return 0
