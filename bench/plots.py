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


def plot_goodput(sweeps: dict[str, list[dict]], path: str, subtitle: str = "",
                 threshold: float = 0.9) -> None:
    """A rate sweep per server: SLO attainment (left axis, the 90% line) and goodput
    (right axis, dashed) against the arrival rate; the knee of each marked."""
    from blockserve.bench.goodput import knee_of

    title = "SLO attainment and goodput against arrival rate"
    plt, fig, ax = _axes(title + (f"\n{subtitle}" if subtitle else ""),
                         "arrival rate (requests / s)", "share of requests meeting the SLO")
    ax2 = ax.twinx()
    ax2.set_ylabel("goodput (good requests / s)")
    ax.axhline(threshold, color="grey", linestyle=":", label=f"{threshold:.0%}")
    for i, (label, pts) in enumerate(sweeps.items()):
        color = f"C{i}"
        pts = sorted(pts, key=lambda p: p["rate"])
        rates = [p["rate"] for p in pts]
        ax.plot(rates, [p["attainment"] for p in pts], marker="o", color=color,
                label=f"{label}: attainment")
        ax2.plot(rates, [p["goodput_per_s"] for p in pts], marker="s", linestyle="--",
                 color=color, label=f"{label}: goodput")
        k = knee_of(pts, threshold)
        if k is not None:
            ax.axvline(k["rate"], color=color, alpha=0.4)
            ax.annotate(f"knee {k['rate']:g}/s", (k["rate"], threshold), color=color,
                        xytext=(-52, -14), textcoords="offset points", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax2.set_ylim(bottom=0)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
