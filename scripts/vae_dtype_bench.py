"""Streaming Wan2.1 VAE decode on a GPU: fp32 vs bf16 (and fp16), time per 12-frame chunk and
the bf16 frames' PSNR against fp32 on the same latents. Random weights (speed and numerics only).
    python scripts/vae_dtype_bench.py [--chunks 12] [--hw 64]   # 512x512 video = 64x64 latents
Prints one JSON line per variant."""
import argparse
import json
import time

import torch
from diffusers import AutoencoderKLWan

from talkingmachines.model.vae import WanVAE


def run(vae, zs, dev):
    dec = vae.stream_decoder()
    outs, ms = [], []
    for z in zs:
        torch.cuda.synchronize(dev)
        t = time.perf_counter()
        outs.append(dec.decode_float(z).float())
        torch.cuda.synchronize(dev)
        ms.append(1e3 * (time.perf_counter() - t))
    return torch.cat(outs, 2), ms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=12)
    ap.add_argument("--hw", type=int, default=64)
    a = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    base = AutoencoderKLWan().eval()
    # the sink's one latent frame, then chunks of 3 latent frames (12 video frames)
    zs = [torch.randn(1, 16, 1, a.hw, a.hw, device=dev)] + [torch.randn(1, 16, 3, a.hw, a.hw, device=dev) for _ in range(a.chunks)]
    ref = None
    for name, dtype, bench in [("fp32", torch.float32, False), ("fp32+cudnn.benchmark", torch.float32, True),
                               ("bf16", torch.bfloat16, True), ("fp16", torch.float16, True)]:
        torch.backends.cudnn.benchmark = bench
        vae = WanVAE(AutoencoderKLWan.from_config(base.config).to(dev, dtype).eval())
        vae.vae.load_state_dict({k: v.to(dtype) for k, v in base.state_dict().items()})
        run(vae, zs[:3], dev)  # warm-up: kernels, cudnn autotune
        out, ms = run(vae, zs, dev)
        ms = sorted(ms[1:])  # chunk times, the sink frame left out
        row = {"variant": name, "chunk_ms_median": round(ms[len(ms) // 2], 1), "chunk_ms_min": round(ms[0], 1),
               "frames": out.shape[2], "mem_gb": round(torch.cuda.max_memory_allocated(dev) / 1e9, 2)}
        if ref is None:
            ref = out
        else:
            mse = (out - ref).pow(2).mean().item()
            row["psnr_vs_fp32_db"] = round(10 * torch.log10(torch.tensor(4.0 / max(mse, 1e-20))).item(), 2)
            row["finite"] = bool(torch.isfinite(out).all())
        print(json.dumps(row), flush=True)
        del vae
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


if __name__ == "__main__":
    main()
