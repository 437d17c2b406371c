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
