"""PNG plots of load-generator runs (matplotlib, imported only when plotting)."""

from __future__ import annotations

from blockserve.bench.client import Record


def _axes(title: str, xlabel: str, ylabel: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    return plt, fig, ax


def _save(plt, fig, ax, path: str) -> None:
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ttft_cdf(series: dict[str, list[Record]], path: str) -> None:
    plt, fig, ax = _axes("Time to first token, CDF", "TTFT (s)", "fraction of requests")
    for label, recs in series.items():
        xs = sorted(r.ttft for r in recs if r.ttft is not None)
        if xs:
            ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=label)
    _save(plt, fig, ax, path)


def plot_sweep(points: dict[str, list[tuple[int, float]]], path: str) -> None:
    plt, fig, ax = _axes("Throughput against concurrency", "concurrency", "output tokens / s")
    for label, pts in points.items():
        ax.plot([c for c, _ in pts], [v for _, v in pts], marker="o", label=label)
    _save(plt, fig, ax, path)
