"""Put a capacity run's files from the device call back together as model folders:
python scripts/gpu_capacity/unpack.py FILES_AT DEST -> DEST/<variant>/model (preset.json, dit/,
teacher/ where it came back, the shipped vae/), ready for `talkingmachines eval-model --model`."""
import shutil
import sys
import tarfile
from pathlib import Path

src, dest = Path(sys.argv[1]), Path(sys.argv[2])
dest.mkdir(parents=True, exist_ok=True)
with tarfile.open(src / "meta.tgz") as t:
    t.extractall(dest / "meta", filter="data")
for parts in sorted({p.name.split(".part")[0] for p in src.glob("*.part*")}):
    v, sub = parts.rsplit("_", 1)
    m = dest / v / "model"
    (m / sub).mkdir(parents=True, exist_ok=True)
    blob = b"".join(p.read_bytes() for p in sorted(src.glob(f"{parts}.part*"), key=lambda p: int(p.suffix[5:])))
    (m / sub / "model.safetensors").write_bytes(blob)
    (m / sub / "config.json").write_bytes((dest / "meta" / v / "model" / sub / "config.json").read_bytes())
    shutil.copy(dest / "meta" / v / "model" / "preset.json", m / "preset.json")
    if not (m / "vae").exists():
        shutil.copytree(Path(__file__).resolve().parents[2] / "src/talkingmachines/weights/tiny/vae", m / "vae")
    print(f"{m}/{sub}: {len(blob) / 1e6:.1f} MB")
