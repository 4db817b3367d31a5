"""Loss curves of a training run (PNG, written atomically)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..fileio import atomic_write


def plot_history(history: list[dict], path: Path, title: str) -> None:
    """One panel per metric (log scale when positive); raw and running mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = []
    for h in history:
        for k, v in h.items():
            if k not in ("step", "group", "lr", "time") and isinstance(v, (int, float)) and k not in keys:
                keys.append(k)
    keys = keys[:9]
    if not keys:
        return
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), dpi=100, squeeze=False)
    for ax, k in zip(axes.flat, keys):
        pts = [(h["step"], h[k]) for h in history if k in h and math.isfinite(h[k])]
        if not pts:
            continue
        s = np.array([p[0] for p in pts])
        v = np.array([p[1] for p in pts])
        ax.plot(s, v, lw=0.6, alpha=0.4)
        w = max(1, len(v) // 40)
        if w > 1:
            ax.plot(s[w - 1:], np.convolve(v, np.ones(w) / w, mode="valid"), lw=1.5)
        if (v > 0).all():
            ax.set_yscale("log")
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)

