"""`talkingmachines train teacher|ode|dmd|tiny-recipe`, `talkingmachines data synth|prep`.

Registered by the main CLI (`cli.build_parser` imports this module's `register`). Every
stage takes a config file (``--config teacher``, a shipped config, or a JSON/YAML path) and command-line
overrides; ``torchrun --nproc_per_node N -m talkingmachines.cli train teacher ...`` runs it
distributed (FSDP2 by default).
"""

from __future__ import annotations

import argparse

from ..errors import InputError


def _stage_args(p: argparse.ArgumentParser, stage: str) -> None:
    p.add_argument("--config", default=None, help=f"JSON/YAML config, or a shipped config's name (default: {stage})")
    p.add_argument("--out", required=True, help="run folder (checkpoints, loss.png, final/)")
    p.add_argument("--data", default=None, help="clip folder (talkingmachines data synth --out DIR) or a real-video "
                                                "cache (talkingmachines data prep --out DIR)")
    p.add_argument("--vae", default=None, help="VAE folder (TinyVAE folder, or a Wan VAE / WAN_DIR)")
    p.add_argument("--preset", default=None, help="model preset (tiny, wan-1.3b-audio, wan-i2v-14b-audio)")
    p.add_argument("--init-from", default=None,
                   help="teacher: Wan2.1 checkpoint dir or a DiT folder; dmd: the ode run folder")
    if stage in ("ode", "dmd"):
        p.add_argument("--teacher", default=None, help="the teacher run folder (or a DiT folder)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="global batch size")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--device", default=None, help="auto (CUDA when there is a GPU, else CPU), cpu, cuda, cuda:1, ... "
                                                   "(default: the config's, auto)")
    p.add_argument("--dist-mode", default=None, choices=["auto", "fsdp", "ddp"])
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT's last checkpoint (required when OUT already has checkpoints)")
    p.add_argument("--no-progress", action="store_true")


def _stage_config(args, stage: str):
    from .checkpoint import latest_checkpoint
    from .config import load_config

    from .. import configs

    path = configs.shipped(stage) if args.config is None else configs.resolve(args.config)
    cfg = load_config(path, stage=stage, out=args.out, data=args.data, vae=args.vae, preset=args.preset,
                      init_from=args.init_from, teacher=getattr(args, "teacher", None), steps=args.steps,
                      batch_size=args.batch_size, lr=args.lr, device=args.device, dist_mode=args.dist_mode,
                      seed=args.seed)
    if args.no_progress:
        cfg.progress = False
    if latest_checkpoint(cfg.out) is not None and not args.resume:
        raise InputError(f"{cfg.out} already has checkpoints: pass --resume to continue, or choose another --out")
    return cfg


def cmd_stage(args) -> int:
    cfg = _stage_config(args, args.stage)
    if args.stage == "teacher":
        from .teacher import train_teacher as fn
    elif args.stage == "ode":
        from .student import train_ode as fn
    else:
        from .student import train_dmd as fn
    import os

    final = fn(cfg)
    if os.environ.get("RANK", "0") == "0":
        print(f"{args.stage}: done -> {final}")
    return 0


def cmd_recipe(args) -> int:
    from .recipe import run_recipe

    stages = args.stages.split(",") if args.stages else None
    dest = run_recipe(args.out, args.config, args.budget_minutes, args.data, args.export, stages, args.device)
    if dest is None:  # stages without "export": the run folder holds the stages' products, no model folder
        print(f"tiny-recipe: stages {', '.join(stages)} done in {args.out} (no model folder: add 'export' to --stages)")
    else:
        print(f"tiny-recipe: model -> {dest}")
    return 0


def cmd_synth(args) -> int:
    from .synth import preview, synth_dataset

    if args.preview:
        print(preview(args.preview, n=16, seed=args.seed, size=args.size, version=args.data_version))
        return 0
    if not args.out:
        raise InputError("--out is required (or --preview PNG)")
    if args.n < 1:
        raise InputError("--n must be >= 1")
    idx = synth_dataset(args.n, args.out, seed=args.seed, size=args.size, seconds=(args.min_seconds, args.max_seconds),
                        workers=args.workers, speech=args.speech, video=not args.no_video,
                        version=args.data_version)
    print(idx)
    return 0


def register(sub) -> None:
    t = sub.add_parser("train", help="train the teacher, the student (ode, dmd) or the whole tiny model")
    ts = t.add_subparsers(dest="stage", required=True)
    for stage, help_ in (("teacher", "bidirectional teacher: flow matching, audio/reference dropout for CFG"),
                         ("ode", "student init: regress the teacher's ODE trajectories (sparse-causal)"),
                         ("dmd", "asymmetric DMD: causal student vs bidirectional teacher and fake score")):
        p = ts.add_parser(stage, help=help_)
        _stage_args(p, stage)
        p.set_defaults(fn=cmd_stage)
    r = ts.add_parser("tiny-recipe", help="synth data -> VAE -> teacher -> ode -> dmd -> export (resumable)")
    r.add_argument("--out", required=True, help="run folder")
    r.add_argument("--config", default=None, help="recipe config merged onto the shipped tiny-recipe (a file, or a "
                                                  "shipped config's name such as tiny-smoke)")
    r.add_argument("--budget-minutes", type=float, default=None, help="scale all steps to fit this wall time")
    r.add_argument("--data", default=None, help="use this clip folder (default: OUT/data, synthesised)")
    r.add_argument("--export", default=None, help="where to write the model folder (default: OUT/model)")
    r.add_argument("--stages", default=None, help="comma list, e.g. synth,vae (default: all)")
    r.add_argument("--device", default=None, help="auto (CUDA when there is a GPU, else CPU), cpu, cuda, ... "
                                                   "(default: the config's, auto)")
    r.set_defaults(fn=cmd_recipe)

    from importlib.util import find_spec

    d = sub.add_parser("data", help="data sets")
    ds = d.add_subparsers(dest="data_cmd", required=True)
    if find_spec("talkingmachines.train.synth") is not None:
        from . import synth

        if hasattr(synth, "synth_dataset"):
            s = ds.add_parser("synth", help="procedural talking-face clips (video + audio)")
            s.add_argument("--n", type=int, default=100, help="number of clips")
            s.add_argument("--out", default=None, help="data folder to write")
            s.add_argument("--seed", type=int, default=0)
            s.add_argument("--size", type=int, default=128)
            s.add_argument("--min-seconds", type=float, default=4.0)
            s.add_argument("--max-seconds", type=float, default=8.0)
            s.add_argument("--workers", type=int, default=1)
            s.add_argument("--speech", choices=["auto", "espeak", "babble"], default="auto")
            s.add_argument("--no-video", action="store_true", help="npz only (no mp4)")
            s.add_argument("--data-version", type=int, default=1, choices=synth.DATA_VERSIONS,
                           help="1: the original clips; 2: close-up faces whose head and brows ignore the speech; "
                                "3: as 2 with a wider opening and less head motion; 4: as 3 drawn with a real face's "
                                "light-dark layout in every style (what a face detector keys on); 5: as 4 with a lens-shaped "
                                "open mouth, a dark inside and lighter lips (what a landmark model reads); 6: as 4 with a still "
                                "head; 7: as 6 with a steady gaze; 8: as 5 with a still head")
            s.add_argument("--preview", metavar="PNG", default=None,
                           help="only write a contact sheet of 16 random faces (--seed, --size)")
            s.set_defaults(fn=cmd_synth)
    if find_spec("talkingmachines.train.preprocess") is not None:
        from .preprocess import add_prep_parser

        add_prep_parser(ds)
