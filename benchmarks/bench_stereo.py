"""Cost of the stereo + full-band step of `pipelines.separate`: per-channel SI-SDRi of the
stereo stems at 44.1 kHz next to the mono model-rate SI-SDRi, same checkpoint, same model calls.

    python benchmarks/bench_stereo.py [--train-steps 1500 --train-minutes 12 --songs 3 --steps 20]
    python benchmarks/bench_stereo.py --config demo --ckpt demo_out/runs/demo/model.ckpt \
        --sampler-config demo_out/sweeps/demo/best.yaml      # `make demo`'s model and sampler

Songs come from `pipelines.songs` (bass, drums, guitar, piano only; drums are full band), each
stem panned with constant power to its own random position per song. The `small` preset is
trained briefly in-process (or --ckpt reuses one). Each test song is decoded twice (mono at the
model rate; stereo at 44.1 kHz): the model segments and seeds are identical, the model runs once,
and only the channel split differs (the `channels` method separates each channel: its own model
calls). A leaky oracle (true model-rate stems with a known cross-talk) can stand in for a good
model (--leaks); `make demo`'s model is a real one (first example above). Scores: SI-SDRi
over the whole song per stem, stems silent in a song are skipped; stereo rows are the mean over
the two channels, at 44.1 kHz over the full band, plus `channels` at the model rate (the
stereo step alone).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from msdm.audio import SegmentPlan, resample
from msdm.checkpoint import build_denoiser, save
from msdm.config import apply_overrides, load_config, load_sampler_yaml
from msdm.metrics import si_sdri
from msdm.training import make_ema, make_optimizer, train_step
from pipelines.assemble import Assembler
from pipelines.segments import SeparateSegments, decode_segments, split_segments
from pipelines.songs import SR, make_song, render

STEMS = ("bass", "drums", "guitar", "piano")


def song_stems(seed: int, seconds: float) -> np.ndarray:
    """[4, T] mono stems at 44.1 kHz (guitar2 joins guitar; other instruments are left out)."""
    audio = render(make_song(seed, seconds))
    n = int(seconds * SR)
    out = np.zeros((4, n))
    for role, x in audio.items():
        name = "guitar" if role == "guitar2" else role
        if name in STEMS:
            out[STEMS.index(name)] += x
    # the level of the prepared training mixtures (RMS ~0.13): Dirac separation is not
    # level-invariant, and a model meets its training level in the job too
    return out / max(np.sqrt(np.mean(out.sum(0) ** 2)), 1e-9) * 0.13


def pan(stems: np.ndarray, rng) -> np.ndarray:
    """[4, T] -> [4, 2, T]: constant-power pan, one random position per stem."""
    theta = rng.uniform(0.1, 0.9, len(stems)) * np.pi / 2
    return np.stack([np.cos(theta)[:, None] * stems, np.sin(theta)[:, None] * stems], 1) * 2**0.5


def train(cfg, steps: int, seconds: float, path: Path, minutes: float) -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    data = np.concatenate([resample(song_stems(1000 + i, seconds).astype(np.float32), SR,
                                    cfg.data.sample_rate) for i in range(24)], -1)
    den = build_denoiser(cfg)
    ema, opt = make_ema(den), make_optimizer(den, cfg)
    n, b = cfg.data.chunk_samples, cfg.train.batch_size
    t0 = time.time()
    for step in range(steps):
        if time.time() - t0 > 60 * minutes:
            break
        starts = rng.integers(0, data.shape[-1] - n, b)
        x = torch.from_numpy(np.stack([data[:, s : s + n] for s in starts]))
        loss = train_step(den, x, opt, cfg, ema=ema)
        if step % 100 == 0:
            print(f"  step {step} loss {loss:.4f} ({time.time() - t0:.0f} s)", flush=True)
    print(f"  trained {step + 1} steps in {time.time() - t0:.0f} s")
    save(path, cfg, den, ema, step=step + 1)


def leaky_oracle(true: np.ndarray, rows: list[dict], leak: float) -> list[np.ndarray]:
    """Model stand-in with a known error: per segment, the true model-rate stems true [S, (C,) T]
    with a fraction `leak` of every stem spread over the others (the sum stays the mixture,
    as with Dirac separation)."""
    out = []
    for r in rows:
        plan = json.loads(r["plan"])
        seg = SegmentPlan(plan["num_samples"], plan["segment"], plan["margin"], plan["overlap"])
        start = seg.start(int(r["seg"])) * plan["model_rate"] // plan["rate"]
        part = _span(true, start, r["mixture"].shape[-1])  # [S, (C,) segment]
        others = (part.sum(0, keepdims=True) - part) / (len(part) - 1)
        out.append(((1 - leak) * part + leak * others).astype(np.float32))
    return out


def _span(x: np.ndarray, start: int, n: int) -> np.ndarray:
    out = np.zeros(x.shape[:-1] + (n,), np.float32)
    lo, hi = max(start, 0), min(start + n, x.shape[-1])
    if hi > lo:
        out[..., lo - start : hi - start] = x[..., lo:hi]
    return out


def separate_song(path: Path, key: str, cfg, ckpt: Path, out: Path, truth=None,
                  leak: float = 0.0) -> dict:
    """{variant: stems [S, C, T]}: the mono model-rate path and the stereo paths. The mid is
    separated once for mono / mask / transfer, every channel once for `channels`; with
    truth = (mid stems [S, T], channel stems [S, C, T]) at the model rate, a leaky oracle
    replaces the model."""
    item = {"input": str(path), "key": key, "track": key, "parent": "x"}
    args = (cfg.data.sample_rate, cfg.data.chunk_samples, cfg.separation.margin,
            cfg.separation.overlap)
    rows = {"mono": list(decode_segments(item, *args, str(cfg.data.sample_rate), "mono")),
            "mid": list(decode_segments(item, *args, method="mask")),
            "channels": list(decode_segments(item, *args, method="channels")),
            "chan_lo": list(decode_segments(item, *args, str(cfg.data.sample_rate),
                                            method="channels"))}
    assert all(np.array_equal(a["mixture"], b["mixture"]) for a, b in zip(rows["mono"],
                                                                         rows["mid"]))
    model = SeparateSegments(str(ckpt), cfg.to_dict()) if truth is None else None
    stems = {}
    for kind, t in (("mid", None if truth is None else truth[0]),
                    ("channels", None if truth is None else truth[1])):
        if t is not None:
            stems[kind] = leaky_oracle(t, rows[kind], leak)
            continue
        stems[kind] = []
        for i in range(0, len(rows[kind]), 8):
            part = rows[kind][i : i + 8]
            batch = {k: np.array([r[k] for r in part]) for k in ("key", "seg", "error",
                                                                 "mixture")}
            batch["key"] = batch["key"].astype(object)
            stems[kind] += list(model(batch)["stems"])
    variants = [("mono", "mono", "mid", 1.0, "mask"), ("mask p=1", "mid", "mid", 1.0, "mask"),
                ("mask p=2", "mid", "mid", 2.0, "mask"),
                ("transfer", "mid", "mid", 1.0, "transfer"),
                ("channels", "channels", "channels", 1.0, "channels"),
                ("channels, model rate", "chan_lo", "channels", 1.0, "channels")]
    result = {}
    for name, kind, source, p, method in variants:
        asm = Assembler(cfg, str(out / name.replace(" ", "_")), "{track}/{stem}.{ext}", "wav",
                        "FLOAT", "bench", list(STEMS))
        for r, s in zip(rows[kind], stems[source]):
            batch = {k: np.array([v], dtype=object if k in ("key", "item", "plan", "error")
                                 else None) for k, v in r.items() if k != "mixture"}
            batch.update(stems=s[None], model_s=np.zeros(1), actor_private_mb=np.zeros(1))
            split = split_segments(batch, power=p, method=method)
            done = asm.add({k: v[0] for k, v in split.items()})
        assert done and done["status"] == "ok", done
        result[name] = np.stack([sf.read(done["outputs"][s], dtype="float32",
                                         always_2d=True)[0].T for s in STEMS])
    return result


def score(est: np.ndarray, ref: np.ndarray, mix: np.ndarray) -> np.ndarray:
    """SI-SDRi per stem [S] (NaN for a silent reference), mean over channels."""
    e, r = torch.from_numpy(est).double(), torch.from_numpy(ref).double()
    m = torch.from_numpy(mix).double()[None]
    val = si_sdri(e, r, m.expand_as(r)).numpy().mean(-1)  # [S, C] -> [S]
    silent = (ref**2).sum((-1, -2)) < 1e-8 * (mix**2).sum()
    return np.where(silent, np.nan, val)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ckpt", default=None, help="reuse a checkpoint of --config")
    ap.add_argument("--config", default="small", help="preset (its rate sets the model band)")
    ap.add_argument("--train-steps", type=int, default=1500)
    ap.add_argument("--train-minutes", type=float, default=12.0, help="stop training earlier")
    ap.add_argument("--songs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=12.0)
    ap.add_argument("--steps", type=int, default=20, help="sampler steps")
    ap.add_argument("--sampler-config", default=None,
                    help="YAML of sampler/separation keys (a sweep's best.yaml); replaces --steps")
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-model", action="store_true", help="score the leaky oracles only")
    ap.add_argument("--leaks", default="0.1,0.3",
                    help="also score a leaky oracle in place of the model (fractions)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    work = Path(args.out or tempfile.mkdtemp(prefix="bench-stereo-"))
    work.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config, [f"sampler.num_steps={args.steps}", "sampler.resamples=1",
                                "sampler.s_churn=1.0"])
    ckpt = Path(args.ckpt) if args.ckpt else work / f"{args.config}.ckpt"
    if not ckpt.exists() and args.skip_model:
        save(ckpt, cfg, build_denoiser(cfg))  # only its config is used
    elif not ckpt.exists():
        print(f"training `{args.config}` for {args.train_steps} steps -> {ckpt}")
        train(cfg, args.train_steps, 20.0, ckpt, args.train_minutes)
    if args.sampler_config:
        cfg = apply_overrides(cfg, load_sampler_yaml(args.sampler_config))
    rng = np.random.default_rng(7)
    leaks = [float(x) for x in args.leaks.split(",") if x]
    models = [("model", None)] * (not args.skip_model) + [(f"oracle leak {x:g}", x)
                                                          for x in leaks]
    scores: dict[str, dict[str, list]] = {m: {} for m, _ in models}
    for k in range(args.songs):
        stems = song_stems(5000 + k, args.seconds)  # [S, T], 44.1 kHz
        stereo = pan(stems, rng)  # [S, 2, T]
        path = work / f"song{k}.wav"
        sf.write(path, stereo.sum(0).T.astype(np.float32), SR, subtype="FLOAT")
        mid = resample(stereo.mean(1).astype(np.float32), SR, cfg.data.sample_rate)
        chans = resample(stereo.astype(np.float32), SR, cfg.data.sample_rate)
        for m, leak in models:
            est = separate_song(path, f"song{k}", cfg, ckpt, work / "out" / m.replace(" ", "_"),
                                None if leak is None else (mid, chans), leak or 0.0)
            sc = scores[m]
            sc.setdefault("mono", []).append(score(est["mono"], mid[:, None], mid.sum(0)[None]))
            for name in est:
                if name == "channels, model rate":
                    sc.setdefault(name, []).append(score(est[name], chans, chans.sum(0)))
                elif name != "mono":
                    sc.setdefault(name, []).append(score(est[name], stereo, stereo.sum(0)))
            print(f"  song {k} {m}: " + ", ".join(f"{n} {np.nanmean(v[-1]):.2f}"
                                                 for n, v in sc.items()), flush=True)
    smp = cfg.sampler
    print(f"\n{args.songs} songs x {args.seconds:g} s, `{args.config}` preset "
          f"({cfg.data.sample_rate} Hz), {smp.solver} {smp.num_steps} x {smp.resamples}, "
          f"churn {smp.s_churn:g}, sigma_max {smp.sigma_max:g}; SI-SDRi in dB\n")
    print("| separator | path | " + " | ".join(STEMS) + " | all |\n|---|---|"
          + "---|" * (len(STEMS) + 1))
    table = {}
    for m, sc in scores.items():
        for name, rows in sc.items():
            per = np.nanmean(np.stack(rows), 0)
            table[f"{m} / {name}"] = {"stems": per.tolist(), "all": float(np.nanmean(per))}
            label = ("mono mid, model rate" if name == "mono" else
                     "stereo per channel, model rate (channels)" if "model rate" in name else
                     f"stereo per channel, 44.1 kHz full band ({name})")
            print(f"| {m} | {label} | " + " | ".join(f"{v:.2f}" for v in per)
                  + f" | {np.nanmean(per):.2f} |")
    for key in table:
        if not key.endswith("/ mono"):
            ref = table[key.split(" / ")[0] + " / mono"]["all"]
            print(f"cost of {key}: {ref - table[key]['all']:.2f} dB")
    (work / "results.json").write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
