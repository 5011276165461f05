"""The demo report's per-track table and verdict (#13): a stem that is silent in the track is
shown as silent with the estimate's leak level, never as a +-100 dB SI-SDR; the verdict follows
the demo's targets; the separation picture draws silent stems without numerical warnings."""

import warnings

import numpy as np
import pytest

from pipelines.demo_report import _stem_table, _verdict, stem_rows
from pipelines.report import plot_separation

SR = 11025


def _refs():
    t = np.arange(2 * SR) / SR
    ref = np.zeros((4, t.size), np.float32)
    ref[0] = 0.3 * np.sin(2 * np.pi * 110 * t)
    ref[1] = 0.2 * np.sign(np.sin(2 * np.pi * 2 * t))
    ref[2] = 0.2 * np.sin(2 * np.pi * 330 * t)  # ref[3] (piano) stays silent
    return ref


def test_a_silent_reference_stem_is_shown_as_silent_with_its_leak_level():
    ref = _refs()
    est = ref.copy()
    est[3] = 0.01 * ref.sum(0)  # 1 % of the mixture leaked into the silent stem: -40 dB
    rows = stem_rows(est, ref)
    assert [r["silent"] for r in rows] == [False, False, False, True]
    assert rows[3]["leak_db"] == pytest.approx(-40.0, abs=0.01)
    assert rows[0]["estimate"] > 100  # a perfect estimate of an active stem
    table = "\n".join(_stem_table(rows))
    piano = "| piano | silent in this track (estimate at -40.0 dB re. the mixture) | — | — |"
    assert piano in table


def test_verdict_follows_the_demo_targets():
    ok = {"bass": 7.0, "drums": 9.0, "guitar": 1.2, "piano": 6.8, "all": 6.0}
    assert _verdict(ok).startswith("**Separation works")
    weak_stem = dict(ok, guitar=0.9)
    assert _verdict(weak_stem).startswith("**Below the demo target") and "+0.90 dB" in \
        _verdict(weak_stem)
    assert _verdict(dict(ok, all=5.99)).startswith("**Below the demo target")


def test_separation_picture_with_silent_stems_has_no_warnings(tmp_path):
    ref = _refs()
    est = ref * 0.9
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_separation(ref.sum(0), ref, est, ["bass", "drums", "guitar", "piano"], SR,
                        str(tmp_path / "sep.png"))
    assert (tmp_path / "sep.png").stat().st_size > 10_000
