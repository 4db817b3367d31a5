"""`talkingmachines bench` (speed of the streaming engine), `bench-disagg` (its two-process pipeline,
under torchrun) and `plan` (stage placement and memory per GPU); registered by the main CLI."""

from __future__ import annotations


def cmd_plan(args) -> int:
    from .plan import run_plan

    return run_plan(args)


def cmd_bench(args) -> int:
    from .bench import run_bench

    return run_bench(args)


def cmd_bench_disagg(args) -> int:
    from ..stream.disagg import torchrun_main

    return torchrun_main(args)


def _bench_parser(subparsers) -> None:
    from ..stream.options import add_model_args

    b = subparsers.add_parser("bench", help="real-time factor, latency, KV-cache speedup, memory over a long stream")
    add_model_args(b)
    b.add_argument("--json", action="store_true", help="print one JSON line")
    b.add_argument("--chunks", type=int, default=300, help="length of the long stream")
    b.add_argument("--plot", default=None, help="write a PNG of per-chunk latency")
    b.add_argument("--skip-baseline", action="store_true",
                   help="do not time diffusers' WanImageToVideoPipeline (baseline_speedup)")
    b.add_argument("--baseline-frames", type=int, default=17,
                   help="video frames of the baseline clip (1 + 4k; default 17, Wan's own default is 81)")
    b.add_argument("--baseline-steps", type=int, default=50, help="baseline denoising steps (default 50)")
    b.add_argument("--compile", action="store_true",
                   help="torch.compile the DiT blocks, once per block shape (inductor's default mode)")
    b.add_argument("--sections", default=None,
                   help="comma list of the sections to run: stream,kv_cache,disagg,baseline (default: all; the "
                        "long stream always runs)")
    b.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend (default inductor; eager: trace only, for dry runs)")
    b.add_argument("--decode-device", default=None,
                   help="device of the VAE decoder in the disaggregated run (default: the DiT's; cuda:1 ...)")
    b.set_defaults(fn=cmd_bench)

    d = subparsers.add_parser("bench-disagg", help="the DiT and the VAE decoder as two processes: run it as "
                                                   "torchrun --nproc_per_node 2 -m talkingmachines bench-disagg")
    add_model_args(d, steps=False, vae_dtype=False)  # the decoder's own process loads the VAE in fp32
    d.add_argument("--decode-device", default=None, help="device of the VAE decoder's process (default: --device)")
    d.add_argument("--chunks", type=int, default=50)
    d.add_argument("--threads", type=int, default=1, help="torch threads per process")
    d.set_defaults(fn=cmd_bench_disagg)


def register(subparsers) -> None:
    _bench_parser(subparsers)
    p = subparsers.add_parser("plan", help="placement of DiT / VAE / audio encoder on N GPUs and memory per GPU")
    p.add_argument("--preset", default="wan-i2v-14b-audio")
    p.add_argument("--gpus", type=int, default=1, help="number of GPUs")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="memory per GPU in GiB (default 80)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32", "fp8"], help="DiT dtype")
    p.add_argument("--vae-dtype", default="fp32", choices=["bf16", "fp16", "fp32"],
                   help="VAE dtype (fp32: as load_avatar loads it)")
    p.add_argument("--speed", action="store_true",
                   help="also predict per-chunk time and fps per GPU kind (H100, H200, A100, L40S, RTX 4090)")
    p.add_argument("--realtime", action="store_true",
                   help="also the GPUs 25 fps needs for wan-1.3b-audio and the 18B at 512x512 and 720x720 (slower)")
    p.add_argument("--cpu-check", action="store_true",
                   help="also check the speed model on this CPU: tiny preset, predicted vs measured chunk time")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(fn=cmd_plan)
