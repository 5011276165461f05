"""pipelines.compose and `synth --renderer soundfont`: the song generator writes General MIDI
with the variety of real songs, and synth renders it through the code of pipelines.render."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import yaml

from pipelines import synth
from pipelines.compose import STYLES, Song, compose
from pipelines.midi import parse

SEEDS = range(120)


@pytest.fixture(scope="module")
def scores():
    return {seed: parse(compose(seed, 20.0)) for seed in SEEDS}


def _class(part) -> str:
    return "drums" if part.is_drum else {0: "piano", 3: "guitar", 4: "bass"}.get(
        part.program // 8, "other")


def test_compose_is_deterministic():
    assert compose(7, 12.0) == compose(7, 12.0)
    assert compose(7, 12.0) != compose(8, 12.0)


def test_every_program_of_each_class_and_several_kits_occur(scores):
    programs = {c: set() for c in ("bass", "guitar", "piano", "drums")}
    for score in scores.values():
        for part in score.instruments:
            if _class(part) in programs:
                programs[_class(part)].add(part.program)
    assert programs["bass"] == set(range(32, 40))
    assert programs["guitar"] == set(range(24, 32))  # incl. overdriven and distortion (29, 30)
    assert programs["piano"] == set(range(0, 8))  # incl. electric pianos (4, 5), clavinet (7)
    assert len(programs["drums"]) >= 6
    assert {Song(s, 20.0).style for s in SEEDS} == set(STYLES)


def test_songs_have_doubled_classes_and_non_target_instruments(scores):
    doubled = sum(any(n > 1 for c, n in Counter(_class(p) for p in s.instruments).items()
                      if c in ("guitar", "piano")) for s in scores.values())
    others = Counter(p.program // 8 for s in scores.values() for p in s.instruments
                     if _class(p) == "other")
    assert doubled >= 0.2 * len(SEEDS)
    assert sum(any(_class(p) == "other" for p in s.instruments) for s in scores.values()) >= \
        0.5 * len(SEEDS)
    for family in (5, 6, 7, 10, 11):  # strings, ensembles, brass, leads, pads
        assert others[family] > 0, family


def _activity(score, seconds: float, step: float = 1.0) -> dict[str, np.ndarray]:
    """Per class: does a note sound in each `step`-second slot."""
    to_s = score.timeline()
    slots = {}
    for part in score.instruments:
        act = slots.setdefault(_class(part), np.zeros(int(seconds / step) + 1, bool))
        ons = [to_s(t) for t, _, m in part.events if m.type == "note_on"]
        for t in ons:
            act[min(len(act) - 1, int(t / step))] = True
    return slots


def test_sections_drop_instruments_and_dynamics_vary(scores):
    drops = 0
    for score in scores.values():
        act = _activity(score, 20.0, 2.0)
        targets = [act[c] for c in ("bass", "drums", "guitar", "piano") if c in act]
        # a class that plays in the song but rests for a 2-second slot while others play
        busy = np.sum(targets, 0)[:-1] >= 2
        drops += any(a.any() and (~a[:-1] & busy).any() for a in targets)
    assert drops >= 0.3 * len(SEEDS)
    velocities = [m.velocity for s in scores.values() for p in s.instruments
                  for _, _, m in p.events if m.type == "note_on"]
    low, high = np.percentile(velocities, [5, 95])
    assert high - low >= 40  # soft and loud notes: sections, accents, ghost notes


def test_guitar_and_piano_share_register_and_expression_is_used(scores):
    overlaps, pedals, bends = [], 0, 0
    for score in scores.values():
        keys = {c: [m.note for p in score.instruments if _class(p) == c
                    for _, _, m in p.events if m.type == "note_on"] for c in ("guitar", "piano")}
        if keys["guitar"] and keys["piano"]:
            g, p = np.percentile(keys["guitar"], [10, 90]), np.percentile(keys["piano"], [10, 90])
            overlaps.append(min(g[1], p[1]) - max(g[0], p[0]))
        controls = [m for msgs in score.controls.values() for _, _, m in msgs]
        pedals += any(m.type == "control_change" and m.control == 64 for m in controls)
        bends += any(m.type == "pitchwheel" for m in controls)
    assert np.median(overlaps) >= 7  # a fifth or more of shared register in a typical song
    assert pedals >= 0.2 * len(SEEDS) and bends >= 0.1 * len(SEEDS)


def test_synth_renders_composed_midi_in_slakhs_layout(tmp_path):
    folders = synth.main(["--output", str(tmp_path), "--tracks", "3", "--seconds", "4",
                          "--workers", "1", "--seed", "5"])
    assert len(folders) == 3
    for folder in map(type(tmp_path), folders):
        meta = yaml.safe_load((folder / "metadata.yaml").read_text())
        assert (folder / "all_src.mid").exists() and (folder / "mix.flac").exists()
        for sid, stem in meta["stems"].items():
            assert (folder / "MIDI" / f"{sid}.mid").exists()
            assert stem["audio_rendered"] == (folder / "stems" / f"{sid}.flac").exists()
            assert stem["plugin_name"].startswith("TimGM6mb.sf2")
