"""Plots and tables for run folders and reports (matplotlib Agg backend; no display needed)."""

from __future__ import annotations

import csv
import io

import numpy as np

from . import storage


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, uri: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    storage.write_bytes(uri, buf.getvalue())


def read_csv(uri: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(storage.read_bytes(uri).decode())))


def plot_loss(metrics_uri: str, png_uri: str) -> None:
    """Training loss and validation loss against step."""
    rows = read_csv(metrics_uri)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [int(r["step"]) for r in rows]
    ax.plot(steps, [float(r["loss"]) for r in rows], label="train loss", alpha=0.7)
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r.get("val_loss")]
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss (fixed sigmas, EMA)")
    ax.set_xlabel("step")
    ax.set_ylabel("lambda-weighted EDM loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, png_uri)


def plot_stem_bars(rows: list[dict], stems, png_uri: str, title: str = "SI-SDRi (dB)") -> None:
    """Grouped bars: one group per stem (+ all), one bar per row (sampler config)."""
    plt = _plt()
    labels = list(stems) + ["all"]
    fig, ax = plt.subplots(figsize=(1.4 * len(labels) + 2, 3.5))
    width = 0.8 / max(1, len(rows))
    for i, row in enumerate(rows):
        vals = [row["si_sdri"].get(s, np.nan) for s in labels]
        ax.bar(np.arange(len(labels)) + i * width, vals, width, label=row.get("name", str(i)))
    ax.set_xticks(np.arange(len(labels)) + width * (len(rows) - 1) / 2, labels)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylabel("dB")
    ax.set_title(title)
    ax.legend(fontsize=8)
    _save(fig, png_uri)


def plot_nfe(points: list[tuple[float, float, str]], png_uri: str) -> None:
    """SI-SDRi against number of model evaluations, one point per trial/config. Labelled points
    (named configs) are numbered on the plot and named in a key beside it, so labels of points
    close together do not overwrite each other."""
    plt = _plt()
    named = [p for p in points if p[2]]
    fig, ax = plt.subplots(figsize=(9.5 if named else 5.5, 3.5))
    top = max((p[1] for p in points), default=0.0)
    floor = top - 30.0  # diverged samplers (-60 dB) would flatten the interesting part
    key = []
    for nfe, score, label in points:
        if score < floor:  # off scale: drawn on the floor as a downward triangle
            ax.scatter(nfe, floor, s=25, marker="v", color="grey")
            continue
        ax.scatter(nfe, score, s=25, color="C3" if label else "C0")  # labelled: named configs
        if label:
            key.append(f"{len(key) + 1}  {label} ({score:.2f} dB, {nfe:g} NFE)")
            ax.annotate(str(len(key)), (nfe, score), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    if key:
        if len(named) < len(points):
            key.append("(blue: the sweep's trials)")
        fig.subplots_adjust(left=0.08, right=0.5)
        fig.text(0.52, 0.88, "\n".join(key), fontsize=7, va="top", family="monospace")
    ax.set_xscale("log")
    ax.set_xlabel("NFE (model evaluations per chunk)")
    ax.set_ylabel("SI-SDRi (dB)")
    ax.grid(alpha=0.3)
    _save(fig, png_uri)


def plot_separation(mixture, stems, estimates, names, sample_rate: int, png_uri: str) -> None:
    """Waveforms and spectrograms of a mixture, its reference stems and the estimates."""
    plt = _plt()
    n = len(names) + 1
    fig, axes = plt.subplots(n, 3, figsize=(12, 1.7 * n), squeeze=False)
    t = np.arange(len(mixture)) / sample_rate
    rows = [("mixture", mixture, None)] + [(s, stems[i], estimates[i]) for i, s in enumerate(names)]
    top = 10 * np.log10(np.mean(np.asarray(mixture, np.float64) ** 2) * 512 + 1e-12)
    for r, (name, ref, est) in enumerate(rows):
        axes[r, 0].plot(t, ref, lw=0.4, color="k", label="reference")
        if est is not None:
            axes[r, 0].plot(t, est, lw=0.4, color="C1", alpha=0.8, label="estimate")
        axes[r, 0].set_ylabel(name)
        for c, sig in ((1, ref), (2, est if est is not None else ref)):
            with np.errstate(divide="ignore"):  # a silent stem: -inf dB bins draw as the floor
                axes[r, c].specgram(sig + 1e-9, Fs=sample_rate, NFFT=512, noverlap=384,
                                    cmap="magma", vmin=top - 90, vmax=top + 10)  # one 100 dB range
            axes[r, c].set_ylim(0, min(8000, sample_rate / 2))
    axes[0, 0].legend(fontsize=7, loc="upper right")
    axes[0, 1].set_title("reference spectrogram")
    axes[0, 2].set_title("estimate spectrogram")
    fig.tight_layout()
    _save(fig, png_uri)


def markdown_table(rows: list[dict], stems) -> str:
    head = "| config | " + " | ".join(list(stems) + ["all"]) + " | windows | NFE | seconds |"
    sep = "|" + "---|" * (len(stems) + 5)
    lines = [head, sep]
    for r in rows:
        vals = " | ".join(f"{r['si_sdri'][s]:.2f}" for s in list(stems) + ["all"])
        lines.append(f"| {r.get('name', '')} | {vals} | {r['windows']} | {r['nfe']} | "
                     f"{r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"
