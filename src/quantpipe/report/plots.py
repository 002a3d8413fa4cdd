"""The report's two PNG plots (matplotlib, Agg backend: no display needed): size vs ΔPPL with its
95 % interval and the Pareto front marked, and decode tokens/s per format (CPU, and GPU per
shape where present).
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from quantpipe.names import Metric, Tag  # noqa: E402


def size_vs_delta_ppl(rows: list[dict], front: list[dict], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    on_front = {r["run_id"] for r in front}
    for r in rows:
        m = r["metrics"]
        if Metric.SIZE_MB not in m or Metric.DELTA_PPL_PCT not in m:
            continue
        color = "tab:green" if r["gate"] == "passed" else "tab:red"
        if "delta_ppl_ci95_low" in m and "delta_ppl_ci95_high" in m:  # 95 % interval
            ax.vlines(m["size_mb"], m["delta_ppl_ci95_low"], m["delta_ppl_ci95_high"],
                      color=color, alpha=0.6, linewidth=2, zorder=2)
        ax.scatter(m["size_mb"], m["delta_ppl_pct"], s=60, color=color, zorder=3,
                   edgecolors="black" if r["run_id"] in on_front else "none", linewidths=1.5)
        ax.annotate(r["name"], (m[Metric.SIZE_MB], m[Metric.DELTA_PPL_PCT]),
                    textcoords="offset points", xytext=(5, 5), fontsize=8)
    if front:
        ax.step([r["metrics"][Metric.SIZE_MB] for r in front],
                [r["metrics"][Metric.DELTA_PPL_PCT] for r in front], where="post", color="black",
                linestyle="--", linewidth=1, label="Pareto front (smaller and closer to FP16)")
        ax.legend(fontsize=8)
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel("ΔPPL vs FP16 (%)")
    ax.set_title("Size vs quality, 95 % intervals (green: passes the gate, red: fails)")
    ax.grid(alpha=0.3)
    return save(fig, path)


def decode_speed(cpu: list[dict], gpu: list[dict], path: Path) -> Path:
    panels = [("CPU", cpu)] + [(f"GPU {s}", [g for g in gpu if g["tags"].get(Tag.SHAPE, "?") == s])
                               for s in sorted({g["tags"].get(Tag.SHAPE, "?") for g in gpu})]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 + 3 * len(panels), 4), dpi=120,
                             squeeze=False)
    for ax, (title, rows) in zip(axes[0], panels):
        rows = [r for r in rows if Metric.DECODE_TOK_S in r["metrics"]]
        speeds = [r["metrics"][Metric.DECODE_TOK_S] for r in rows]
        ax.bar([r["name"] for r in rows], speeds, color="tab:blue")
        for i, v in enumerate(speeds):
            ax.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
        ax.set_title(f"decode tokens/s, {title}")
        ax.tick_params(axis="x", rotation=30, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    return save(fig, path)


def save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
