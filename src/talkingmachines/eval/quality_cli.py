"""`talkingmachines eval VIDEO` and `talkingmachines eval-model`: quality metrics from the
command line (see `talkingmachines.eval.quality` for what is measured and its limits)."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import InputError


def _fmt(v, nd=3):
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return "n/a" if v != v else f"{v:.{nd}f}"
    return str(v)


def _print_face(f: dict) -> None:
    """The face judge's lines of `eval` (it is reported first: it is the honest figure)."""
    if "unavailable" in f:
        print(f"  face judge: not run ({f['unavailable']})")
        return
    line = f"  face judge ({f.get('judge', 'dlib 68 landmarks')}): face found in {100 * f['face_found']:.0f} % of frames"
    if "face_found_speech" in f:
        line += (f" (speech {_pct(f['face_found_speech'])}, silence {_pct(f['face_found_silence'])})")
    print(line)
    if f.get("lag") is not None:
        print(f"  lip opening vs speech: best lag {_fmt(f['lag'])} frames, correlation {_fmt(f['confidence'])}; "
              f"opening speech {_fmt(f['open_speech'])} / silence {_fmt(f['open_silence'])} = {_fmt(f['open_ratio'], 2)}x")
    elif "face_found_speech" in f:
        print("  lip opening vs speech: not measurable (too few frames with a face, or no speech)")


def _pct(v) -> str:
    return "n/a" if v is None or v != v else f"{100 * v:.0f} %"


def cmd_eval(args) -> int:
    from . import face_judge
    from . import quality as q

    face_judge.use_detector(args.judge_detector)
    face_judge.use_contrast(args.judge_contrast)

    p = Path(args.video)
    if args.grid:  # decoded and judged once, for the metrics and the picture
        from .frame_grid import save_frame_grid

        frames, audio = q.frames_for_eval(p, args.audio)
        landmarks = q.judge_landmarks(frames)
        r = q.evaluate_video(frames, audio, landmarks=landmarks)
        save_frame_grid(args.grid, frames, audio, judge=False, landmarks=landmarks)
    else:
        r = q.evaluate_video(p, audio=args.audio)
    if not args.keep_signal:  # the per-frame signals: long, and only for plotting
        r.pop("mouth", None)
        for k in ("opening", "found"):
            (r.get("face") or {}).pop(k, None)
    if args.json:
        print(q.to_json(r))
        return 0
    d = r["drift"]
    print(f"{p}: {r['frames']} frames ({r['seconds']:.2f} s)")
    _print_face(r["face"])
    print(f"  pixel metrics (secondary: blocky artifacts in the mouth box count as motion), mouth ROI "
          f"y{r['roi'][0]}-{r['roi'][1]} x{r['roi'][2]}-{r['roi'][3]} (centred-portrait guess):")
    if r.get("lag") is not None or r.get("stillness") is not None:
        print(f"  lip-sync: best lag {_fmt(r['lag'])} frames (+ = mouth late), confidence {_fmt(r['confidence'])}, "
              f"corr at lag 0 {_fmt(r['corr_at_0'])}")
        st = r["stillness"] or {}
        print(f"  stillness: mouth motion speech/silence = {_fmt(r['stillness_ratio'], 2)} "
              f"({st.get('speech_frames', 0)} speech, {st.get('silence_frames', 0)} silence frames)")
    else:
        print(f"  {r.get('note', 'no audio')}")
    print(f"  drift: mean-frame PSNR first vs last {d['window_seconds']:g} s = {_fmt(d['psnr_first_last'], 1)} dB, "
          f"RGB shift {', '.join(f'{v:+.1f}' for v in d['rgb_shift'])}, brightness {d['brightness_shift']:+.1f}"
          + (f" ({d['note']})" if d["note"] else ""))
    return 0


def _load_teacher(spec: str | None, avatar):
    if not spec:
        return None
    import importlib

    mod, _, rest = spec.partition(":")
    fn, _, kw = rest.partition(":")
    if not fn:
        raise InputError(f"--teacher {spec}: expected MODULE:FACTORY or MODULE:FACTORY:KEY=VALUE,...")
    kwargs = {}
    for item in filter(None, kw.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.isidentifier():
            raise InputError(f"--teacher {spec}: {item!r} is not KEY=VALUE")
        kwargs[key] = _number_or_text(value)
    try:
        factory = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise InputError(f"--teacher {spec}: {e}") from None
    try:
        return factory(avatar, **kwargs)
    except TypeError as e:  # an unknown keyword: say which, without a traceback
        raise InputError(f"--teacher {spec}: {e}") from None


def _number_or_text(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


CARD_BEGIN, CARD_END = "<!-- metrics:begin -->", "<!-- metrics:end -->"


# the face judge's rows, (label, key, format), in the card's tables and in eval-model's printout;
# the tables of a subset of clips (SUBSET_ROWS) leave out the clip count
FACE_ROWS = [("face found (all frames)", "face_found", _pct),
             ("face found where the ground truth's is", "found_where_reference_found", _pct),
             ("face found in speech", "face_found_speech", _pct),
             ("face found in silence", "face_found_silence", _pct),
             ("lip opening vs speech: best lag (frames)", "lag", _fmt),
             ("lip opening vs speech: correlation", "confidence", lambda v: _fmt(v, 2)),
             ("clips with best lag within 2 frames", "clips_lag_within_2", _pct),
             ("lip opening speech / silence (median)", "open_ratio_median", lambda v: _fmt(v, 2))]


SUBSET_ROWS = [rw for rw in FACE_ROWS if rw[1] != "clips_lag_within_2"]


def judge_subsets(r: dict) -> list[tuple[dict, str, str, str]]:
    """The clip subsets the judge's figures are pooled again over (``face_visible``: the clips
    whose ground-truth face it sees; ``face_readable``: whose ground-truth lips it reads), those
    with clips, each as (its systems' figures, the card's sentence, the card's table title, the
    printout's line)."""
    out = []
    vis = r.get("face_visible") or {}
    if vis.get("clips"):
        pct = f"{100 * vis['min_ground_truth_found']:.0f} %"
        out.append((vis["systems"],
                    f"The same, on the {vis['clips']} of {vis['of']} clips whose ground-truth face the judge finds "
                    f"in at least {pct} of the frames (it misses some drawn faces outright, the ground truth's too):",
                    "face judge, clips it can see",
                    f"on the {vis['clips']} of {vis['of']} clips whose ground-truth face the judge finds in >= "
                    f"{pct} of frames:"))
    read = r.get("face_readable") or {}
    if read.get("clips"):
        corr = read["min_ground_truth_corr"]
        out.append((read["systems"],
                    f"The same, on the {read['clips']} of {read['of']} clips whose ground-truth lips the judge reads "
                    f"(their opening follows the speech at correlation >= {corr} within 2 frames; it misreads some "
                    "drawn mouths):",
                    "face judge, lips it reads",
                    f"on the {read['clips']} of {read['of']} clips whose ground-truth lips the judge reads "
                    f"(corr >= {corr}, lag within 2):"))
    return out


STYLE_LABELS = {"vae_roundtrip": "VAE round trip"}


def style_lines(groups: dict, systems: list[str], column: str = "style") -> list[str]:
    """The card's per-group table (drawing style, skin band): per group, the judge's
    ground-truth face-found rate and lip correlation (what it can read of the real mouth caps
    what any column can score), then per generated column its face-found rate where the
    ground truth's face is found and its lip correlation."""
    if not groups:
        return []
    systems = [k for k in systems if k != "ground_truth"]
    head = (f"| {column} | clips | ground truth: face found, lip corr | "
            + " | ".join(f"{STYLE_LABELS.get(k, k)}: found where GT's is, lip corr" for k in systems) + " |")
    lines = [head, "|---" * (len(systems) + 3) + "|"]
    for st, d in groups.items():
        (gt_found, gt_corr), cells = _style_figures(d, systems)
        lines.append(f"| {st} | {d['clips']} | {gt_found}, {gt_corr} | "
                     + " | ".join(f"{fw}, {c}" for fw, c in cells) + " |")
    return lines


def _style_figures(d: dict, systems: list[str]) -> tuple[tuple[str, str], list[tuple[str, str]]]:
    """One style's formatted figures: the ground truth's (face-found rate, lip correlation), and
    per system its (found where the ground truth's is, lip correlation)."""
    sy = d["systems"]
    fig = lambda k, key: (sy.get(k) or {}).get(key)  # noqa: E731
    return ((_pct(fig("ground_truth", "face_found")), _fmt(fig("ground_truth", "confidence"), 2)),
            [(_pct(fig(k, "found_where_reference_found")), _fmt(fig(k, "confidence"), 2)) for k in systems])


def metrics_markdown(r: dict, command: str) -> str:
    """The model card's metrics section from an `eval-model` report."""
    s = r["summary"]
    # the teacher's sampling is whatever --teacher ran, so its label comes with the report
    cols = [("teacher", f"teacher ({r.get('teacher_sampling') or 'offline'})"), ("student", "student (2 steps, streaming)"),
            ("vae_roundtrip", "ground truth through the VAE"), ("ground_truth", "ground truth (pixels)"),
            ("ground_truth_signal", "ground truth (renderer)")]
    cols = [(k, label) for k, label in cols if k in s]

    def row(label, key, fmt):
        return f"| {label} | " + " | ".join(fmt(s[k].get(key)) for k, _ in cols) + " |"

    faces = r.get("face") or {}

    def frow(label, key, fmt, by):
        return f"| {label} | " + " | ".join(fmt((by.get(k) or {}).get(key)) if k in by else "-"
                                            for k, _ in cols) + " |"

    def face_table(title, by, rows):
        return ([f"| {title} | " + " | ".join(label for _, label in cols) + " |", "|---" * (len(cols) + 1) + "|"]
                + [frow(label, key, fmt, by) for label, key, fmt in rows])

    face_lines = []
    if faces:
        face_lines = [f"Face judge ({r.get('face_judge') or 'dlib HOG detector + 68 landmarks'}, `talkingmachines[eval]`; "
                      "lip opening = inner-lip gap / mouth width), the primary figures:", ""]
        face_lines += face_table("face judge", faces, FACE_ROWS)
        for systems, sentence, title, _ in judge_subsets(r):
            face_lines += ["", sentence, ""] + face_table(title, systems, SUBSET_ROWS)
        styles = style_lines(r.get("face_by_style") or {}, [k for k, _ in cols if k in faces])
        if styles:
            face_lines += ["", "By drawing style (the synthetic data's four; a lip correlation needs frames where "
                           "the judge finds the face, n/a otherwise):", ""] + styles
        skins = style_lines(r.get("face_by_skin") or {}, [k for k, _ in cols if k in faces], "skin")
        if skins:
            face_lines += ["", "By skin colour luminance (Rec. 601, 0-1: dark < 0.40 <= medium < 0.65 <= light):",
                           ""] + skins
        cross = style_lines(r.get("face_by_style_skin") or {}, [k for k, _ in cols if k in faces], "style / skin")
        if cross:
            face_lines += ["", "By style and skin together (a skin band's figure can hide a style it was drawn in "
                           "more often):", ""] + cross
        face_lines += ["", "Pixel metrics (secondary: the mouth box's pixel motion counts blocky artifacts as "
                      "mouth motion, so a broken face can pass them):", ""]
    lines = face_lines + [f"Measured with `{command}`",
             f"on {r['data']['evaluated']} held-out clips of `{r['data']['dir']}` " + (
                 f"(a set of {r['data']['held_out_clips']} clips no training stage saw). " if r["data"].get("unseen_set")
                 else f"({r['data']['held_out_clips']} held out of every training stage). ") +
             "The mouth signal is measured from pixels the same way for every column.", "",
             "| metric | " + " | ".join(label for _, label in cols) + " |",
             "|---" * (len(cols) + 1) + "|",
             row("lip-sync best lag (frames)", "lag", _fmt),
             row("mouth-energy correlation at that lag", "confidence", lambda v: _fmt(v, 2)),
             row("clips with best lag within 2 frames", "clips_lag_within_2", _pct),
             row("mouth motion speech / silence (median)", "stillness_ratio_median",
                 lambda v: "(capped)" if v is not None and v >= 1000 else _fmt(v, 1))]
    ls = r.get("long_stream")
    if ls:
        d = ls["drift"]

        def srow(label, text):
            i = [k for k, _ in cols].index("student")
            cells = ["-"] * len(cols)
            cells[i] = text
            return f"| {label} | " + " | ".join(cells) + " |"

        lines += [srow(f"{ls['seconds']:g} s stream: best lag, correlation", f"{_fmt(ls['lag'])}, {_fmt(ls['confidence'], 2)}"),
                  srow(f"{ls['seconds']:g} s stream: mouth motion speech / silence", _fmt(ls["stillness_ratio"], 2)),
                  srow(f"{ls['seconds']:g} s stream: last {d['window_seconds']:g} s vs first, mean-frame PSNR",
                       f"{_fmt(d['psnr_first_last'], 1)} dB"),
                  srow(f"{ls['seconds']:g} s stream: colour shift last vs first (R, G, B; brightness), 0-255",
                       ", ".join(f"{v:+.1f}" for v in d["rgb_shift"]) + f"; {d['brightness_shift']:+.1f}")]
        if ls.get("face"):
            f = ls["face"]
            lines.append(srow(f"{ls['seconds']:g} s stream (portrait from {ls.get('portrait_clip')}), face judge: "
                              f"found (first / last {d['window_seconds']:g} s); "
                              "lip lag, corr", f"{_pct(f['face_found_first_window'])} / {_pct(f['face_found_last_window'])}; "
                              f"{_fmt(f.get('lag'))}, {_fmt(f.get('confidence'), 2)}"))
    verdict = {True: "met", False: "NOT met", None: "not measured"}
    lines += ["", "Targets (`targets` in the report; `visible_`: on the clips the judge can see; `readable_`: on the clips "
              "whose ground-truth lips it reads): "
              + ", ".join(f"{k} {verdict[v]}" for k, v in r["targets"].items()) + "."]
    return "\n".join(lines)


def fill_card(card: Path, r: dict, command: str) -> None:
    """Replace the card's metrics section (between the markers) with `metrics_markdown` (atomic)."""
    text = card.read_text()
    if CARD_BEGIN not in text or CARD_END not in text:
        raise InputError(f"{card}: no '{CARD_BEGIN}' ... '{CARD_END}' section to fill")
    head, rest = text.split(CARD_BEGIN, 1)
    _, tail = rest.split(CARD_END, 1)
    from ..fileio import atomic_write_text

    atomic_write_text(card, f"{head}{CARD_BEGIN}\n{metrics_markdown(r, command)}\n{CARD_END}{tail}")


def eval_clips(ds, held_out: float, seed: int, held_out_json: str | None = None, all_clips: bool = False):
    """The clips eval-model judges: every clip of a set no stage saw (`all_clips`), the ones a
    training stage's held_out.json lists, or the split training would hold out."""
    import json

    from ..dataset import held_out_split

    if all_clips and held_out_json:
        raise InputError("--all-clips and --held-out-json both choose the clips: give one")
    if all_clips:
        return ds
    if held_out_json:
        idx = json.loads(Path(held_out_json).read_text())["clips"]
        return ds.subset([ds.indices.index(i) for i in idx if i in ds.indices])
    return held_out_split(ds, held_out, seed)[1]


def cmd_eval_model(args) -> int:
    import json

    from ..dataset import ClipDataset
    from ..stream.options import load_from_args
    from . import face_judge
    from . import quality as q

    face_judge.use_detector(args.judge_detector)
    face_judge.use_contrast(args.judge_contrast)
    data = Path(args.data)
    if args.n < 1:
        raise InputError(f"--n must be >= 1 (got {args.n})")
    if args.long_seconds < 0:
        raise InputError(f"--long-seconds must be >= 0 (got {args.long_seconds:g}; 0 skips the stream)")
    if not 0 < args.held_out < 1:
        raise InputError(f"--held-out must be a fraction between 0 and 1 (got {args.held_out:g})")
    if args.card and not Path(args.card).is_file():
        raise InputError(f"--card {args.card}: no such file")
    held = eval_clips(ClipDataset(data), args.held_out, args.seed, args.held_out_json, args.all_clips)
    if len(held) == 0:
        raise InputError(f"{data}: no clips to evaluate (the held-out split is empty; --all-clips judges every clip)")
    avatar = load_from_args(args)
    if args.vae:
        from ..model.vae import TinyVAE

        if not (Path(args.vae) / "config.json").is_file():
            raise InputError(f"--vae {args.vae}: not a TinyVAE folder (no config.json)")
        avatar.vae = TinyVAE.from_pretrained(args.vae, device=avatar.device)
    teacher = _load_teacher(args.teacher, avatar)
    r = q.evaluate_model(avatar, held, long_seconds=args.long_seconds, teacher=teacher, n=args.n, seed=args.seed,
                         progress=not args.json, student=not args.vae)
    if r.get("face"):
        r["face_judge"] = face_judge.describe()
    if teacher is not None and getattr(teacher, "sampling", None):
        r["teacher_sampling"] = teacher.sampling
    r["data"] = {"dir": str(data), "held_out_clips": len(held), "evaluated": min(args.n, len(held)),
                 "unseen_set": bool(args.all_clips)}
    line = q.to_json(r)
    if args.out:
        out = Path(args.out)
        from ..fileio import atomic_write_text

        atomic_write_text(out, json.dumps(json.loads(line), indent=1))
    if args.card:
        import shlex

        fill_card(Path(args.card), json.loads(line), "talkingmachines " + shlex.join(sys.argv[1:]))
    if args.json:
        print(line)
        return 0
    faces = r.get("face") or {}
    if faces:
        fn = [k for k in ("ground_truth", "vae_roundtrip", "teacher", "student") if k in faces]
        print(f"face judge ({r.get('face_judge') or 'dlib'}: lip opening = inner-lip gap / mouth width)")
        print(f"{'':42s}" + "".join(f"{n:>16s}" for n in fn))
        for label, key, fmt in FACE_ROWS:
            print(f"{label[:40]:42s}" + "".join(f"{fmt(faces[n].get(key)):>16s}" for n in fn))
        for systems, _, _, line in judge_subsets(r):
            print(line)
            for label, key, fmt in SUBSET_ROWS:
                print(f"{label[:40]:42s}" + "".join(f"{fmt((systems.get(n) or {}).get(key)):>16s}" for n in fn))
        gen = [n for n in fn if n != "ground_truth"]
        groups = [("style", st, d) for st, d in (r.get("face_by_style") or {}).items()]
        groups += [("skin", sk, d) for sk, d in (r.get("face_by_skin") or {}).items()]
        groups += [("style/skin", k, d) for k, d in (r.get("face_by_style_skin") or {}).items()]
        for kind, name, d in groups:
            (gt_found, gt_corr), cells = _style_figures(d, gen)
            print(f"{kind} {name} ({d['clips']} clips): GT found {gt_found}, corr {gt_corr}; "
                  + "; ".join(f"{n} found where GT's is {fw}, corr {c}" for n, (fw, c) in zip(gen, cells)))
    else:
        print("face judge: not run (" + face_judge.EXTRA_HINT + ")")
    names = [k for k in ("ground_truth_signal", "ground_truth", "vae_roundtrip", "teacher", "student")
             if k in r["summary"]]
    print("pixel metrics (secondary: blocky artifacts in the mouth box count as motion)")
    print(f"{'':28s}" + "".join(f"{n:>22s}" for n in names))
    for key, label in (("lag", "best lag (frames)"), ("confidence", "correlation at best lag"),
                       ("clips_lag_within_2", "clips with |lag| <= 2"),
                       ("stillness_ratio_median", "stillness speech/silence")):
        print(f"{label:28s}" + "".join(f"{_fmt(r['summary'][n].get(key)):>22s}" for n in names))
    ls = r.get("long_stream")
    if ls:
        d = ls["drift"]
        print(f"long stream {ls['seconds']:.0f} s: PSNR first/last {d['window_seconds']:g} s = "
              f"{_fmt(d['psnr_first_last'], 1)} dB, RGB shift {', '.join(f'{v:+.1f}' for v in d['rgb_shift'])}, "
              f"lag {_fmt(ls['lag'])}, confidence {_fmt(ls['confidence'])}, stillness {_fmt(ls['stillness_ratio'], 2)}")
        if ls.get("face"):
            f = ls["face"]
            print(f"long stream face judge (portrait from {ls.get('portrait_clip')}): found {_pct(f['face_found'])} (first {_pct(f['face_found_first_window'])}, "
                  f"last {_pct(f['face_found_last_window'])}), lip lag {_fmt(f.get('lag'))}, "
                  f"corr {_fmt(f.get('confidence'))}, opening speech/silence {_fmt(f.get('open_ratio'), 2)}")
    print("targets: " + ", ".join(f"{k}={v}" for k, v in r["targets"].items()))
    return 0


def add_judge_args(p) -> None:
    """The face judge's options, alike on `eval` and `eval-model`."""
    p.add_argument("--judge-detector", choices=("hog", "cnn"), default="hog",
                   help="the face judge's detector: dlib's HOG (default) or its CNN (a second opinion, ~100x slower)")
    p.add_argument("--judge-contrast", choices=("none", "clahe"), default="none",
                   help="even out each frame's lightness (CLAHE) before the judge looks: it finds dark, "
                        "low-contrast faces more often (default: none, frames as they are)")


def register(sub) -> None:
    from ..stream.options import add_model_args

    e = sub.add_parser("eval", help="lip-sync, listening stillness and drift of a talking-head video")
    e.add_argument("video", help="an MP4 (or any video PyAV reads) with its speech track")
    e.add_argument("--audio", default=None, help="use this audio instead of the video's own track")
    e.add_argument("--json", action="store_true", help="print one JSON line")
    e.add_argument("--keep-signal", action="store_true", help="include the per-frame mouth signal in the JSON")
    e.add_argument("--grid", default=None, metavar="PNG",
                   help="also write every 2nd frame of 1 s of speech and 1 s of silence, with the judge's landmarks")
    add_judge_args(e)
    e.set_defaults(fn=cmd_eval)

    m = sub.add_parser("eval-model", help="student (and teacher) vs ground truth on held-out synthetic clips, "
                                          "and drift over a long stream")
    add_model_args(m, steps=False)  # --seed: the held-out split's and the generation's
    m.add_argument("--data", default="runs/data", help="the synthetic data set (index.json + clip_*.npz)")
    m.add_argument("--held-out", type=float, default=0.1, help="held-out fraction (as in training)")
    m.add_argument("--held-out-json", default=None, help="a held_out.json written by a training stage")
    m.add_argument("--all-clips", action="store_true",
                   help="evaluate every clip of --data: a set no training stage saw, e.g. new identities from "
                        "`data synth --seed 7`")
    m.add_argument("--n", type=int, default=8, help="held-out clips to evaluate")
    m.add_argument("--long-seconds", type=float, default=120.0, help="length of the drift stream (0: skip)")
    m.add_argument("--teacher", default=None, metavar="MODULE:FACTORY[:KEY=VALUE,...]",
                   help="FACTORY(avatar, **KEY=VALUE) -> callable(portrait, audio) -> frames, to add the teacher's "
                        "figures, e.g. talkingmachines.eval.teacher_video:factory:steps=8,cfg_audio=2")
    m.add_argument("--vae", default=None, metavar="DIR",
                   help="judge this TinyVAE folder's round trip instead (ground truth and VAE columns only: no student)")
    m.add_argument("--json", action="store_true", help="print one JSON line")
    m.add_argument("--out", default=None, help="also write the full report as JSON here")
    m.add_argument("--card", default=None, help="fill the metrics section of this model card (card.md)")
    add_judge_args(m)
    m.set_defaults(fn=cmd_eval_model)
