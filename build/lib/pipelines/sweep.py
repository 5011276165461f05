"""The Ray Tune trainable of `pipelines.tune` (kept out of __main__ so Ray pickles it by
reference): separate fixed validation chunks with one sampler setting and report its score."""

from __future__ import annotations

import numpy as np
import torch

from msdm.config import Config, apply_overrides
from msdm.metrics import summarize

from .models import Separator, separation_nfe
from .stages import score_track

DIVERGED_DB = -60.0  # what a trial whose sampler blew up scores, so the search steers away
_SEPARATORS: dict = {}  # per-process cache: Tune reuses worker processes across trials


def sweep_trial(config: dict, ckpt, base: dict, val: dict, seed: int, cost_per_nfe: float,
                num_gpus: float, batch_size: int) -> None:
    """Tune function trainable: separate the validation chunks `val` ({"x": [N, S, T],
    "track_id", "chunk_index"}) with `base` + `config` (dotted keys) and report mean windowed
    SI-SDRi, NFE and a cost-aware score."""
    from ray import tune

    key = (str(ckpt), num_gpus, base["separation"]["init"])  # --init: another regressor
    if key not in _SEPARATORS:
        _SEPARATORS[key] = Separator(ckpt, base, num_gpus, seed)
    separator = _SEPARATORS[key]
    separator.cfg = apply_overrides(Config.from_dict(base), config)
    separator.seed = seed
    x = np.asarray(val["x"])
    keys = list(zip(val["track_id"], val["chunk_index"]))
    est = [separator(x[i : i + batch_size].sum(1), keys[i : i + batch_size])
           for i in range(0, len(x), batch_size)]
    tune.report(trial_metrics(torch.from_numpy(np.concatenate(est)), val, separator.cfg,
                              cost_per_nfe))


def trial_metrics(est: torch.Tensor, val: dict, cfg: Config, cost_per_nfe: float) -> dict:
    """Mean windowed SI-SDRi of `est` [N, S, T] against the chunks in `val`, the NFE and the
    cost-aware score. A sampler that diverged (non-finite estimates, e.g. Euler + Dirac with too
    few steps) is a result, not an error: it scores DIVERGED_DB with `diverged` = 1."""
    k = separation_nfe(cfg)
    if not torch.isfinite(est).all():
        scores = {s: DIVERGED_DB for s in (*cfg.data.stems, "all")}
        windows, diverged = 0, 1
    else:
        per_track = []
        for t in sorted(set(val["track_id"])):
            sel = val["track_id"] == t
            group = {"track_id": val["track_id"][sel], "chunk_index": val["chunk_index"][sel],
                     "est": est.numpy()[sel], "ref": np.asarray(val["x"])[sel]}
            scored = score_track(group, cfg.data.sample_rate)
            per_track.append(scored["si_sdri"][scored["window"] >= 0])
        w = torch.from_numpy(np.concatenate(per_track)).reshape(-1, len(cfg.data.stems))
        scores, windows, diverged = summarize(w, cfg.data.stems), int(w.shape[0]), 0
        if not windows:  # all windows silent but one stem: never NaN, the lowest score
            scores = {s: DIVERGED_DB for s in (*cfg.data.stems, "all")}
    return {"si_sdri": scores["all"], "nfe": k, "windows": windows, "diverged": diverged,
            "score": scores["all"] - cost_per_nfe * k,
            **{f"si_sdri_{s}": scores[s] for s in cfg.data.stems}}
