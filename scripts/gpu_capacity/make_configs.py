"""Write $KIT/cfg_<variant>.json (KIT default .gpukit): the shipped face recipe (tiny-face.json) continued from the
shipped teacher for STEPS more steps at lr 3e-4 cosine, with the DiT at <layers> blocks
(grown from 6: weights.grow_depth), then ODE (96 pairs, 400 steps) and export."""
import json
import os
import sys
from pathlib import Path

KIT = Path(os.environ.get("KIT", ".gpukit"))
steps = int(sys.argv[1])
base = json.loads(Path("src/talkingmachines/configs/tiny-face.json").read_text())
base.pop("_comment")
for name, layers in (("ctrl6", 6), ("d10", 10), ("d14", 14)):
    c = json.loads(json.dumps(base))
    c["_comment"] = f"capacity lever: shipped teacher grown to {layers} blocks, +{steps} teacher steps lr 3e-4 cosine"
    c["preset_overrides"]["dit"]["num_layers"] = layers
    c["teacher"].update(steps=steps, init_from="src/talkingmachines/weights/tiny/teacher", lr_schedule="cosine",
                        ckpt_every=max(100, steps // 8))
    c["synth"]["video"] = False
    if os.environ.get("ODE_PAIRS"):  # dry runs on a CPU
        c["ode"].update(ode_pairs=int(os.environ["ODE_PAIRS"]), steps=int(os.environ["ODE_TRAIN_STEPS"]))
    (KIT / f"cfg_{name}.json").write_text(json.dumps(c, indent=1))
print("steps", steps)
