"""Import one of the repository's scripts (not a package module) by its path under the repo root."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).parents[1]


def load_script(relpath: str):
    """The module at ``ROOT/relpath`` (e.g. ``scripts/vae_grid.py``), executed once per call."""
    path = ROOT / relpath
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
