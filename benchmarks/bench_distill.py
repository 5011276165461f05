"""Few-step separation: distil bench-quality's MSDM model and score teacher and student by NFE.

    make bench-distill   # = python benchmarks/bench_distill.py  (after make bench-quality;
                         #   ~40 min on 2 CPUs, 2026-12-07)

Runs on the output of `benchmarks/bench_quality.py` (--quality, default bench_out/quality): its
prepared songs, its MSDM teacher (runs/msdm), HDemucs (runs/hdemucs), its swept sampler
(samplers/swept.yaml) and results.json. All through the real jobs on a local Ray cluster:
1. `pipelines.distill` from the teacher, with the swept sampler's Dirac settings (constrained
   stem, soft mask), --steps steps (default 3000: under the teacher's own 7200-step training
   time on the same box; the measured times are in the table);
2. `pipelines.evaluate` on the held-out test songs: the teacher with its swept settings at
   1-32 Euler steps (the same churn, sigma_max, constrained stem and mask; its swept Heun 60 =
   119 NFE row comes from bench-quality), and the student's consistency sampler at 1, 2, 4
   and 8 steps;
3. the distilled refiner: a Ray Tune sweep of the student started from HDemucs's estimate
   (--init; tune_spaces/distilled_refine.yaml: 1-2 consistency steps) on the validation songs,
   then its pick on the test songs;
4. OUT/DISTILL.md (the table, CPU time per audio second), results.json and
   si_sdri_vs_nfe.png (teacher and student curves on one plot).
--reuse keeps finished stages; with a larger --steps it resumes the distillation run (the same
run name) up to it and scores the new student.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import yaml
from bench_quality import evaluate, job, sampler_file

TEACHER_NFE = (1, 2, 4, 8, 16, 32)
STUDENT_STEPS = (1, 2, 4, 8)


def teacher_files(out: Path, swept: dict) -> list[str]:
    """The swept sampler's settings (churn, sigma_max, constrained stem, mask) at n Euler
    steps: the teacher's curve at low NFE."""
    files = []
    for n in TEACHER_NFE:
        s = {**swept, "sampler": {**swept["sampler"], "solver": "euler", "num_steps": n,
                                  "resamples": 1}}
        files.append(sampler_file(out, f"teacher-euler-{n}", yaml.safe_dump(s)))
    return files


def student_files(out: Path) -> list[str]:
    return [sampler_file(out, f"student-{n}", f"sampler:\n  solver: consistency\n  num_steps: "
                         f"{n}\n  resamples: 1\n") for n in STUDENT_STEPS]


def curve_plot(teacher: list, student: list, refs: dict, png: str) -> None:
    """SI-SDRi against NFE: the teacher's and the student's curves, and reference points."""
    from pipelines.report import _plt, _save

    plt = _plt()
    fig, ax = plt.subplots(figsize=(9.0, 3.8))
    fig.subplots_adjust(right=0.64)
    for rows, label, color in ((teacher, "teacher (swept settings, Euler n)", "C0"),
                               (student, "distilled student (consistency n)", "C3")):
        ax.plot([r["nfe"] for r in rows], [r["all"] for r in rows], "o-", color=color,
                label=label)
    for i, (name, (nfe, score)) in enumerate(refs.items()):
        ax.scatter(nfe, score, marker="s^Dv"[i % 4], color=f"C{i + 4}", label=name, zorder=3)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("NFE (network evaluations per chunk)")
    ax.set_ylabel("SI-SDRi, held-out songs (dB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    _save(fig, png)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quality", default="bench_out/quality", help="bench_quality.py's --out")
    ap.add_argument("--out", default=None, help="default: QUALITY/distill")
    ap.add_argument("--steps", type=int, default=3000, help="distillation steps (batch 4)")
    ap.add_argument("--data-weight", type=float, default=1.0, help="distill.data_weight")
    ap.add_argument("--student-steps", type=int, default=4,
                    help="the student checkpoint's own sampler (distill.steps)")
    ap.add_argument("--refine-trials", type=int, default=16)
    ap.add_argument("--reuse", action="store_true", help="keep finished stages")
    args = ap.parse_args(argv)
    q = Path(args.quality)
    out = Path(args.out or q / "distill")
    out.mkdir(parents=True, exist_ok=True)
    data = str(q / "prepared")
    teacher, reg = q / "runs" / "msdm" / "model.ckpt", q / "runs" / "hdemucs" / "model.ckpt"
    quality = json.loads((q / "results.json").read_text())
    swept = yaml.safe_load((q / "samplers" / "swept.yaml").read_text())
    student = out / "runs" / "student" / "model.ckpt"
    timing = json.loads((out / "timing.json").read_text()) if (out / "timing.json").exists() \
        else {}
    done = timing.get("steps", 0) if args.reuse and student.exists() else 0
    if done < args.steps:  # a new run, or --reuse with more --steps: the run resumes at `done`
        t0 = time.time()
        job("distill", "--teacher", str(teacher), "--data", data, "--storage", str(out / "runs"),
            "--name", "student", "--sampler-config", str(q / "samplers" / "swept.yaml"),
            "--max-steps", str(args.steps), "--cpus-per-worker", "2",
            "--set", f"distill.data_weight={args.data_weight}",
            "--set", f"distill.steps={args.student_steps}",
            "--set", "train.checkpoint_every=500", "--set", "train.val_every=500",
            "--set", "train.log_every=100")
        run = (time.time() - t0) / 60
        timing = {"distill_minutes": run + (timing.get("distill_minutes", 0.0) if done else 0),
                  "steps": args.steps,
                  "runs": [*timing.get("runs", []), {"steps": args.steps, "minutes": run}]}
        (out / "timing.json").write_text(json.dumps(timing))
        for stale in ("eval-student", "eval-refine", "sweep/refine"):  # scored the old student
            shutil.rmtree(out / stale, ignore_errors=True)
    t_rows = evaluate(out, "eval-teacher", teacher, data, teacher_files(out, swept),
                      "--skip-checkpoint-sampler")
    s_rows = evaluate(out, "eval-student", student, data, student_files(out),
                      "--skip-checkpoint-sampler")
    sweep = out / "sweep" / "refine"
    if not (args.reuse and (sweep / "best.yaml").exists()):
        job("tune", "--ckpt", str(student), "--init", str(reg), "--data", data, "--space",
            "tune_spaces/distilled_refine.yaml", "--num-samples", str(args.refine_trials),
            "--max-chunks", "0", "--storage", str(out / "sweep"), "--name", "refine",
            "--max-concurrent", "2")
    pick = yaml.safe_load((sweep / "best.yaml").read_text())
    refine_files = [sampler_file(out, "student-refine", yaml.safe_dump(pick)),
                    sampler_file(out, "student-refine-1", yaml.safe_dump(
                        {**pick, "sampler": {**pick["sampler"], "num_steps": 1}}))]
    r_rows = evaluate(out, "eval-refine", student, data, refine_files, "--init", str(reg),
                      "--skip-checkpoint-sampler")

    seconds = 180.0  # the 9 test songs of 20 s
    best = next(c for c in quality["msdm"] if c["name"] == "swept")
    hdemucs = next(c for c in quality["msdm"] if c["name"].startswith("HDemucs regressor"))
    refined10 = next(c for c in quality["msdm"] if c["name"] == "HDemucs + MSDM refinement "
                     "(swept)")

    def row(c, label):
        return {"name": label, "nfe": c["nfe"], **c["si_sdri"], "seconds": c["seconds"],
                "cpu_s_per_audio_s": 2 * c["seconds"] / seconds}  # 2 CPUs busy

    teacher_curve = [row(c, f"teacher, Euler {n}") for c, n in zip(t_rows, TEACHER_NFE)]
    student_curve = [row(c, f"student, {n} step(s)") for c, n in zip(s_rows, STUDENT_STEPS)]
    refine = row(r_rows[0], "HDemucs + distilled refiner (swept pick)")
    refine1 = row(r_rows[1], "HDemucs + distilled refiner, 1 step")
    refs = {"teacher, swept Heun 60": (best["nfe"], best["si_sdri"]["all"]),
            "HDemucs": (1, hdemucs["si_sdri"]["all"]),
            "HDemucs + teacher refinement": (refined10["nfe"], refined10["si_sdri"]["all"]),
            "HDemucs + distilled refiner": (refine["nfe"], refine["all"]),
            "HDemucs + distilled refiner, 1 step": (refine1["nfe"], refine1["all"])}
    curve_plot(teacher_curve, student_curve, refs, str(out / "si_sdri_vs_nfe.png"))
    results = {"timing": {**timing, "teacher_minutes": quality["train_minutes"],
                          "teacher_steps": quality["steps"]},
               "teacher": teacher_curve, "student": student_curve, "refine": refine,
               "refine_1": refine1, "refine_sampler": pick,
               "best_swept": row(best, "teacher, swept Heun 60"),
               "hdemucs": row(hdemucs, "HDemucs"),
               "teacher_refinement": row(refined10, "HDemucs + teacher refinement")}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    lines = ["| held-out SI-SDRi (dB) | bass | drums | guitar | piano | all | NFE | wall (s) "
             "| CPU-s per audio-s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in [*teacher_curve, results["best_swept"], *student_curve, results["hdemucs"],
              results["teacher_refinement"], refine, refine1]:
        lines.append(f"| {r['name']} | {r['bass']:.2f} | {r['drums']:.2f} | {r['guitar']:.2f} "
                     f"| {r['piano']:.2f} | {r['all']:.2f} | {r['nfe']} | {r['seconds']:.0f} "
                     f"| {r['cpu_s_per_audio_s']:.3f} |")
    t = results["timing"]
    text = "\n".join([
        "# Few-step separation (bench_distill.py)", "",
        f"Distillation: {t.get('steps')} steps in {t.get('distill_minutes', 0):.1f} min; the "
        f"teacher trained {t['teacher_steps']} steps in {t['teacher_minutes']:.1f} min.", "",
        *lines, "", "![SI-SDRi vs NFE](si_sdri_vs_nfe.png)", ""])
    (out / "DISTILL.md").write_text(text)
    print(text, flush=True)
    return results


if __name__ == "__main__":
    main()
