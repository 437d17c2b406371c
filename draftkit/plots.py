"""PNG plots (matplotlib is an optional extra: ``pip install draftkit[plot]``)."""

from __future__ import annotations

from pathlib import Path

from draftkit.errors import InvalidInputError


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InvalidInputError("plots need matplotlib: pip install 'draftkit[plot]'") from None
    return plt


def require_matplotlib() -> None:
    """Fail before any work when a plot is asked for and matplotlib is missing (one line, exit 2)."""
    _pyplot()


def plot_block_distances(report: dict, path: str | Path) -> Path:
    """Angular distance per start layer, the dropped block marked."""
    plt = _pyplot()
    dist = report["block_distances"]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=120)
    ax.plot([d["start"] for d in dist], [d["distance"] for d in dist], marker="o")
    if report.get("method") == "angular":
        start = min(report["dropped_layers"])
        ax.axvline(start, color="tab:red", linestyle="--", label=f"dropped {start}-{max(report['dropped_layers'])}")
        ax.legend()
    n = dist[0]["end"] - dist[0]["start"] + 1
    return _save(plt, fig, ax, path, title=f"{n}-layer blocks", xlabel="first layer of the block",
                 ylabel="angular distance")


def plot_series(values: list[float], path: str | Path, *, title: str, xlabel: str, ylabel: str) -> Path:
    """A simple bar chart of one value per index (e.g. per-layer sparsity)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=120)
    ax.bar(range(len(values)), values)
    return _save(plt, fig, ax, path, title=title, xlabel=xlabel, ylabel=ylabel)


def _save(plt, fig, ax, path: str | Path, *, title: str, xlabel: str, ylabel: str) -> Path:
    """Label the axes, title the figure and write it as a PNG (creating the folder)."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_search(report: dict, path: str | Path) -> Path:
    """A search's candidates: MAL at k against the draft's measured per-token cost c, with lines of equal
    predicted speedup ``S = MAL / (k c + v(k))`` (the cost model at the median measured ``v(k)``)."""
    plt = _pyplot()
    k, v_k = report["k"], report.get("v_k") or 1.0
    rows = [r for r in report["candidates"] if r.get("mal_per_step") is not None and r.get("c") is not None]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    top_c = max([r["c"] for r in rows] + [0.1]) * 1.15
    xs = [top_c * i / 50 for i in range(51)]
    for s in (1.0, 1.5, 2.0, 3.0, 4.0):
        ys = [s * (k * x + v_k) for x in xs]
        if min(ys) <= k + 1:
            ax.plot(xs, ys, color="grey", linewidth=0.7, linestyle=":")
            i = max(j for j, y in enumerate(ys) if y <= k + 1)
            ax.annotate(f"{s:g}x", (xs[i], ys[i]), fontsize=7, color="grey")
    for r in rows:
        ax.scatter([r["c"]], [r["mal_per_step"]], s=36 if r.get("frontier") else 14,
                   color="tab:red" if r["name"] == report.get("best") else ("tab:blue" if r.get("frontier") else "tab:grey"))
        ax.annotate(r["name"], (r["c"], r["mal_per_step"]), textcoords="offset points", xytext=(4, 3), fontsize=6)
    ax.set_ylim(1, k + 1.2)
    ax.set_xlim(0, top_c)
    ax.grid(alpha=0.3)
    return _save(plt, fig, ax, path, title=f"draft candidates for {Path(str(report['target'])).name} (k = {k})",
                 xlabel="draft cost per token c (target one-token forwards, measured)",
                 ylabel=f"MAL at k = {k}")
