"""Slakh-format multitrack song generator for demos, tests and benchmarks (no Ray import).

Two renderers. `soundfont` (the default): `compose.compose` writes the song as General MIDI and
`rendering.render_track` plays every instrument with a SoundFont, the code `pipelines.render`
runs on real MIDI files. `additive` (fast unit tests, the generator of the first releases):
each song shares a tempo, key and chord progression across its instruments: bass on chord roots,
a drum pattern, strummed guitar and piano voicings, plus non-target instruments (strings, lead).
Some songs lack a class, some have two guitars, some stems are `audio_rendered: false`. The tree is
the Slakh2100 layout: ROOT/{split}/TrackNNNNN/{metadata.yaml, mix.flac, stems/SNN.flac}, 44.1 kHz.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import yaml

SR = 44100
PROGRESSIONS = {  # scale degrees (0-based) of one chord per bar
    "major": [[0, 4, 5, 3], [0, 5, 3, 4], [1, 4, 0, 5], [0, 3, 4, 3], [5, 3, 0, 4]],
    "minor": [[0, 5, 2, 6], [0, 3, 4, 0], [0, 6, 5, 6], [0, 3, 6, 2]],
}
SCALES = {"major": [0, 2, 4, 5, 7, 9, 11], "minor": [0, 2, 3, 5, 7, 8, 10]}
# (inst_class, program_num, midi_program_name, plugin_name) per instrument role
INSTRUMENTS = {
    "bass": ("Bass", 33, "Electric Bass (finger)", "scarbee_jay_bass_both.nkm"),
    "drums": ("Drums", 0, "Standard Kit", "session_kit_full.nkm"),
    "guitar": ("Guitar", 25, "Acoustic Guitar (steel)", "acoustic_guitar.nkm"),
    "guitar2": ("Guitar", 29, "Overdriven Guitar", "elektrik_guitar.nkm"),
    "piano": ("Piano", 0, "Acoustic Grand Piano", "grand_piano.nkm"),
    "strings": ("Strings (continued)", 48, "String Ensemble 1", "session_strings.nkm"),
    "lead": ("Synth Lead", 81, "Lead 2 (sawtooth)", "massive_lead.nkm"),
}


@dataclass(frozen=True)
class Song:
    seed: int
    seconds: float
    tempo: float
    root: int  # MIDI note of the key's tonic (octave 2)
    mode: str
    progression: tuple[int, ...]
    roles: tuple[str, ...]  # rendered instrument roles, in stem order
    unrendered: tuple[str, ...]  # roles listed in metadata with audio_rendered: false


def midi_hz(note: float) -> float:
    return 440.0 * 2 ** ((note - 69) / 12)


def _env(n: int, attack: float, decay: float) -> np.ndarray:
    t = np.arange(n) / SR
    return np.minimum(t / max(attack, 1e-4), 1.0) * np.exp(-t / decay)


def _tone(freq: float, n: int, partials, decay: float, attack=0.005, inharm=0.0, rng=None):
    t = np.arange(n) / SR
    out = np.zeros(n)
    for k, amp in enumerate(partials, start=1):
        f = freq * k * math.sqrt(1 + inharm * k * k)
        if f >= SR / 2:
            break
        phase = rng.uniform(0, 2 * np.pi) if rng is not None else 0.0
        out += amp * np.sin(2 * np.pi * f * t + phase) * np.exp(-t * k / (decay * 4))
    return out * _env(n, attack, decay)


def _add(buf: np.ndarray, start: int, sig: np.ndarray) -> None:
    end = min(len(buf), start + len(sig))
    if start < end:
        buf[start:end] += sig[: end - start]


def _chord(song: Song, bar: int) -> list[int]:
    scale = SCALES[song.mode]
    deg = song.progression[bar % len(song.progression)]
    return [song.root + scale[(deg + i) % 7] + 12 * ((deg + i) // 7) for i in (0, 2, 4)]


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def render(song: Song) -> dict[str, np.ndarray]:
    """Render every rendered role of `song` as mono float64 at 44.1 kHz."""
    rng = np.random.default_rng(song.seed)
    n = int(song.seconds * SR)
    beat = 60.0 / song.tempo
    bars = int(math.ceil(song.seconds / (4 * beat))) + 1
    out = {r: np.zeros(n) for r in song.roles}
    bass_pattern = _pick(rng, [[0, 2], [0, 1, 2, 3], [0, 1.5, 2, 3.5], [0, 0.5, 2, 2.5]])
    strum = _pick(rng, [[0, 1, 2, 3], [0, 1.5, 2.5, 3], [0, 2]])
    piano_pattern = _pick(rng, ["block", "arp"])
    for bar in range(bars):
        t0 = bar * 4 * beat
        chord = _chord(song, bar)
        if "bass" in out:
            for j, b in enumerate(bass_pattern):
                note = chord[0] + (7 if j % 2 and rng.random() < 0.3 else 0)
                dur = int(beat * 0.9 * SR)
                _add(out["bass"], int((t0 + b * beat) * SR),
                     0.5 * _tone(midi_hz(note), dur, [1, 0.5, 0.25, 0.1], 0.35, 0.004))
        if "drums" in out:
            for b in range(4):
                at = int((t0 + b * beat) * SR)
                if b in (0, 2) or rng.random() < 0.15:
                    k = int(0.3 * SR)
                    tk = np.arange(k) / SR
                    sweep = np.sin(2 * np.pi * np.cumsum(50 + 100 * np.exp(-tk * 30)) / SR)
                    _add(out["drums"], at, 0.8 * sweep * np.exp(-tk * 12))
                if b in (1, 3):
                    k = int(0.2 * SR)
                    tk = np.arange(k) / SR
                    snare = rng.standard_normal(k) * 0.4 + 0.3 * np.sin(2 * np.pi * 185 * tk)
                    _add(out["drums"], at, 0.6 * snare * np.exp(-tk * 25))
                for half in (0, 0.5):
                    k = int(0.06 * SR)
                    hat = np.diff(rng.standard_normal(k + 1)) * np.exp(-np.arange(k) / SR * 60)
                    _add(out["drums"], int((t0 + (b + half) * beat) * SR), 0.15 * hat)
        for role, octave, partials, decay in (("guitar", 12, [1, 0.7, 0.5, 0.35, 0.25, 0.15], 0.5),
                                              ("guitar2", 12, [1, 0.9, 0.8, 0.6, 0.5, 0.4], 0.3)):
            if role not in out:
                continue
            for b in strum:
                for i, note in enumerate(sorted(chord + [chord[0] + 12])):
                    at = int((t0 + b * beat + 0.012 * i) * SR)
                    _add(out[role], at, 0.22 * _tone(midi_hz(note + octave), int(beat * 1.2 * SR),
                                                     partials, decay, 0.002, rng=rng))
        if "piano" in out:
            voicing = [c + 24 for c in chord] + [chord[1] + 36]
            hits = [(0, voicing), (2, voicing)] if piano_pattern == "block" else \
                [(i * 0.5, [voicing[i % 4]]) for i in range(8)]
            for b, notes in hits:
                for note in notes:
                    _add(out["piano"], int((t0 + b * beat) * SR),
                         0.2 * _tone(midi_hz(note), int(beat * 2 * SR), [1, 0.4, 0.2, 0.1, 0.05],
                                     0.8, 0.003, inharm=4e-4))
        if "strings" in out:
            for note in chord:
                _add(out["strings"], int(t0 * SR),
                     0.08 * _tone(midi_hz(note + 12), int(4 * beat * SR), [1, 0.6, 0.4, 0.3],
                                  8.0, 0.4))
        if "lead" in out:
            scale = SCALES[song.mode]
            for b in range(4):
                if rng.random() < 0.6:
                    note = song.root + 24 + scale[rng.integers(0, 7)]
                    _add(out["lead"], int((t0 + b * beat) * SR),
                         0.1 * _tone(midi_hz(note), int(beat * SR), [1, 0.5, 0.33, 0.25], 0.6))
    return out


def make_song(seed: int, seconds: float) -> Song:
    rng = np.random.default_rng(seed)
    mode = _pick(rng, ["major", "minor"])
    prog = PROGRESSIONS[mode][int(rng.integers(len(PROGRESSIONS[mode])))]
    roles = ["bass", "drums", "guitar", "piano"]
    if rng.random() < 0.15:  # a song lacking a class
        roles.remove(_pick(rng, ["guitar", "piano", "bass"]))
    if "guitar" in roles and rng.random() < 0.3:
        roles.append("guitar2")  # two guitar stems, summed by prepare
    if rng.random() < 0.5:
        roles.append("strings")  # non-target instrument
    if rng.random() < 0.3:
        roles.append("lead")
    unrendered = ("piano",) if rng.random() < 0.1 else ()
    order = rng.permutation(len(roles))
    roles = [roles[i] for i in order if roles[i] not in unrendered]
    return Song(seed=seed, seconds=seconds, tempo=float(rng.uniform(90, 140)),
                root=int(rng.integers(36, 48)), mode=mode, progression=tuple(prog),
                roles=tuple(roles), unrendered=tuple(unrendered))


def _loudness(x: np.ndarray) -> float:
    return float(20 * np.log10(np.sqrt(np.mean(x**2)) + 1e-12))


def write_track(song: Song, folder: Path) -> dict:
    """Write one track folder (metadata.yaml, mix.flac, stems/SNN.flac); returns the metadata."""
    audio = render(song)
    (folder / "stems").mkdir(parents=True, exist_ok=True)
    mix = sum(audio.values())
    gain = 0.9 / max(np.abs(mix).max(), 1e-6)
    stems_meta = {}
    for i, role in enumerate(list(song.roles) + list(song.unrendered)):
        inst, program, name, plugin = INSTRUMENTS[role]
        sid = f"S{i:02d}"
        rendered = role not in song.unrendered
        stems_meta[sid] = {
            "audio_rendered": rendered, "inst_class": inst,
            "integrated_loudness": _loudness(audio[role] * gain) if rendered else None,
            "is_drum": role == "drums", "midi_program_name": name, "midi_saved": True,
            "plugin_name": plugin, "program_num": program,
        }
        if rendered:
            sf.write(folder / "stems" / f"{sid}.flac", (audio[role] * gain).astype(np.float32),
                     SR, subtype="PCM_16")
    sf.write(folder / "mix.flac", (mix * gain).astype(np.float32), SR, subtype="PCM_16")
    uuid = hashlib.md5(str(song.seed).encode()).hexdigest()
    meta = {
        "UUID": uuid, "audio_dir": "stems", "lmd_midi_dir": f"lmd_matched/synth/{uuid}.mid",
        "midi_dir": "MIDI", "normalization_factor": -13.0, "normalized": True,
        "overall_gain": float(gain), "stems": stems_meta, "target_peak": -1.0,
    }
    (folder / "metadata.yaml").write_text(yaml.safe_dump(meta, sort_keys=True))
    return meta


def split_of(index: int, total: int) -> str:
    """70 / 15 / 15 % train / validation / test, at least one track each from 3 tracks on."""
    n_test = max(1, round(0.15 * total)) if total >= 3 else 0
    n_val = max(1, round(0.15 * total)) if total >= 2 else 0
    n_train = total - n_val - n_test
    return "train" if index < n_train else "validation" if index < n_train + n_val else "test"


def track_folder(root: str | Path, index: int, total: int) -> Path:
    return Path(root) / split_of(index, total) / f"Track{index + 1:05d}"


def song_seed(seed: int, index: int) -> int:
    return seed * 100_003 + index


RENDERERS = ("soundfont", "additive")


def write_song(seed: int, seconds: float, folder: str | Path, renderer: str = "soundfont",
               soundfonts=("default",)) -> dict:
    """One generated song as a Slakh track folder; returns its metadata."""
    if renderer == "additive":
        return write_track(make_song(seed, seconds), Path(folder))
    if renderer != "soundfont":
        raise ValueError(f"renderer must be one of {RENDERERS}, got {renderer!r}")
    from . import rendering
    from .compose import compose
    from .render_stages import load_soundfonts

    data = compose(seed, seconds)
    r = rendering.render_track(data, f"generated/{seed}.mid", load_soundfonts(soundfonts),
                               seed=seed, sample_rate=SR, seconds=seconds)
    rendering.write_track(r, str(folder))
    return r.meta


def generate_dataset(root: str | Path, tracks: int, seconds: float = 12.0, seed: int = 0,
                     progress=None, renderer: str = "additive") -> list[Path]:
    """Write `tracks` songs under root/{train,validation,test}/TrackNNNNN (Slakh numbering)."""
    if tracks < 1 or seconds <= 0:
        raise ValueError("need tracks >= 1 and seconds > 0")
    out = []
    for i in range(tracks):
        folder = track_folder(root, i, tracks)
        write_song(song_seed(seed, i), seconds, folder, renderer)
        out.append(folder)
        if progress:
            progress(i + 1, tracks, folder)
    return out
