"""Figures. Matplotlib with the non-interactive Agg backend: no display needed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hisim_jax.files import write_atomic


def _save(fig, path: str | Path) -> Path:
    """Lay ``fig`` out, write it to ``path`` through a temporary file and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        return write_atomic(path, fig.savefig)
    finally:
        plt.close(fig)


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
    return _save(fig, path)


def cdf_comparison(
    series: list[tuple[str, np.ndarray, np.ndarray, str]],
    path: str | Path,
    title: str = "",
    xlabel: str = "ms",
) -> Path:
    """Cumulative distributions, measured (solid) against predicted (dashed), one colour per
    stage: ``(label, x, fraction, "measured"|"predicted")`` each."""
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
    return _save(fig, path)


def _bool_column(points, name: str) -> np.ndarray:
    """Column ``name`` of ``points`` as bools (missing values: False; no column: all False)."""
    if name not in points.columns:
        return np.zeros(len(points), dtype=bool)
    return points[name].eq(True).to_numpy(dtype=bool)


def _log_if_wide(values: np.ndarray) -> str:
    """``"log"`` for an all-positive axis spanning more than two decades, else ``"linear"``."""
    v = values[np.isfinite(values)]
    return "log" if v.size and v.min() > 0 and v.max() > 100 * v.min() else "linear"


def _note(ax, text: str) -> None:
    """A grey line of text in the middle of an empty panel."""
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=9,
            color="0.3")  # fmt: skip


def plot_search_fronts(
    points,
    fronts: list[tuple[str, str, bool, bool]],
    path: str | Path,
) -> Path:
    """One panel per ``(x_column, y_column, maximize_x, maximize_y)`` of a search's ``points``
    (a DataFrame with ``id``, ``feasible``, ``meets_slo`` and optionally ``hardware``): the
    feasible configurations in grey, those meeting the SLOs in colour by hardware, and the
    Pareto front of the SLO-meeting ones as a line with each point labelled by its id. Rows
    with NaN in either column are left out of that panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hisim_jax.search.pareto import front_order, pareto_mask

    path = Path(path)
    n = max(1, len(fronts))
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.5 * rows), dpi=120, squeeze=False)
    feasible = _bool_column(points, "feasible")
    meets = _bool_column(points, "meets_slo") & feasible
    hardware = (
        points["hardware"].astype(str).to_numpy()
        if "hardware" in points.columns
        else np.full(len(points), "meets SLOs")
    )
    ids = points["id"].astype(str).to_numpy() if "id" in points.columns else None
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colours = {h: palette[i % len(palette)] for i, h in enumerate(sorted(set(hardware[meets])))}
    for ax, (xcol, ycol, max_x, max_y) in zip(axes.flat, fronts, strict=False):
        x = points[xcol].to_numpy(dtype=np.float64)
        y = points[ycol].to_numpy(dtype=np.float64)
        shown = feasible & np.isfinite(x) & np.isfinite(y)
        good = shown & meets
        grey = shown & ~good
        ax.scatter(x[grey], y[grey], s=8, c="0.75", label="feasible, misses SLOs")
        for h, colour in colours.items():
            sel = good & (hardware == h)
            if sel.any():
                ax.scatter(x[sel], y[sel], s=14, color=colour, alpha=0.85, label=h)
        if good.any():
            rows_good = np.flatnonzero(good)
            xy = np.c_[x[rows_good], y[rows_good]]
            order = rows_good[front_order(xy, pareto_mask(xy, [max_x, max_y]))]
            ax.plot(x[order], y[order], "k-", marker="o", ms=4, lw=1.0, mfc="none", label="front")
            if ids is not None:
                for i in order:
                    ax.annotate(
                        ids[i], (x[i], y[i]), xytext=(3, 3), textcoords="offset points", fontsize=6
                    )
        else:
            _note(ax, "no configuration meets the SLOs")
        if shown.any():
            ax.set_xscale(_log_if_wide(x[shown]))
            ax.set_yscale(_log_if_wide(y[shown]))
            ax.legend(fontsize=6, loc="best")
        ax.set_xlabel(f"{xcol} ({'higher' if max_x else 'lower'} is better)")
        ax.set_ylabel(f"{ycol} ({'higher' if max_y else 'lower'} is better)")
        ax.grid(True, which="both", alpha=0.2)
    for ax in list(axes.flat)[len(fronts) :]:
        ax.set_axis_off()
    return _save(fig, path)


def plot_slo_attainment(points, path: str | Path, top: int = 40) -> Path:
    """Horizontal bars of ``slo_attainment`` (0..1) for the simulated configurations of
    ``points`` (``stage`` "halving" or "full"), best first, at most ``top`` of them, labelled
    by ``id``; those meeting the SLOs in colour. A vertical line marks ``attainment_target``
    when the frame has that column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    att = points["slo_attainment"].to_numpy(dtype=np.float64)
    simulated = points["stage"].isin(["halving", "full"]).to_numpy() & np.isfinite(att)
    rows = np.flatnonzero(simulated)
    rows = rows[np.argsort(-att[rows], kind="stable")][: max(0, top)]
    meets = _bool_column(points, "meets_slo")
    ids = points["id"].astype(str).to_numpy()
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.22 * max(len(rows), 4)), dpi=120)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ax.barh(
        np.arange(len(rows)),
        att[rows],
        color=[palette[2] if meets[i] else "0.65" for i in rows],
        height=0.7,
    )
    ax.set_yticks(np.arange(len(rows)), ids[rows], fontsize=6)
    ax.invert_yaxis()
    if "attainment_target" in points.columns:
        targets = points["attainment_target"].to_numpy(dtype=np.float64)
        for t in np.unique(targets[np.isfinite(targets)]):
            ax.axvline(t, color="k", ls="--", lw=0.8, label=f"target {t:g}")
        if np.isfinite(targets).any():
            ax.legend(fontsize=7, loc="lower right")
    if not len(rows):
        _note(ax, "no configuration was simulated")
    ax.set_xlim(0, 1.02)
    ax.set_xlabel("slo_attainment (fraction of requests within the SLOs)")
    ax.grid(True, axis="x", alpha=0.2)
    return _save(fig, path)
