"""The evaluation plots (matplotlib, Agg: files only, no display needed)."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from var_ssg.common.files import atomic_path


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")


def plot_spectrum(path: str, ratios: Dict[str, np.ndarray], deltas: Dict[str, np.ndarray],
                  nyquists: Sequence[float], title: str = "") -> None:
    """Panel 1: radial amplitude ratio per frequency bin (one line per ratio).
    Panel 2: latent ΔlogMagnitude per bin, one colour per scale k (k−1 → k), solid for the
    first entry of `deltas`, dashed for the second; dotted verticals at each scale's Nyquist."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for label, r in ratios.items():
        ax1.plot(np.arange(len(r))[1:], r[1:], label=label)           # bin 0 is the removed mean
    ax1.axhline(1.0, color="grey", lw=0.8)
    ax1.set(xlabel="spatial frequency (cycles per image)", ylabel="amplitude ratio", yscale="log",
            title="radial amplitude spectrum ratio")
    ax1.legend(fontsize=8)
    cmap = plt.get_cmap("viridis")
    styles = ["-", "--"]
    for (label, d), ls in zip(deltas.items(), styles):
        K1 = d.shape[0]
        for k in range(1, K1 + 1):
            ax2.plot(np.arange(d.shape[1]), d[k - 1], ls, color=cmap((k - 1) / max(K1 - 1, 1)), lw=1.2,
                     label=f"k={k}" if ls == "-" else None)
    for k, nq in enumerate(nyquists):
        if k >= 1:
            ax2.axvline(nq, color=cmap((k - 1) / max(len(nyquists) - 2, 1)), ls=":", lw=0.9)
    ax2.axhline(0.0, color="grey", lw=0.8)
    names = " / ".join(f"{ls} {lab}" for lab, ls in zip(deltas, ["solid", "dashed"]))
    ax2.set(xlabel="latent frequency (cycles per latent width); dotted: scale k's Nyquist pn_k/2",
            ylabel="Δ log magnitude (scale k − scale k−1)", title=f"latent spectrum change per scale ({names})")
    ax2.legend(fontsize=7, ncol=3)
    if title:
        fig.suptitle(title, fontsize=9)
    _save(fig, path)
    plt.close(fig)


def plot_sweep(path: str, rows: List[Dict], metric: Optional[str], title: str = "") -> None:
    """Top: `metric` per beta schedule, one line per DSE transform, each point labelled with its
    latency (metric None: no reference was given, the panel says so). Bottom: seconds per image."""
    plt = _pyplot()
    schedules = list(dict.fromkeys(r["beta"] for r in rows))
    transforms = list(dict.fromkeys(r["dse"] for r in rows))
    x = np.arange(len(schedules))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6.0, 1.4 * len(schedules) + 3), 7), sharex=True,
                                   gridspec_kw={"height_ratios": [2, 1]})
    width = 0.8 / len(transforms)
    for j, t in enumerate(transforms):
        pts = {r["beta"]: r for r in rows if r["dse"] == t}
        lat = [pts[s]["s_per_img"] if s in pts else 0.0 for s in schedules]
        ax2.bar(x + (j - (len(transforms) - 1) / 2) * width, lat, width, label=f"dse={t}")
        if metric is None:
            continue
        ys = [pts[s].get(metric) if s in pts else None for s in schedules]
        ax1.plot(x, [np.nan if y is None else y for y in ys], "o-", label=f"dse={t}")
        for xi, y, s_img in zip(x, ys, lat):
            if y is not None:
                ax1.annotate(f"{s_img:.2f} s/img", (xi, y), fontsize=7, textcoords="offset points",
                             xytext=(4, 4 + 10 * j))        # transforms at one point: labels stacked
    if metric is None:
        ax1.text(0.5, 0.5, "no --ref: metrics not computed", ha="center", va="center", transform=ax1.transAxes)
    else:
        ax1.legend(fontsize=8)
    label = f"{metric} (8x8 pixel features: NOT FID)" if metric and metric.endswith("_pixels") else metric
    ax1.set(ylabel=label or "", title=title or f"{metric} per SSG beta schedule")
    ax2.set(ylabel="seconds per image", xlabel="beta schedule")
    ax2.legend(fontsize=8)
    ax2.set_xticks(x, schedules, rotation=20, fontsize=8)
    _save(fig, path)
    plt.close(fig)
