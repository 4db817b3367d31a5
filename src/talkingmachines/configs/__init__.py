"""Training configs shipped with the package (package data, so an installed copy has them too).

``tiny-recipe.json`` is the recipe's defaults (`train tiny-recipe` without ``--config``, and the
base every other recipe config is merged onto); ``teacher.json``, ``ode.json`` and ``dmd.json``
are the stages' defaults; the others are earlier or smaller recipes (``--config tiny-smoke``).
The candidate recipes name ``"base": "tiny-face"`` and hold only what they change
(`train.recipe.read_recipe_file`).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError

DIR = Path(__file__).resolve().parent


def shipped(name: str) -> Path:
    """The shipped config ``name`` (``"tiny-recipe"`` or ``"tiny-recipe.json"``)."""
    p = DIR / (name if name.endswith(".json") else f"{name}.json")
    if not p.is_file():
        raise InputError(f"no shipped config {name!r} (have: {', '.join(sorted(names()))})")
    return p


def names() -> list[str]:
    return sorted(p.stem for p in DIR.glob("*.json"))


def resolve(path_or_name: str | Path) -> Path:
    """A config file: a path as given, else the shipped config of that name (``--config tiny-smoke``;
    ``configs/tiny-smoke.json``, where the configs lived before they were package data, too)."""
    p = Path(path_or_name)
    if not p.is_file() and str(p.parent) in (".", "configs") and p.with_suffix("").name in names():
        return shipped(p.name)
    return p  # a file (a missing one is reported by the reader)
