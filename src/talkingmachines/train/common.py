"""Compatibility only: the training core now lives in one module per component.

`trainer` (the loop), `config` (TrainConfig), `distributed` (process group, FSDP2/DDP),
`rng` (data order, per-sample generators), `ema`, `optim` (AdamW, LR schedule, optimiser state),
`checkpoint` (atomic, verified checkpoints), `plots` (loss curves). Import from those; this
module re-exports their names for code written against the old ``train.common``.
"""

from .checkpoint import (CKPT_DIR, FINAL, LATEST, MANIFEST, checkpoint_problem, final_done,  # noqa: F401
                         full_model_state, intact_checkpoint, latest_checkpoint, load_full_model_state,
                         write_checkpoint)
from .config import TrainConfig, load_config, read_config_file  # noqa: F401
from .distributed import DistEnv, Handle, init_distributed, local_slice, parallelize  # noqa: F401
from .ema import EMA  # noqa: F401
from .optim import optimizer_from_flat, optimizer_to_flat  # noqa: F401
from .plots import plot_history  # noqa: F401
from .rng import GlobalOrder, mix_seed, randn, sample_generator  # noqa: F401
from .trainer import Group, Trainer  # noqa: F401
