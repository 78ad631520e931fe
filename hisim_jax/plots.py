"""Figures. Matplotlib with the non-interactive Agg backend: no display needed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hisim_jax.files import write_atomic


def predicted_vs_measured(
    measured_ms: np.ndarray,
    predicted_ms: np.ndarray,
    groups: np.ndarray | None,
    path: str | Path,
    title: str = "",
) -> Path:
    """Log-log scatter of predicted against measured step times, coloured by group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 6), dpi=120)
    labels = np.asarray(groups) if groups is not None else np.full(len(measured_ms), "all")
    for g in sorted(set(labels.tolist())):
        sel = labels == g
        ax.scatter(measured_ms[sel], predicted_ms[sel], s=14, alpha=0.8, label=str(g))
    lo = float(min(measured_ms.min(), predicted_ms.min())) * 0.8
    hi = float(max(measured_ms.max(), predicted_ms.max())) * 1.25
    xs = np.array([lo, hi])
    ax.plot(xs, xs, "k-", lw=0.8, label="exact")
    ax.plot(xs, xs * 1.1, "k:", lw=0.6, label="±10%")
    ax.plot(xs, xs / 1.1, "k:", lw=0.6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("measured step (ms)")
    ax.set_ylabel("predicted step (ms)")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(True, which="both", alpha=0.2)
    fig.tight_layout()
    try:
        return write_atomic(path, fig.savefig)
    finally:
        plt.close(fig)


def cdf_comparison(
    series: list[tuple[str, np.ndarray, np.ndarray, str]],
    path: str | Path,
    title: str = "",
    xlabel: str = "ms",
) -> Path:
    """Cumulative distributions, measured (solid) against predicted (dashed), one colour per
    stage: ``(label, x, fraction, "measured"|"predicted")`` each. Writes ``path`` directly (the
    caller moves it into place, e.g. through ``files.write_files_atomic``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    colours: dict[str, str] = {}
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    positive = [float(np.min(x[x > 0])) for _, x, _, _ in series if np.any(x > 0)]
    for label, x, frac, side in series:
        stage = label.split(" measured")[0].split(" predicted")[0]
        colour = colours.setdefault(stage, palette[len(colours) % len(palette)])
        style = "-" if side == "measured" else "--"
        if "published" in label:  # a few percentile points: join them, do not step
            ax.plot(x, frac, ls=style, color=colour, lw=1.2, marker=".", ms=3, label=label)
        else:
            ax.step(x, frac, where="post", ls=style, color=colour, lw=1.2, label=label)
    if positive:
        ax.set_xscale("log")
    ax.set_ylim(0, 1.01)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of requests")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(True, which="both", alpha=0.2)
    fig.tight_layout()
    try:
        fig.savefig(path)
        return path
    finally:
        plt.close(fig)
