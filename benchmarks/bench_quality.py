"""Quality benchmark: does the whole pipeline learn to separate, and which samplers are cheap?

    make bench-quality   # = python benchmarks/bench_quality.py  (~1 h 30 min, 2 CPUs, 2026-11-28)
    make bench-quality ARGS="--real-midi DIR"   # + real songs (1 h 45 min in all, 2026-12-07)
    make bench-quality ARGS=--isdm   # + four ISDM priors (~38 min more)

Fixed benchmark (seeds fixed): 60 generated Slakh-format songs of 20 s (`pipelines.synth --seed
1234`: 42 train, 9 validation, 9 held-out test; composed General MIDI played by the GM SoundFont
since 2026-12-07, `--renderer additive` for the sine-partial songs of the rows before),
prepared with the `small` preset (11.025 kHz, 1.5 s chunks). With --real-midi DIR the main rows
are also scored on real songs: DIR's MIDI files rendered by `pipelines.render` and cut to
--real-excerpt seconds each (none of them is used for training or sweeping). Steps, all through
the real jobs on a local Ray cluster:
1. train MSDM with the `demo` recipe (the `small` network, lr 2e-3 with warm-up and cosine decay,
   EMA warm-up, batch 4) for --steps (default 7200: the CPU time of the 4000 batch-8 steps of
   the runs before 2026-11-28, 29 min on the 2-core box of 2026-11-27);
2. train the HDemucs regressor (`--set model.kind=hdemucs`, same data, waveform L1, batch 8) for
   the same CPU time: MSDM's measured training time / (HDemucs step time + the job's per-step
   overhead), step times timed here;
3. Ray Tune sweeps on the validation split: cheap Dirac samplers with and without the soft-mask
   refinement (tune_spaces/cost_aware.yaml), and the refinement of the regressor's estimate
   (--init, tune_spaces/refine.yaml, <= 20 NFE);
4. evaluate on the test split: the paper's sampler (Euler 150 x 2 = 300 NFE, no mask), the
   checkpoint's and the best swept sampler (with and without the mask), the posterior-mean
   estimate (`separation.samples`: the mean of 4 draws of Euler 40, soft mask), HDemucs alone
   (NFE 1) and HDemucs + MSDM refinement (one draw, and the mean of 2); next to the mixture
   (0 dB) and the ideal ratio mask;
   --candidates adds fixed cheap samplers;
5. optionally ISDM (--isdm): four single-stem priors sharing the same step budget; MSDM and
   ISDM scored side by side with the swept sampler on the first 3 test songs;
6. imputation: the exact Gaussian oracle (regression on the conditional mean) and, on the
   benchmark, the chroma agreement of an imputed piano part with the true one.
Writes OUT/QUALITY.md, results.json and the plots.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from msdm.checkpoint import load_checkpoint
from msdm.config import SamplerConfig, load_config
from msdm.diffusion import GaussianDenoiser, gaussian_conditional
from msdm.metrics import oracle_irm, summarize, windowed_si_sdri
from msdm.tasks import generate, impute, item_generators
from pipelines.demo_report import track_stems

STEMS = ("bass", "drums", "guitar", "piano")
CANDIDATES = {  # fixed cheap samplers evaluated next to the paper's (NFE <= 75)
    "heun-20": "sampler:\n  solver: heun\n  num_steps: 20\n  resamples: 1\n  s_churn: 1.0\n",
    "heun-38": "sampler:\n  solver: heun\n  num_steps: 38\n  resamples: 1\n  s_churn: 2.0\n",
    "euler-75": "sampler:\n  solver: euler\n  num_steps: 75\n  resamples: 1\n  s_churn: 10.0\n",
    "euler-37x2": "sampler:\n  solver: euler\n  num_steps: 37\n  resamples: 2\n  s_churn: 10.0\n",
}
PAPER = ("sampler:\n  solver: euler\n  num_steps: 150\n  resamples: 2\n  s_churn: 20.0\n"
         "  sigma_max: 1.0\nseparation:\n  mask_power: 0.0\n")  # the paper's, raw stems
# the posterior-mean estimate (separation.samples): the mean of 4 draws of a cheap sampler, then
# the soft mask at power 2 over 186 ms frames. Chosen on 24 validation chunks of this
# benchmark (2026-11-27): one draw 7.52 dB (7.89 masked), mean of 2 / 4 / 8: 8.01 / 8.29 / 8.43;
# Euler 80: mean of 4 8.38 at twice the cost; Euler 20: mean of 8 only 6.89; the swept sampler:
# one draw 7.84 (masked), mean of 4 8.66 at 952 NFE. sigma_max re-chosen on 2026-11-28 with the
# batch-4 model, first 3 validation songs (27 windows): 1.0 / 0.5 / 0.25 / 0.18 / 0.12 / 0.06:
# 10.74 / 10.94 / 11.48 / 11.74 / 11.76 / 11.37 dB. The mask (power 1, 93 ms) added nothing to
# the mean of 4 (8.29 raw, 8.13 masked, 2026-11-27); at power 2 over 2048-point frames it does
# (2026-11-28, all 9 validation songs, 81 windows: 9.15 raw, 9.58 masked; songs 1-3 11.70 ->
# 12.56, songs 4-9 7.88 -> 8.09; power 3 and 1024-point frames lower)
POSTERIOR_MEAN = ("sampler:\n  solver: euler\n  num_steps: 40\n  resamples: 1\n  s_churn: 10.0\n"
                  "  sigma_max: 0.12\nseparation:\n  constrained: 1\n  mask_power: 2.0\n"
                  "  mask_nfft: 2048\n  samples: 4\n")
MEAN_ROW = "MSDM posterior mean (Euler 40, mean of 4, soft mask)"
REFINED_MEAN_ROW = "HDemucs + MSDM refinement (swept, mean of 2)"
# the MSDM recipe (`demo`: small network, lr 2e-3, warm-up + cosine, EMA warm-up) and the regressor
MSDM_ARGS = ["--config", "demo", "--set", "train.checkpoint_every=900", "--set",
             "train.val_every=900", "--set", "train.log_every=50"]
REGRESSOR_BATCH = 8  # the regressor's recipe since its first run; batch 4 is MSDM's lever
HDEMUCS_ARGS = [*MSDM_ARGS, "--set", "model.kind=hdemucs", "--set", "train.lr=1e-3", "--set",
                f"train.batch_size={REGRESSOR_BATCH}"]


def job(name: str, *args: str) -> None:
    print(f"\n$ python -m pipelines.{name} {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", f"pipelines.{name}", *args], check=True)


def oracle_scores(split_dir: Path, sr: int) -> dict:
    windows = []
    for ref in track_stems(split_dir).values():
        ref_t = torch.from_numpy(ref)
        windows.append(windowed_si_sdri(oracle_irm(ref_t), ref_t, sr))
    return summarize(torch.cat(windows), STEMS)


def gaussian_imputation() -> dict:
    """Regression of imputed stems on E[x_u | x_k] under an exact Gaussian prior (1 = exact)."""
    cov = torch.tensor([[0.040, 0.020, 0.010, 0.015], [0.020, 0.050, 0.012, 0.010],
                        [0.010, 0.012, 0.030, 0.020], [0.015, 0.010, 0.020, 0.045]],
                       dtype=torch.float64)
    den = GaussianDenoiser(cov)
    g = torch.Generator().manual_seed(4)
    x = (torch.linalg.cholesky(cov) @ torch.randn(8, 4, 4096, generator=g,
                                                  dtype=torch.float64)).float()
    known = [True, False, True, False]
    k = torch.tensor(known)
    a, cond = gaussian_conditional(cov, known)
    cm = torch.einsum("uk,bkt->but", a, x[:, k].double())
    out = {}
    for name, method, r in [("replace (paper)", "replace", 1), ("replace, 4 resamples",
                            "replace", 4), ("reconstruction guidance", "guidance", 1)]:
        cfg = SamplerConfig(num_steps=256, sigma_max=20.0, s_churn=10.0, resamples=r)
        y = impute(den, x, known, cfg, method=method, generator=torch.Generator().manual_seed(5))
        xu = y[:, ~k].double()
        beta = float((xu * cm).sum() / (cm * cm).sum())
        spread = float(((xu - cm).var(dim=(0, 2)) / cond.diagonal()).mean())
        out[name] = {"regression": beta, "spread_vs_exact": spread,
                     "nfe": 256 * r * (2 if method == "guidance" else 1)}
    return out


def chroma(x: np.ndarray, sr: int) -> np.ndarray:
    """12-bin pitch-class energy profile over time [12, frames] (60 Hz - 2 kHz)."""
    spec = torch.stft(torch.from_numpy(x).double(), 2048, 512,
                      window=torch.hann_window(2048, dtype=torch.float64),
                      return_complex=True).abs().numpy() ** 2
    freqs = np.fft.rfftfreq(2048, 1 / sr)
    sel = (freqs > 60) & (freqs < 2000)
    pc = np.round(12 * np.log2(freqs[sel] / 440.0)).astype(int) % 12
    prof = np.zeros((12, spec.shape[1]))
    np.add.at(prof, pc, spec[sel])
    return prof / (np.linalg.norm(prof, axis=0, keepdims=True) + 1e-12)


def imputation_coherence(ckpt: Path, split_dir: Path, chunks: int, steps: int) -> dict:
    """Impute the piano given bass, drums and guitar; chroma cosine with the true piano part."""
    cfg, den = load_checkpoint(ckpt)
    refs = list(track_stems(split_dir).values())
    n = cfg.data.chunk_samples
    x = np.stack([r[:, i * n : (i + 1) * n] for r in refs for i in range(r.shape[-1] // n)])
    x = x[np.abs(x[:, 3]).max(-1) > 0.01][:chunks]  # chunks that have a piano part
    xt = torch.from_numpy(x)
    known = [True, True, True, False]
    sampler = SamplerConfig(num_steps=steps, sigma_max=20.0, s_churn=10.0, resamples=1)
    seeds = list(range(len(xt)))
    outs = {
        "unconditional generation": generate(den, tuple(xt.shape), sampler,
                                             generator=item_generators(seeds)),
        "replace (paper)": impute(den, xt, known, sampler, generator=item_generators(seeds)),
        "reconstruction guidance": impute(den, xt, known, sampler, method="guidance",
                                          generator=item_generators(seeds),
                                          sigma_data=cfg.diffusion.sigma_data),
    }
    res = {}
    for name, y in outs.items():
        sims = [float((chroma(y[i, 3].numpy(), cfg.data.sample_rate)
                       * chroma(x[i, 3], cfg.data.sample_rate)).sum(0).mean())
                for i in range(len(x))]
        res[name] = {"chroma_cosine": float(np.mean(sims)), "chunks": len(x)}
    return res


def step_seconds(overrides: dict, steps: int = 8) -> float:
    """Seconds per training step (batch of the preset, random audio) in this process."""
    from msdm.checkpoint import build_model
    from msdm.training import make_optimizer, train_step

    cfg = load_config("demo", overrides)
    model = build_model(cfg)
    opt = make_optimizer(model, cfg)
    x = 0.1 * torch.randn(cfg.train.batch_size, len(cfg.data.stems), cfg.data.chunk_samples,
                          generator=torch.Generator().manual_seed(0))
    for i in range(steps + 3):
        if i == 3:
            t0 = time.perf_counter()
        train_step(model, x, opt, cfg, step=i)
    return (time.perf_counter() - t0) / steps


def regressor_steps(out: Path, steps: int, msdm_seconds: float) -> int:
    """HDemucs steps for MSDM's CPU time: MSDM's measured training time / HDemucs's step time.

    Both step times are timed here, in one process; the job adds a per-step cost of its own
    (Ray Data batches, logging, validation), taken from MSDM's run and added to HDemucs's step.
    """
    path, batches = out / "step_seconds.json", {"msdm_batch": load_config("demo").train.batch_size,
                                                "hdemucs_batch": REGRESSOR_BATCH}
    t = json.loads(path.read_text()) if path.exists() else {}
    if any(t.get(k) != v for k, v in batches.items()):  # absent, or timed for other batches
        torch.set_num_threads(2)  # what the Train worker gets (--cpus-per-worker 2)
        t = {"msdm": step_seconds({}),
             "hdemucs": step_seconds({"model.kind": "hdemucs",
                                      "train.batch_size": REGRESSOR_BATCH}), **batches}
        path.write_text(json.dumps(t))
    overhead = msdm_seconds / steps - t["msdm"]
    if overhead < 0:
        print(f"warning: MSDM trained faster ({msdm_seconds / steps:.3f} s per step) than its "
              f"step time here ({t['msdm']:.3f} s); taking the job's overhead as 0", flush=True)
    overhead = max(0.0, overhead)
    print(f"step time: MSDM {t['msdm']:.3f} s, HDemucs {t['hdemucs']:.3f} s, job overhead "
          f"{overhead:.3f} s per step (MSDM trained {steps} steps in {msdm_seconds / 60:.1f} "
          "min)", flush=True)
    return max(1, round(msdm_seconds / (t["hdemucs"] + overhead)))


def sampler_file(out: Path, name: str, text: str) -> str:
    (out / "samplers").mkdir(exist_ok=True)
    (out / "samplers" / f"{name}.yaml").write_text(text)
    return str(out / "samplers" / f"{name}.yaml")


def drop_if_changed(folder: Path, stamp: Path, inputs: str, redo: str) -> None:
    """--reuse: remove `folder` when its `stamp` records other inputs than `inputs` (a folder
    without a stamp, from before stamps, is kept)."""
    if stamp.exists() and stamp.read_text() != inputs:
        print(f"{folder.name}: its inputs changed since it ran; {redo} again", flush=True)
        shutil.rmtree(folder, ignore_errors=True)


def evaluate(out: Path, dest: str, ckpt: Path, data: str, files: list, *extra: str,
             chunks: int = 0) -> list:
    """Rows of one evaluate job on the test split (kept when --reuse finds them, unless its
    checkpoint, arguments or sampler files changed since: e.g. a re-run refinement sweep)."""
    args = ["--ckpt", str(ckpt), "--data", data, "--output", str(out / dest), "--batch-size",
            "16", "--max-chunks", str(chunks), "--threads", "2", *extra,
            *[a for f in files for a in ("--sampler-config", f)]]
    inputs = json.dumps({"args": args, "samplers": [Path(f).read_text() for f in files]})
    stamp = out / dest / "inputs.json"
    drop_if_changed(out / dest, stamp, inputs, "scoring")
    if not (out / dest / "results.json").exists():
        job("evaluate", *args)
        stamp.write_text(inputs)
    return json.loads((out / dest / "results.json").read_text())["configs"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="bench_out/quality")
    ap.add_argument("--steps", type=int, default=7200, help="MSDM training steps (batch 4)")
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--refine-trials", type=int, default=32)
    ap.add_argument("--isdm", action="store_true", help="also train and score ISDM priors")
    ap.add_argument("--candidates", action="store_true",
                    help="also score fixed cheap samplers (4 more evaluations, ~10 min)")
    ap.add_argument("--mask-ab", action="store_true",
                    help="also score the swept sampler with the soft mask switched")
    ap.add_argument("--eval-chunks", type=int, default=0,
                    help="score the first N test chunks only (smoke runs; 0 = all)")
    ap.add_argument("--reuse", action="store_true",
                    help="keep the data, runs, sweeps and results of a previous run")
    ap.add_argument("--renderer", choices=("soundfont", "additive"), default="soundfont",
                    help="how the generated songs are played (additive: the rows before "
                         "2026-12-07)")
    ap.add_argument("--real-midi", default=None, metavar="DIR",
                    help="also score the main rows on these real MIDI songs (rendered with the "
                         "default SoundFont; never trained or swept on)")
    ap.add_argument("--real-excerpt", type=float, default=12.0,
                    help="seconds scored of each real song, from 30 %% of its length")
    ap.add_argument("--real-tracks", type=int, default=24,
                    help="real songs scored (the first N in track order; 0 = all)")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    if not args.reuse:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not (out / "prepared").exists():
        job("synth", "--output", str(out / "slakh"), "--tracks", "60", "--seconds", "20",
            "--seed", "1234", "--renderer", args.renderer)
        job("prepare", "--input", str(out / "slakh"), "--output", str(out / "prepared"),
            "--config", "small")
    data = str(out / "prepared")
    ckpt, reg = out / "runs" / "msdm" / "model.ckpt", out / "runs" / "hdemucs" / "model.ckpt"
    if not ckpt.exists():
        job("train", "--data", data, "--storage", str(out / "runs"), "--name", "msdm",
            *MSDM_ARGS, "--max-steps", str(args.steps), "--cpus-per-worker", "2")
    msdm_run, reg_run = out / "runs" / "msdm", out / "runs" / "hdemucs"
    if not reg.exists():  # the step timing runs only when the regressor is to be trained
        reg_steps = regressor_steps(out, train_steps(msdm_run), 60 * train_minutes(msdm_run))
        job("train", "--data", data, "--storage", str(out / "runs"), "--name", "hdemucs",
            *HDEMUCS_ARGS, "--max-steps", str(reg_steps), "--cpus-per-worker", "2")
    msdm_min, reg_min = train_minutes(msdm_run), train_minutes(reg_run)
    if abs(reg_min / msdm_min - 1) > 0.05:
        print(f"note: HDemucs trained {reg_min:.1f} min, MSDM {msdm_min:.1f} min "
              f"({100 * (reg_min / msdm_min - 1):+.0f} %)", flush=True)
    # the refinement sweep scores all 117 validation chunks (9 songs; ~40 s a trial, 2 at once):
    # on the first 32 its pick gained +0.63 dB over HDemucs there and +0.35 on the test songs
    for name, space, trials, chunks, extra in (
            ("s", "cost_aware", args.trials, 32, []),
            ("refine", "refine", args.refine_trials, 0, ["--init", str(reg)])):
        space_file = f"tune_spaces/{space}.yaml"
        args_ = ["--ckpt", str(ckpt), "--data", data, "--space", space_file,
                 "--num-samples", str(trials), "--max-chunks", str(chunks), "--storage",
                 str(out / "sweep"), "--name", name, "--max-concurrent", "2", *extra]
        inputs = json.dumps({"args": args_, "space": Path(space_file).read_text()})
        # stamped beside the sweep before it runs: an interrupted sweep resumes with the same
        # inputs and starts afresh with changed ones (as evaluate(): unstamped sweeps are kept)
        sweep, stamp = out / "sweep" / name, out / "sweep" / f"{name}.inputs.json"
        drop_if_changed(sweep, stamp, inputs, "sweeping")
        if not (sweep / "best.yaml").exists():
            stamp.parent.mkdir(parents=True, exist_ok=True)
            stamp.write_text(inputs)
            job("tune", *args_)
    swept = yaml.safe_load((out / "sweep" / "s" / "best.yaml").read_text())
    files = [sampler_file(out, "paper", PAPER),
             sampler_file(out, "swept", yaml.safe_dump(swept))]
    if args.mask_ab:  # the swept sampler with the soft-mask refinement switched
        on = not swept.get("separation", {}).get("mask_power", 0.0)
        other = {**swept, "separation": {**swept.get("separation", {}),
                                         "mask_power": 1.0 if on else 0.0}}
        files.append(sampler_file(out, "swept-mask-" + ("on" if on else "off"),
                                  yaml.safe_dump(other)))
    if args.candidates:
        files += [sampler_file(out, n, t) for n, t in CANDIDATES.items()]
    rows = evaluate(out, "eval", ckpt, data, files, "--skip-checkpoint-sampler",
                    chunks=args.eval_chunks)
    rows += [{**r, "name": MEAN_ROW} for r in evaluate(
        out, "eval-mean", ckpt, data, [sampler_file(out, "mean", POSTERIOR_MEAN)],
        "--skip-checkpoint-sampler", chunks=args.eval_chunks)]
    rows += [{**r, "name": "HDemucs regressor (one pass)"}
             for r in evaluate(out, "eval-hdemucs", reg, data, [], chunks=args.eval_chunks)]
    # the refinement sweep picks the mean of 2 draws (tune_spaces/refine.yaml: <= 20 NFE); the
    # one-draw row is the same sampler with separation.samples 1
    refined = yaml.safe_load((out / "sweep" / "refine" / "best.yaml").read_text())
    # a --reuse of a sweep from before 2026-11-28 swept one draw: its mean row is still 2 draws
    refined.setdefault("separation", {}).setdefault("samples", 2)
    sampler_file(out, "refined-mean", yaml.safe_dump(refined))
    refined["separation"]["samples"] = 1  # "separation" exists since the setdefault above
    sampler_file(out, "refined", yaml.safe_dump(refined))
    rows += [{**r, "name": "HDemucs + MSDM refinement (swept)"}
             for r in evaluate(out, "eval-refined", ckpt, data,
                               [str(out / "samplers" / "refined.yaml")], "--init", str(reg),
                               "--skip-checkpoint-sampler", chunks=args.eval_chunks)]
    rows += [{**r, "name": REFINED_MEAN_ROW}
             for r in evaluate(out, "eval-refined-mean", ckpt, data,
                               [str(out / "samplers" / "refined-mean.yaml")],
                               "--init", str(reg), "--skip-checkpoint-sampler",
                               chunks=args.eval_chunks)]
    prev = json.loads((out / "results.json").read_text()) if args.reuse and (
        out / "results.json").exists() else {}
    real = real_rows(out, args, ckpt, reg) if args.real_midi else prev.get("real")
    report = {"train_minutes": msdm_min, "steps": train_steps(msdm_run),
              "regressor_minutes": reg_min,
              "regressor_steps": train_steps(reg_run), "msdm": rows,
              "oracle_irm": oracle_scores(out / "prepared" / "test", 11025),
              "renderer": args.renderer}
    if real:
        report["real"] = real
    report["imputation_gaussian_oracle"] = prev.get("imputation_gaussian_oracle") or \
        gaussian_imputation()
    report["imputation_benchmark"] = prev.get("imputation_benchmark") or imputation_coherence(
        ckpt, out / "prepared" / "test", 24, 64)
    publish(out, report)  # the MSDM part stands on its own before the optional ISDM runs
    if args.isdm:
        report["isdm"] = prev.get("isdm") or run_isdm(out, data, args.steps)
        runs = [out / "runs" / f"isdm-{s}" for s in STEMS]  # None: a reuse without the runs
        report["isdm_minutes"] = (sum(train_minutes(r) for r in runs) if all(
            (r / "metrics.csv").exists() for r in runs) else prev.get("isdm_minutes"))
        publish(out, report)
    print((out / "QUALITY.md").read_text())


def real_rows(out: Path, args, ckpt: Path, reg: Path) -> dict:
    """The main rows on real songs: render, cut excerpts, prepare, score (no paper sampler:
    300 NFE over ~13 min of audio would add ~45 min)."""
    from pipelines.tracks import excerpt_tree

    data = out / "prepared-real"
    if not (data / "_report.json").exists():
        job("render", "--midi", args.real_midi, "--output", str(out / "real-slakh"))
        songs = excerpt_tree(str(out / "real-slakh"), str(out / "real-excerpts"),
                             args.real_excerpt, args.real_tracks, split="test")
        print(f"{songs} real songs, {args.real_excerpt:g} s each", flush=True)
        job("prepare", "--input", str(out / "real-excerpts"), "--output", str(data), "--config",
            "small")
    rows = evaluate(out, "real-eval", ckpt, str(data), [str(out / "samplers" / "swept.yaml")],
                    "--skip-checkpoint-sampler")
    rows += [{**r, "name": MEAN_ROW} for r in evaluate(
        out, "real-eval-mean", ckpt, str(data), [str(out / "samplers" / "mean.yaml")],
        "--skip-checkpoint-sampler")]
    rows += [{**r, "name": "HDemucs regressor (one pass)"}
             for r in evaluate(out, "real-eval-hdemucs", reg, str(data), [])]
    rows += [{**r, "name": "HDemucs + MSDM refinement (swept)"}
             for r in evaluate(out, "real-eval-refined", ckpt, str(data),
                               [str(out / "samplers" / "refined.yaml")], "--init", str(reg),
                               "--skip-checkpoint-sampler")]
    return {"rows": rows, "oracle_irm": oracle_scores(data / "test", 11025),
            "songs": len(list((out / "real-excerpts" / "test").glob("Track*"))),
            "excerpt_seconds": args.real_excerpt, "midi": args.real_midi}


def last_metrics(run: Path) -> list[str]:
    """The last row of a training run's metrics.csv (step first, elapsed_s last)."""
    return (run / "metrics.csv").read_text().strip().splitlines()[-1].split(",")


def train_steps(run: Path) -> int:
    """Steps the training run made, from its own metrics.csv."""
    return int(last_metrics(run)[0])


def train_minutes(run: Path) -> float:
    """Wall time of the training run, from its own metrics.csv."""
    return float(last_metrics(run)[-1]) / 60


def publish(out: Path, report: dict) -> None:
    (out / "results.json").write_text(json.dumps(report, indent=2))
    write_markdown(out, report)


def run_isdm(out: Path, data: str, steps: int) -> list:
    """Four single-stem priors sharing MSDM's step budget, then MSDM and ISDM side by side with
    the swept sampler on the first 3 test songs (39 chunks; ISDM costs 4 models per NFE)."""
    ckpts = []
    for stem in STEMS:
        ck = out / "runs" / f"isdm-{stem}" / "model.ckpt"
        if not ck.exists():
            job("train", "--data", data, "--storage", str(out / "runs"), "--name",
                f"isdm-{stem}", *MSDM_ARGS, "--stem", stem, "--max-steps",
                str(steps // 4), "--cpus-per-worker", "2")
        ckpts.append(f"--ckpt={stem}={ck}")
    rows = []
    for name, ck in (("MSDM", [f"--ckpt={out / 'runs' / 'msdm' / 'model.ckpt'}"]),
                     ("ISDM", ckpts)):
        dest = out / f"eval-{name.lower()}-3songs"
        job("evaluate", *ck, "--data", data, "--output", str(dest), "--batch-size", "16",
            "--threads", "2",
            "--max-chunks", "39", "--skip-checkpoint-sampler", "--sampler-config",
            str(out / "samplers" / "swept.yaml"))
        rows += [{**c, "name": f"{name}, {c['name']} (3 test songs)"}
                 for c in json.loads((dest / "results.json").read_text())["configs"]]
    return rows


def table3(r: dict, rows: list) -> list:
    """The paper's Table 3 rows on this benchmark, with training CPU time, NFE and seconds."""
    def row(label, match, minutes):
        for c in rows:
            if c["name"].startswith(match) and "songs" not in c["name"]:
                t = f"{minutes:.0f}" if minutes is not None else "-"
                return [f"| {label} | {c['si_sdri']['all']:.2f} | {t} | {c['nfe']} | "
                        f"{c['seconds']:.0f} |"]
        return []

    msdm, reg = r["train_minutes"], r.get("regressor_minutes")
    return ["| Table 3 row (9 test songs) | SI-SDRi all (dB) | training (min, 2 CPUs) | NFE | "
            "separation (s) |", "|---|---|---|---|---|",
            *row("mixture", "mixture", None), *row("ideal ratio mask (oracle)", "oracle", None),
            *row("HDemucs (regressor, L1)", "HDemucs regressor", reg),
            *row("MSDM, paper sampler (Dirac, Euler 150 x 2)", "paper", msdm),
            *row("MSDM, swept sampler", "swept", msdm),
            *row("MSDM, posterior mean of 4 draws (Euler 40) + soft mask", MEAN_ROW, msdm),
            *row("HDemucs + MSDM refinement (--init, swept)", "HDemucs + MSDM refinement (swept)",
                 None if reg is None else msdm + reg),
            *row("HDemucs + MSDM refinement, mean of 2 draws", REFINED_MEAN_ROW,
                 None if reg is None else msdm + reg),
            *isdm_row(r)]


def isdm_row(r: dict) -> list:
    """ISDM's Table 3 row (--isdm): scored on the first 3 test songs only, so MSDM's score on
    the same songs goes with it; training time = the four priors' together."""
    by = {c["name"].split(",")[0]: c for c in r.get("isdm", [])}
    if not {"MSDM", "ISDM"} <= by.keys():
        return []
    i, t = by["ISDM"], r.get("isdm_minutes")
    return [f"| ISDM, swept sampler (first 3 test songs; MSDM there: "
            f"{by['MSDM']['si_sdri']['all']:.2f}) | {i['si_sdri']['all']:.2f} | "
            f"{'-' if t is None else f'{t:.0f}'} (4 priors) | 4 x {i['nfe']} | "
            f"{i['seconds']:.0f} |"]


def real_table(r: dict) -> list:
    """The rows scored on real songs (--real-midi), with the oracle and the mixture."""
    from pipelines.report import markdown_table

    if not r.get("real"):
        return []
    real = r["real"]
    rows = [dict(c) for c in real["rows"]]
    rows.append({"name": "oracle IRM (sees the true stems)", "si_sdri": real["oracle_irm"],
                 "windows": rows[0]["windows"], "nfe": 0, "seconds": 0.0})
    return ["## Real songs", "", f"{real['songs']} real General MIDI songs ({real['midi']}), "
            f"rendered by `pipelines.render` with the default SoundFont, "
            f"{real['excerpt_seconds']:g} s of each from 30 % of its length; never trained or "
            "swept on.", "", markdown_table(rows, STEMS), ""]


def write_markdown(out: Path, r: dict) -> None:
    from pipelines.report import markdown_table, plot_nfe, plot_stem_bars, read_csv

    rows = [{**c, "name": "checkpoint sampler (demo recipe)"} if c["name"] == "checkpoint sampler"
            else dict(c) for c in r["msdm"]]
    rows.append({"name": "oracle IRM (sees the true stems)", "si_sdri": r["oracle_irm"],
                 "windows": rows[0]["windows"], "nfe": 0, "seconds": 0.0})
    rows.append({"name": "mixture as estimate", "si_sdri": {s: 0.0 for s in (*STEMS, "all")},
                 "windows": rows[0]["windows"], "nfe": 0, "seconds": 0.0})
    rows += r.get("isdm", [])
    plot_stem_bars([x for x in rows if "same_as" not in x and "songs" not in x["name"]
                    and x["name"].split(" ")[0] not in CANDIDATES], STEMS,
                   str(out / "si_sdri.png"), "held-out SI-SDRi (dB)")
    trials = read_csv(str(out / "sweep" / "s" / "trials.csv"))
    pts = [(float(t["nfe"]), float(t["si_sdri"]), "") for t in trials]
    pts += [(c["nfe"], c["si_sdri"]["all"], f"{c['name']} (test)") for c in rows
            if c["nfe"] and "same_as" not in c and "songs" not in c["name"]]
    plot_nfe(pts, str(out / "si_sdri_vs_nfe.png"))
    imp_o, imp_b = r["imputation_gaussian_oracle"], r["imputation_benchmark"]
    lines = ["# Quality benchmark", "",
             f"MSDM (`demo` recipe: `small` network) trained {r['steps']} steps "
             f"({r['train_minutes']:.0f} min of Ray Train on 2 CPUs), HDemucs "
             f"{r.get('regressor_steps', '-')} steps ({r.get('regressor_minutes', 0):.0f} min), "
             f"on 42 generated songs ({r.get('renderer', 'additive')} renderer); scored on 9 "
             "held-out songs.", "",
             markdown_table(rows, STEMS), "", *table3(r, rows), "", *real_table(r),
             "![SI-SDRi](si_sdri.png)",
             "![SI-SDRi vs NFE](si_sdri_vs_nfe.png)", "",
             "## Imputation", "", "| method | regression on E[x_u|x_k] (exact: 1) | spread vs "
             "exact | NFE |", "|---|---|---|---|",
             *[f"| {k} | {v['regression']:.3f} | {v['spread_vs_exact']:.2f} | {v['nfe']} |"
               for k, v in imp_o.items()], "",
             "| piano given bass, drums, guitar | chroma cosine with the true piano |", "|---|---|",
             *[f"| {k} | {v['chroma_cosine']:.3f} |" for k, v in imp_b.items()]]
    (out / "QUALITY.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
