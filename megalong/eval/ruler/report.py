"""The suite's table (markdown) and heat-maps (PNG: task × length, needle depth × length)."""

from __future__ import annotations

from pathlib import Path


def _cell(v) -> str:
    return "—" if v is None else f"{v:.1f}"


def results_table(summary: dict) -> str:
    """Markdown: one row per task, one column per length; then the average (± standard error over
    samples), the score relative to the base length, the reference's delta, seconds per length."""
    lengths = [str(n) for n in summary["lengths"]]
    lines = ["| task | " + " | ".join(lengths) + " |", "|---|" + "---|" * len(lengths)]
    for task in summary["tasks"]:
        lines.append(f"| {task} | " + " | ".join(_cell(summary["scores"].get(n, {}).get(task)) for n in lengths)
                     + " |")
    avg = []
    for n in lengths:
        a, se = summary["average"].get(n), summary.get("average_se", {}).get(n)
        avg.append("—" if a is None else f"**{a:.1f}**" + (f" ± {se:.1f}" if se is not None else ""))
    lines.append("| **average** | " + " | ".join(avg) + " |")
    if summary.get("relative_to_base"):
        rel = summary["relative_to_base"]
        lines.append(f"| % of the average at {summary['base_length']} | "
                     + " | ".join(_cell(rel.get(n)) for n in lengths) + " |")
    ref = summary.get("reference")
    if ref:
        lines.append("| Δ vs reference | " + " | ".join(
            "—" if ref["delta"].get(n) is None else f"{ref['delta'][n]:+.1f}" for n in lengths) + " |")
    lines.append("| seconds | " + " | ".join(f"{summary['seconds'].get(n, 0):.0f}" for n in lengths) + " |")
    eff = summary["effective_length"]
    header = (f"Effective length (average ≥ {summary['threshold']} at it and at every shorter length): "
              + (f"**{eff}**" if eff else f"below {summary['lengths'][0]}")
              + f"; {summary['samples']} samples per task and length, seed {summary['seed']}, "
              + ("chat template" if summary["chat"] else "completion prompts") + ".")
    return "\n".join([header, ""] + lines)


def write_heatmaps(summary: dict, out: Path) -> list[Path]:
    """``tasks.png`` (task × length) and, when needle depths were scored, ``depth.png``; [] without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    lengths = [str(n) for n in summary["lengths"]]
    tasks = summary["tasks"] + ["average"]
    mat = np.array([[summary["scores"].get(n, {}).get(t, np.nan) if t != "average"
                     else (summary["average"].get(n) if summary["average"].get(n) is not None else np.nan)
                     for n in lengths] for t in tasks], dtype=float)
    written.append(_heatmap(plt, mat, lengths, tasks, f"task suite: {summary.get('model', '')}",
                            out / "tasks.png"))
    grid = summary.get("depth_grid") or {}
    if grid:
        depths = sorted({float(d) for row in grid.values() for d in row})
        mat = np.array([[grid.get(n, {}).get(str(d), np.nan) for n in lengths] for d in depths], dtype=float)
        labels = [f"{d:.0%}–{d + (depths[1] - depths[0] if len(depths) > 1 else 1):.0%}" for d in depths]
        written.append(_heatmap(plt, mat, lengths, labels, "single-answer needles: score by depth",
                                out / "depth.png", ylabel="needle depth"))
    return written


def _heatmap(plt, mat, xlabels, ylabels, title, path: Path, ylabel: str = "task") -> Path:
    fig, ax = plt.subplots(figsize=(2.5 + 0.9 * len(xlabels), 1.2 + 0.35 * len(ylabels)))
    im = ax.imshow(mat, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
    for i in range(mat.shape[0]):
        for j in range(mat.shape[1]):
            if mat[i, j] == mat[i, j]:
                ax.text(j, i, f"{mat[i, j]:.0f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(xlabels)), xlabels)
    ax.set_yticks(range(len(ylabels)), ylabels, fontsize=8)
    ax.set_xlabel("length (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
