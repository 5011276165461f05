"""Mixtures for the demo and its report folder: REPORT.md, pictures and audio (no Ray)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import yaml

from msdm.audio import read_audio, write_audio
from msdm.data import batch_to_tensor
from msdm.metrics import si_sdr

from .report import markdown_table, plot_nfe, plot_separation, read_csv

STEMS = ("bass", "drums", "guitar", "piano")


def track_stems(split_dir: Path) -> dict[str, np.ndarray]:
    """{track_id: [S, T]} from a prepared split, chunks concatenated in order."""
    table = pq.read_table(str(split_dir)).sort_by([("track_id", "ascending"),
                                                   ("chunk_index", "ascending")])
    ids = np.array(table.column("track_id").to_pylist())
    x = batch_to_tensor(table).numpy()
    return {t: np.concatenate(list(x[ids == t]), axis=-1) for t in sorted(set(ids))}


def write_mixtures(split_dir: Path, out: Path, count: int, sample_rate: int = 22050) -> list:
    """Mixtures (sum of the four target stems) of the first `count` tracks, as wav files."""
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for track, stems in list(track_stems(split_dir).items())[:count]:
        write_audio(out / f"{track}.wav", stems.sum(0), sample_rate)
        names.append(track)
    return names


def build_report(out: Path, minutes: float) -> Path:
    rep = out / "report"
    (rep / "audio").mkdir(parents=True, exist_ok=True)
    results = json.loads((out / "eval" / "results.json").read_text())
    shutil.copy(out / "runs" / "demo" / "loss.png", rep / "loss.png")
    shutil.copy(out / "eval" / "si_sdri.png", rep / "si_sdri.png")
    trials = read_csv(str(out / "sweeps" / "demo" / "trials.csv"))
    points = [(float(t["nfe"]), float(t["si_sdri"]), "") for t in trials]
    points += [(r["nfe"], r["si_sdri"]["all"], r["name"]) for r in results["configs"]]
    plot_nfe(points, str(rep / "si_sdri_vs_nfe.png"))
    # one separated test mixture against its reference stems
    refs = track_stems(out / "prepared" / "test")
    track = sorted(p.name for p in (out / "separated").iterdir() if p.is_dir())[0]
    ref = refs[track]
    est = np.stack([read_audio(out / "separated" / track / f"{s}.wav")[0][0] for s in STEMS])
    n = min(ref.shape[-1], est.shape[-1])
    ref, est = ref[:, :n], est[:, :n]
    seg = slice(0, min(n, 22050 * 6))
    plot_separation(ref.sum(0)[seg], ref[:, seg], est[:, seg], STEMS, 22050,
                    str(rep / "separation.png"))
    import torch

    track_sdr = si_sdr(torch.from_numpy(est), torch.from_numpy(ref)).numpy()
    mix_sdr = si_sdr(torch.from_numpy(np.repeat(ref.sum(0, keepdims=True), 4, 0)),
                     torch.from_numpy(ref)).numpy()
    write_audio(rep / "audio" / f"{track}_mixture.wav", ref.sum(0), 22050)
    for i, s in enumerate(STEMS):
        write_audio(rep / "audio" / f"{track}_{s}_estimate.wav", est[i], 22050)
        write_audio(rep / "audio" / f"{track}_{s}_reference.wav", ref[i], 22050)
    best = yaml.safe_load((out / "sweeps" / "demo" / "best.yaml").read_text())
    lines = [
        "# msdm demo report", "",
        f"Generated data -> prepare -> train (tiny preset) -> Tune -> evaluate -> separate, on a "
        f"local Ray cluster, in {minutes:.1f} min.", "",
        "## Separation quality (windowed SI-SDRi, dB; test split)", "",
        markdown_table(results["configs"], STEMS),
        "`checkpoint sampler` is the preset's own sampler, `paper` the paper's Euler 150 x 2, "
        "`best` the best of the Tune sweep.", "",
        "![SI-SDRi per stem](si_sdri.png)", "",
        "## Training", "", "![loss curve](loss.png)", "",
        "## Sampler sweep", "",
        f"{len(trials)} trials; best settings: `{json.dumps(best)}`", "",
        "![SI-SDRi vs NFE](si_sdri_vs_nfe.png)", "",
        f"## One separation: {track}", "",
        "| stem | SI-SDR of the estimate | SI-SDR of the mixture | improvement |",
        "|---|---|---|---|",
        *[f"| {s} | {track_sdr[i]:.2f} | {mix_sdr[i]:.2f} | {track_sdr[i] - mix_sdr[i]:.2f} |"
          for i, s in enumerate(STEMS)], "",
        "![waveforms and spectrograms](separation.png)", "",
        "Audio: `audio/` holds the mixture, the reference stems and the estimates.", "",
        "The tiny preset is a ~0.14 M-parameter smoke-test model: expect modest numbers. The "
        "quality benchmark (`make bench-quality`) trains the `small` preset for ~30 min.",
    ]
    (rep / "REPORT.md").write_text("\n".join(lines) + "\n")
    return rep / "REPORT.md"
