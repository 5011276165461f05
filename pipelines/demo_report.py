"""Mixtures for the demo and its report folder: REPORT.md, report.html (with audio players),
pictures and audio (no Ray)."""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import yaml

from msdm.audio import read_audio, write_audio
from msdm.data import batch_to_tensor
from msdm.metrics import si_sdr

from .report import markdown_table, plot_nfe, plot_separation, read_csv

STEMS = ("bass", "drums", "guitar", "piano")
SILENT_RMS = 1e-4  # a reference stem quieter than this is "silent" in this track


def track_stems(split_dir: Path) -> dict[str, np.ndarray]:
    """{track_id: [S, T]} from a prepared split, chunks concatenated in order."""
    table = pq.read_table(str(split_dir)).sort_by([("track_id", "ascending"),
                                                   ("chunk_index", "ascending")])
    ids = np.array(table.column("track_id").to_pylist())
    x = batch_to_tensor(table).numpy()
    return {t: np.concatenate(list(x[ids == t]), axis=-1) for t in sorted(set(ids))}


def write_mixtures(split_dir: Path, out: Path, count: int, sample_rate: int) -> list:
    """Mixtures (sum of the four target stems) of the first `count` tracks, as wav files."""
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for track, stems in list(track_stems(split_dir).items())[:count]:
        write_audio(out / f"{track}.wav", stems.sum(0), sample_rate)
        names.append(track)
    return names


def _rms_db(x: np.ndarray) -> float:
    return float(20 * np.log10(np.sqrt(np.mean(np.asarray(x, np.float64) ** 2)) + 1e-12))


def stem_rows(est: np.ndarray, ref: np.ndarray) -> list[dict]:
    """Per stem: SI-SDR of the estimate and of the mixture against the reference, or, where the
    reference is silent, just the level the estimate leaked into that stem."""
    mix = np.repeat(ref.sum(0, keepdims=True), len(ref), 0)
    est_db = si_sdr(torch.from_numpy(est), torch.from_numpy(ref)).numpy()
    mix_db = si_sdr(torch.from_numpy(mix), torch.from_numpy(ref)).numpy()
    rows = []
    for i, s in enumerate(STEMS):
        silent = np.sqrt(np.mean(ref[i].astype(np.float64) ** 2)) < SILENT_RMS
        rows.append({"stem": s, "silent": bool(silent), "estimate": float(est_db[i]),
                     "mixture": float(mix_db[i]), "leak_db": _rms_db(est[i]) - _rms_db(ref.sum(0))})
    return rows


def _stem_table(rows: list[dict]) -> list[str]:
    lines = ["| stem | SI-SDR of the estimate | SI-SDR of the mixture | improvement |",
             "|---|---|---|---|"]
    for r in rows:
        if r["silent"]:
            lines.append(f"| {r['stem']} | silent in this track (estimate at "
                         f"{r['leak_db']:.1f} dB re. the mixture) | — | — |")
        else:
            lines.append(f"| {r['stem']} | {r['estimate']:.2f} | {r['mixture']:.2f} | "
                         f"{r['estimate'] - r['mixture']:.2f} |")
    return lines


def build_report(out: Path, minutes: float, sample_rate: int, preset: str) -> Path:
    rep = out / "report"
    (rep / "audio").mkdir(parents=True, exist_ok=True)
    results = json.loads((out / "eval" / "results.json").read_text())
    shutil.copy(out / "runs" / "demo" / "loss.png", rep / "loss.png")
    shutil.copy(out / "eval" / "si_sdri.png", rep / "si_sdri.png")
    trials = read_csv(str(out / "sweeps" / "demo" / "trials.csv"))
    points = [(float(t["nfe"]), float(t["si_sdri"]), "") for t in trials]
    points += [(r["nfe"], r["si_sdri"]["all"], r["name"]) for r in results["configs"]]
    plot_nfe(points, str(rep / "si_sdri_vs_nfe.png"))
    refs = track_stems(out / "prepared" / "test")  # one separated test mixture vs its stems
    track = sorted(p.name for p in (out / "separated").iterdir() if p.is_dir())[0]
    ref = refs[track]
    est = np.stack([read_audio(out / "separated" / track / f"{s}.wav")[0][0] for s in STEMS])
    n = min(ref.shape[-1], est.shape[-1])
    ref, est = ref[:, :n], est[:, :n]
    seg = slice(0, min(n, sample_rate * 6))
    plot_separation(ref.sum(0)[seg], ref[:, seg], est[:, seg], STEMS, sample_rate,
                    str(rep / "separation.png"))
    audio = {"mixture": f"audio/{track}_mixture.wav"}
    write_audio(rep / audio["mixture"], ref.sum(0), sample_rate)
    for i, s in enumerate(STEMS):
        for kind, sig in (("reference", ref[i]), ("estimate", est[i])):
            audio[f"{s} {kind}"] = f"audio/{track}_{s}_{kind}.wav"
            write_audio(rep / audio[f"{s} {kind}"], sig, sample_rate)
    rows = stem_rows(est, ref)
    best = yaml.safe_load((out / "sweeps" / "demo" / "best.yaml").read_text())
    swept = next((c for c in results["configs"] if c["name"] == "best"), results["configs"][-1])
    verdict = _verdict(swept["si_sdri"])
    lines = [
        "# msdm demo report", "",
        f"Songs played by sampled instruments (composed General MIDI through the GM SoundFont, "
        f"or your MIDI with `--midi`) -> prepare -> train (`{preset}` preset) -> Tune -> "
        f"evaluate -> separate, on a local Ray cluster, in {minutes:.1f} min.", "",
        "## Separation quality (windowed SI-SDRi, dB; held-out test songs)", "",
        markdown_table(results["configs"], STEMS),
        "`best` is the best sampler of the Tune sweep (chosen on the validation songs, never on "
        "these). The preset's own sampler and the paper's Euler 150 x 2 (300 NFE) are scored "
        "by `make bench-quality`.", "", verdict, "",
        "These are composed songs; `python benchmarks/demo_heldout.py --demo DEMO_OUT --midi "
        "DIR --excerpt 12` scores the same model and sampler on real MIDI songs (README, \"What "
        "`make demo` shows\").", "",
        "![SI-SDRi per stem](si_sdri.png)", "",
        "## Training", "", "![loss curve](loss.png)", "",
        "## Sampler sweep", "",
        f"{len(trials)} trials; best settings: `{json.dumps(best)}`", "",
        "![SI-SDRi vs NFE](si_sdri_vs_nfe.png)", "",
        f"## One separation: {track}", "", *_instruments(out, track), *_stem_table(rows), "",
        "![waveforms and spectrograms](separation.png)", "",
        "Listen: `report.html` beside this file plays the mixture, the references and the "
        "estimates; the files are in `audio/`.",
    ]
    (rep / "REPORT.md").write_text("\n".join(lines) + "\n")
    (rep / "report.html").write_text(_html(track, audio, rows, results, verdict))
    return rep / "REPORT.md"


def _instruments(out: Path, track: str) -> list[str]:
    """The track's instruments as its metadata.yaml names them (program and SoundFont preset)."""
    for root in ("slakh", "rendered"):
        for meta in (out / root).glob(f"*/{track}/metadata.yaml"):
            stems = yaml.safe_load(meta.read_text()).get("stems", {})
            played = [f"{v['midi_program_name']} ({v['plugin_name']})" for v in stems.values()
                      if v.get("audio_rendered")]
            return [f"The song's instruments (the mixture holds the bass, drums, guitar and piano "
                    f"classes; the others are left out, as in Slakh): {'; '.join(played)}.", ""]
    return []


def _verdict(scores: dict) -> str:
    worst = min(scores[s] for s in STEMS)
    ok = scores["all"] >= 6.0 and worst >= 1.0
    return (f"**{'Separation works' if ok else 'Below the demo target'}:** on songs the model "
            f"never saw, the swept sampler's SI-SDR improvement over the mixture is "
            f"{scores['all']:+.2f} dB over all stems (target ≥ +6 dB) and {worst:+.2f} dB on its "
            "weakest stem (target ≥ +1 dB on every stem).")


def _html(track: str, audio: dict, rows: list[dict], results: dict, verdict: str) -> str:
    def player(label, src):
        return (f"<tr><td>{html.escape(label)}</td><td><audio controls preload='none' "
                f"src='{html.escape(src)}'></audio></td></tr>")

    score = {r["stem"]: r for r in rows}
    body = [player("mixture", audio["mixture"])]
    for s in STEMS:
        r = score[s]
        note = "silent in this track" if r["silent"] else \
            f"SI-SDRi {r['estimate'] - r['mixture']:+.2f} dB"
        body += [player(f"{s} reference", audio[f"{s} reference"]),
                 player(f"{s} estimate ({note})", audio[f"{s} estimate"])]
    table = "".join(f"<tr><td>{html.escape(c['name'])}</td>" + "".join(
        f"<td>{c['si_sdri'][s]:.2f}</td>" for s in (*STEMS, "all")) + f"<td>{c['nfe']}</td></tr>"
        for c in results["configs"])
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>msdm demo</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}td{{padding:.2em .8em}}</style>
</head><body><h1>msdm demo</h1>
<h2>Held-out SI-SDRi (dB)</h2><table><tr><th>sampler</th>{"".join(
    f"<th>{s}</th>" for s in (*STEMS, "all"))}<th>NFE</th></tr>{table}</table>
<p>{html.escape(verdict.replace("**", ""))}</p>
<h2>Listen: {html.escape(track)}</h2><table>{"".join(body)}</table>
<p><img src="separation.png" style="max-width:100%"></p></body></html>
"""
