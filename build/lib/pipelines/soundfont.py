"""SoundFont synthesis of one MIDI instrument at a time, with TinySoundFont (no Ray import).

`tinysoundfont` is a pip wheel with no system library. Its package metadata asks for pyaudio
(live playback only, which needs PortAudio to build), so it is installed with `--no-deps`.
The default SoundFont is the General MIDI one (TimGM6mb.sf2) inside the pretty-midi wheel,
found at run time. The pedal is applied here (TinySoundFont ignores controller 64): a note
released while the pedal is down sounds on until the pedal lifts.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import numpy as np

from .midi import BANK_LSB, BANK_MSB, SUSTAIN, Instrument, Score

DEFAULT_NAME = "TimGM6mb.sf2"
INSTALL_HINT = ("pip install --no-deps 'tinysoundfont==0.3.7' (its pyaudio requirement is only "
                "for live playback and needs PortAudio to build; `make install` does this)")
# controllers that do not belong in a mono stem: pan, reverb / chorus sends (TinySoundFont has no
# effects), bank select (the preset is chosen once, below); the pedal is handled here
SKIPPED_CONTROLS = {BANK_MSB, BANK_LSB, SUSTAIN, 10, 91, 93}
MAX_VOICES = 256
FLUSH = 4096  # samples rendered and dropped after a reset: no tail crosses into the next stem


class SoundFontError(ValueError):
    """A SoundFont that cannot be used (missing, unreadable, not a SoundFont, no presets)."""


def _tsf():
    try:
        from tinysoundfont import _tinysoundfont
    except ImportError as e:
        raise SoundFontError(f"the SoundFont synthesizer is not installed: {INSTALL_HINT}") from e
    return _tinysoundfont


def default_soundfont() -> str:
    """Path of the General MIDI SoundFont that the pretty-midi wheel ships (never copied)."""
    spec = importlib.util.find_spec("pretty_midi")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, DEFAULT_NAME)
        if os.path.isfile(path):
            return path
    raise SoundFontError(f"no default SoundFont: `pip install pretty_midi` (its wheel ships "
                         f"{DEFAULT_NAME}) or pass --soundfont FILE")


@dataclass(frozen=True)
class Preset:
    index: int  # TinySoundFont's preset index
    bank: int
    program: int
    name: str
    fallback: str  # why another bank or kit than asked plays, or ""


class SoundFont:
    """One .sf2/.sf3 file, loaded once per process; each instrument is rendered after a reset,
    so it plays alone on a fresh synthesizer."""

    def __init__(self, path: str):
        self.path, self.name = path, os.path.basename(path)
        if not os.path.isfile(path):
            raise SoundFontError(f"SoundFont {path}: no such file")
        tsf = _tsf()
        try:
            self.synth = tsf.SoundFont(path)
        except (RuntimeError, OSError) as e:
            raise SoundFontError(f"SoundFont {path}: cannot be loaded ({e})") from None
        if self.synth.get_preset_count() == 0:
            raise SoundFontError(f"SoundFont {path}: has no presets")
        self.mono = tsf.OutputMode.Mono

    def preset(self, part: Instrument) -> Preset | None:
        """The preset that plays `part`: its bank and program; else bank 0 (GM fallback), or the
        standard kit for an unknown drum kit; None if the SoundFont lacks the program."""
        bank = 128 if part.is_drum else part.bank
        asked = [(bank, part.program)]
        asked.append((128, 0) if part.is_drum else (0, part.program))
        for i, (b, p) in enumerate(dict.fromkeys(asked)):
            index = self.synth.get_preset_index(b, p)
            if index >= 0:
                why = "" if i == 0 else (f"{'kit' if part.is_drum else 'program'} "
                                         f"{part.program} bank {part.bank} not in {self.name}: "
                                         f"played {'kit' if part.is_drum else 'bank'} 0")
                return Preset(index, b, p, self.synth.get_preset_name(b, p), why)
        return None

    def render(self, score: Score, part: Instrument, preset: Preset, sample_rate: int,
               num_samples: int) -> np.ndarray:
        """`part` with its channel's controllers, bends and pedal, mono float32 [num_samples]."""
        s = self.synth
        s.set_output(self.mono, sample_rate, 0.0)
        s.set_max_voices(MAX_VOICES)
        s.reset()  # frees the channels; the last instrument's voices get a quick release...
        s.render(memoryview(np.zeros(FLUSH, np.float32)).cast("B"), False)  # ...heard here
        ch = part.channel
        s.channel_set_preset_index(ch, preset.index)
        events = sorted(score.controls.get(ch, []) + part.events, key=lambda e: (e[0], e[1]))
        to_seconds = score.timeline()
        out = np.zeros(num_samples, np.float32)
        view = memoryview(out).cast("B")
        pos, pedal, held = 0, False, []
        for tick, _, msg in events:
            at = min(num_samples, round(to_seconds(tick) * sample_rate))
            if at > pos:
                s.render(view[pos * 4 : at * 4], False)
                pos = at
            if msg.type == "note_on":
                s.channel_note_on(ch, msg.note, msg.velocity / 127.0)
            elif msg.type == "note_off":
                if pedal:
                    held.append(msg.note)
                else:
                    s.channel_note_off(ch, msg.note)
            elif msg.type == "pitchwheel":
                s.channel_set_pitch_wheel(ch, msg.pitch + 8192)
            elif msg.control == SUSTAIN:
                pedal = msg.value >= 64
                if not pedal:
                    for note in held:
                        s.channel_note_off(ch, note)
                    held.clear()
            elif msg.control not in SKIPPED_CONTROLS:
                s.channel_midi_control(ch, msg.control, msg.value)
        if pos < num_samples:
            s.render(view[pos * 4 :], False)
        return out
