"""The package as users install it: a wheel, not this checkout. The training configs are package
data, so an installed copy trains with the shipped recipe, not with fallbacks."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_install_uses_the_shipped_configs(tmp_path):
    tree = tmp_path / "tree"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(tree)],
                   check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("talkingmachines-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    shutil.rmtree(tree)

    probe = ("import json, talkingmachines\n"
             "from talkingmachines import configs\n"
             "from talkingmachines.train.recipe import load_recipe, recipe_config\n"
             "tc = recipe_config('tiny-smoke').stage_config('teacher', __import__('pathlib').Path('run'))\n"
             "print(json.dumps({'package': talkingmachines.__file__, 'recipe': load_recipe(),\n"
             "                  'smoke': load_recipe('tiny-smoke'), 'names': configs.names(),\n"
             "                  'smoke_teacher': tc.to_flat_dict(),\n"
             "                  'teacher': str(configs.shipped('teacher'))}))\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    r = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert Path(got["package"]).is_relative_to(site)  # the installed copy, not the checkout
    assert Path(got["teacher"]).is_relative_to(site)

    shipped = ROOT / "src" / "talkingmachines" / "configs"
    assert got["names"] == sorted(p.stem for p in shipped.glob("*.json"))
    recipe = json.loads((shipped / "tiny-recipe.json").read_text())
    assert got["recipe"] == recipe
    smoke = json.loads((shipped / "tiny-smoke.json").read_text())
    assert got["smoke"]["teacher"]["steps"] == smoke["teacher"]["steps"]
    assert got["smoke"]["teacher"]["mouth_weight"] == recipe["teacher"]["mouth_weight"]  # merged onto the recipe
    # the typed recipe config of the installed copy: the smoke teacher's TrainConfig
    assert got["smoke_teacher"]["steps"] == smoke["teacher"]["steps"] and got["smoke_teacher"]["out"] == "run/teacher"
    assert got["smoke_teacher"]["mouth_weight"] == recipe["teacher"]["mouth_weight"]
    assert got["smoke_teacher"]["batch_size"] == smoke["common"]["batch_size"]


def test_config_names_resolve_to_the_shipped_files(tmp_path, monkeypatch):
    from talkingmachines import configs

    monkeypatch.chdir(tmp_path)
    for arg in ("tiny-smoke", "tiny-smoke.json", "configs/tiny-smoke.json"):
        assert configs.resolve(arg) == configs.DIR / "tiny-smoke.json"
    (tmp_path / "tiny-smoke.json").write_text("{}")  # a file of that name wins
    assert configs.resolve("tiny-smoke.json") == Path("tiny-smoke.json")
    assert configs.resolve("elsewhere/x.json") == Path("elsewhere/x.json")  # left to the reader's error
