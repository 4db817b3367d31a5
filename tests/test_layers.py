"""Imports run one way: model <- diffusion <- pipeline <- stream <- face_align <- train, eval, serve <- cli.
(`pipeline` and `stream` are one level of the picture in docs/architecture.md; the engine uses
the pipeline, never the other way.)

Read from the source (ast), every import of every module, the ones inside functions too. A
module may import its own package, any lower layer and the leaf modules; leaves import only
leaves. docs/architecture.md draws the same picture."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "talkingmachines"

# modules anything may import (they hold no engine, model or training logic)
LEAVES = {"config", "configs", "devices", "errors", "fileio", "media", "audio_io", "dataset"}
# bottom to top; units on one line are siblings and do not import each other
LAYERS = [{"model"}, {"diffusion"}, {"pipeline"}, {"stream"}, {"face_align"}, {"train", "eval", "serve"}, {"cli"},
          {"__main__"}]
# (importer, imported) pairs allowed against the rule, each with its reason
EXCEPTIONS = {
    ("eval.mouth", "train.synth"): "the synthetic face's mouth geometry (mouth_roi_from_face, clip_box) is the "
                                     "renderer's, and eval measures synthetic clips with it",
    ("eval.runners", "train.synth"): "the synthetic face's skin band (skin_band) is the renderer's colour model, and "
                                       "eval pools its figures per band",
    ("face_align", "eval.face_judge"): "a photo's landmarks are read with the face judge's own model, so the photo and "
                                       "the template (measured by the judge on training faces) are read alike",
}


def _modules():
    for f in sorted(PKG.rglob("*.py")):
        parts = list(f.relative_to(PKG).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        yield (parts[:-1] if is_pkg else parts), (parts[:-1] if is_pkg else parts[:-1]), f


def _imports(package: list[str], f: Path):
    """Every talkingmachines module `f` imports, as a path without 'talkingmachines'."""
    for n in ast.walk(ast.parse(f.read_text(), str(f))):
        if isinstance(n, ast.Import):
            yield from (a.name.split(".")[1:] for a in n.names if a.name.split(".")[0] == "talkingmachines")
        elif isinstance(n, ast.ImportFrom):
            if n.level:
                mod = package[: len(package) - (n.level - 1)] + (n.module.split(".") if n.module else [])
            elif (n.module or "").split(".")[0] == "talkingmachines":
                mod = n.module.split(".")[1:]
            else:
                continue
            for a in n.names:  # `from .. import pipeline` imports a module; `from ..x import y` names in x
                sub = PKG.joinpath(*mod, a.name)
                yield mod + [a.name] if sub.with_suffix(".py").is_file() or sub.is_dir() else mod


def _layer(unit: str) -> int | None:
    return next((i for i, units in enumerate(LAYERS) if unit in units), None)


def test_every_module_has_a_place():
    units = {parts[0] for parts, _, _ in _modules() if parts}
    assert units == LEAVES | set().union(*LAYERS), units ^ (LEAVES | set().union(*LAYERS))


def test_imports_run_one_way():
    bad, used = [], set()
    for parts, package, f in _modules():
        if not parts:
            continue
        me = ".".join(parts)
        for mod in _imports(package, f):
            them = ".".join(mod)
            src, dst = parts[0], mod[0]
            if src in LEAVES:
                ok = dst in LEAVES
            else:
                ok = dst == src or dst in LEAVES or (_layer(dst) is not None and _layer(dst) < _layer(src))
            if ok:
                continue
            key = next((k for k in EXCEPTIONS if me == k[0] and (them == k[1] or them.startswith(k[1] + "."))), None)
            if key:
                used.add(key)
            else:
                bad.append(f"{me} -> {them}")
    assert not bad, "imports against the layering (see this test's docstring):\n" + "\n".join(sorted(set(bad)))
    assert used == set(EXCEPTIONS), f"exceptions no longer needed: {set(EXCEPTIONS) - used}"


def test_the_rule_catches_upward_and_sideways_imports(tmp_path, monkeypatch):
    """The checker itself: an upward and a sideways import are found."""
    pkg = tmp_path / "talkingmachines"
    for name, text in {"model/dit.py": "from ..stream import generator\n",
                       "train/x.py": "from ..eval.bench import run\n",
                       "stream/generator.py": "from ..model.dit import AudioDiT\nfrom .. import pipeline\n",
                       "pipeline.py": "", "eval/bench.py": "", "config.py": "from .model import dit\n"}.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    monkeypatch.setattr(__import__(__name__), "PKG", pkg)
    try:
        test_imports_run_one_way()
    except AssertionError as e:
        msg = str(e)
    else:
        raise AssertionError("the checker passed a tree with bad imports")
    assert "model.dit -> stream.generator" in msg and "train.x -> eval.bench" in msg and "config -> model.dit" in msg
    assert "stream.generator" not in msg.replace("model.dit -> stream.generator", "")
