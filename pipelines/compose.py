"""A song composer that writes General MIDI: the default source of `pipelines.synth` (no Ray).

One seed -> one multitrack MIDI file in one of eight styles (rock, metal, pop, jazz, boogie,
funk, ballad, electro). Every instrument follows one chord progression and form: sections
(intro, verse, chorus, bridge, outro) bring instruments in and drop them, with dynamics,
drum fills, rests, pedalled pianos, bent leads and expression swells. Programs cover each
target class (8 basses, 8 guitars, 8 pianos incl. electric pianos and clavinet, 8 drum kits),
some songs have two instruments of a class, and non-target instruments (strings, brass,
reeds, leads, pads, organ, mallets) play too, as in Lakh files. Guitar and piano share
register and harmony.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import mido
import numpy as np

TPB = 480  # ticks per beat
DRUMS = 9
SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10),
          "dorian": (0, 2, 3, 5, 7, 9, 10), "mixolydian": (0, 2, 4, 5, 7, 9, 10)}
PROGRESSIONS = [(0, 4, 5, 3), (0, 5, 3, 4), (5, 3, 0, 4), (0, 3, 4, 4), (1, 4, 0, 0),
                (0, 6, 5, 4), (0, 0, 3, 3, 4, 3, 0, 4), (0, 2, 5, 4), (0, 3, 0, 4), (5, 4, 3, 4)]
BLUES = (0, 0, 0, 0, 3, 3, 0, 0, 4, 3, 0, 4)  # 12-bar, scale degrees
# style -> (tempo range, scale choices, swing, bass / guitar / piano / kit program preferences)
STYLES = {
    "rock": ((96, 150), ("major", "minor", "mixolydian"), 0.0, (33, 34), (29, 30, 27), (0, 1, 4),
             (0, 16, 8)),
    "metal": ((130, 190), ("minor",), 0.0, (34, 33, 38), (30, 29), (0, 1, 6), (16, 0, 8)),
    "pop": ((84, 128), ("major", "minor"), 0.0, (33, 34, 38), (25, 27, 24), (0, 4, 5, 1),
            (0, 8, 24)),
    "jazz": ((100, 200), ("major", "dorian"), 0.62, (32, 35), (26, 24), (0, 4, 1), (32, 40)),
    "boogie": ((110, 170), ("mixolydian", "major"), 0.62, (32, 33), (26, 27, 25), (0, 3, 1),
               (0, 32, 8)),
    "funk": ((92, 118), ("dorian", "mixolydian"), 0.0, (36, 37, 33), (28, 27), (7, 4, 5),
             (0, 24, 8)),
    "ballad": ((60, 84), ("major", "minor"), 0.0, (35, 32, 33), (24, 25), (0, 4, 1, 5),
               (40, 0, 48)),
    "electro": ((110, 135), ("minor", "major"), 0.0, (38, 39), (27, 28), (4, 5, 2), (25, 24)),
}
EXTRAS = (48, 49, 50, 52, 56, 61, 62, 65, 66, 71, 73, 80, 81, 87, 88, 89, 91, 16, 17, 18, 11, 13,
          40, 42, 45, 53, 57, 60, 64, 68, 74, 82, 90, 95, 8, 12)
# GM drum keys
RIM, CLAP, HAT, PEDAL_HAT, OPEN_HAT = 37, 39, 42, 44, 46  # GM drum keys; the rest per song
TOMS = (41, 43, 45, 47, 48, 50)


@dataclass
class Part:
    role: str  # bass, drums, guitar, piano or extra
    program: int
    channel: int
    style: str  # the pattern it plays
    octave: int = 0
    events: list | None = None

    def __post_init__(self):
        self.events = []

    def note(self, tick, dur, key, vel, rng=None):
        if rng is not None:  # humanised: a few ms and a few steps of velocity
            tick = max(0, tick + int(rng.integers(-6, 7)))
            vel = vel + int(rng.integers(-6, 7))
        key, vel = int(np.clip(key, 0, 127)), int(np.clip(vel, 1, 127))
        self.events.append((int(tick), 1, mido.Message("note_on", channel=self.channel, note=key,
                                                       velocity=vel)))
        self.events.append((int(tick + max(10, dur)), 0, mido.Message(
            "note_off", channel=self.channel, note=key, velocity=64)))

    def cc(self, tick, control, value):
        self.events.append((int(tick), 0, mido.Message(
            "control_change", channel=self.channel, control=control, value=int(np.clip(value, 0,
                                                                                      127)))))

    def bend(self, tick, value):
        self.events.append((int(tick), 0, mido.Message("pitchwheel", channel=self.channel,
                                                       pitch=int(np.clip(value, -8192, 8191)))))


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


class Song:
    """The plan of one song: key, chords, form, and who plays what in each section."""

    def __init__(self, seed: int, seconds: float):
        rng = self.rng = np.random.default_rng(seed)
        self.style = _pick(rng, list(STYLES))
        tempo, scales, swing, basses, guitars, pianos, kits = STYLES[self.style]
        self.tempo = float(rng.uniform(*tempo))
        self.meter = 3 if self.style in ("ballad", "jazz") and rng.random() < 0.25 else 4
        self.swing = swing if rng.random() < 0.8 else 0.0
        self.mode = _pick(rng, scales)
        self.root = int(rng.integers(28, 40))  # E1..D#2: the bass register
        bar_s = self.meter * 60 / self.tempo
        self.bars = max(2, int(np.ceil(seconds / bar_s)))
        if self.style == "boogie" or (self.style == "jazz" and rng.random() < 0.4):
            self.degrees = BLUES
        else:
            self.degrees = PROGRESSIONS[int(rng.integers(len(PROGRESSIONS)))]
        self.sections = self._form()
        self.kit = self._kit()
        # a one-bar bass riff (beat, steps from the chord root), for the styles that use riffs
        self.riff = [(b, int(_pick(rng, (0, 0, 0, 7, 12, 10, 5, 3, -2))))
                     for b in sorted(set(_pick(rng, ([0, 0.5, 1.5, 2, 3, 3.5], [0, 0.75, 1.5, 2.5],
                                                    [0, 1, 2, 2.5, 3], [0, 0.5, 1, 2, 2.5, 3.5]))))]
        # programs: the style's favourites, or any program of the class (every one occurs)
        def prog(prefs, lo):
            return int(_pick(rng, prefs) if rng.random() < 0.6 else lo + rng.integers(8))
        channels = iter([c for c in range(16) if c != DRUMS])
        self.parts = [Part("drums", int(_pick(rng, kits) if rng.random() < 0.7 else
                                        _pick(rng, (0, 8, 16, 24, 25, 32, 40, 48))), DRUMS,
                           self.style),
                      Part("bass", prog(basses, 32), next(channels), self.style)]
        # drums play nearly always, keys are often left out (General MIDI pop and rock)
        if rng.random() < 0.8:
            self.parts.append(Part("guitar", prog(guitars, 24), next(channels), self.style))
        if rng.random() < 0.65:
            self.parts.append(Part("piano", prog(pianos, 0), next(channels), self.style))
        for role, lo, p in (("guitar", 24, 0.3), ("piano", 0, 0.2)):  # a second of a class
            if rng.random() < p:
                self.parts.append(Part(role, int(lo + rng.integers(8)), next(channels),
                                       "second"))
        for _ in range(int(rng.choice([0, 1, 1, 2, 2, 3]))):
            self.parts.append(Part("extra", int(_pick(rng, EXTRAS)), next(channels), "extra"))
        if rng.random() < 0.08:  # a song without bass or drums
            self.parts.pop(int(rng.integers(2)))
        if not any(p.role in ("guitar", "piano") for p in self.parts):
            self.parts.append(Part("piano", prog(pianos, 0), next(channels), self.style))

    def _kit(self) -> dict:
        """This song's drum voices on the General MIDI drum map: which kick, snare, cymbals, and
        a percussion layer (tambourine, cowbell, shakers, congas, ...) some songs add."""
        rng = self.rng
        perc = [(54, (1, 3)), (56, (0, 1, 2, 3)), (70, "16"), (69, "8"), (60, (0.5, 1.5, 2.5)),
                (62, (0, 0.75, 2, 2.75)), (63, (1.5, 3.5)), (64, (1, 3)), (75, (0, 1.5, 3)),
                (76, (0.5, 2.5)), (80, "8"), (58, (3,)), (27, (0,)), (31, (3.5,))]
        layer = [perc[i] for i in rng.choice(len(perc), size=int(rng.choice([0, 0, 1, 1, 2])),
                                             replace=False)]
        return {"kick": _pick(rng, (36, 36, 35)), "snare": _pick(rng, (38, 38, 40, 40, 39)),
                "ride": _pick(rng, (51, 51, 59, 53)), "crash": _pick(rng, (49, 49, 57, 55, 52)),
                "perc": layer}

    def _form(self) -> list[dict]:
        rng, out, bar = self.rng, [], 0
        names = ["intro", "verse", "chorus", "bridge", "verse", "chorus", "outro"]
        start = int(rng.integers(3))  # a clip may start in the middle of a song
        for name in names[start:] + names[1:]:
            if bar >= self.bars:
                break
            length = min(int(_pick(rng, (2, 4, 4, 8))), self.bars - bar)
            level = {"intro": 0.6, "verse": 0.75, "chorus": 1.0, "bridge": 0.7,
                     "outro": 0.6}[name] * rng.uniform(0.85, 1.1)
            out.append({"name": name, "start": bar, "bars": length, "level": level})
            bar += length
        return out

    def chord(self, bar: int, beat: float = 0) -> list[int]:
        """Triad or seventh (jazz, funk, boogie) of the bar as pitches over self.root."""
        scale = SCALES[self.mode]
        per_bar = 2 if len(self.degrees) == 8 and self.meter == 4 and beat >= 2 else 1
        idx = (bar * (2 if len(self.degrees) == 8 else 1) + (per_bar - 1)) % len(self.degrees)
        deg = self.degrees[idx]
        size = 4 if self.style in ("jazz", "funk", "boogie") else 3
        return [self.root + scale[(deg + 2 * i) % 7] + 12 * ((deg + 2 * i) // 7)
                for i in range(size)]

    def tick(self, bar: int, beat: float) -> int:
        whole, frac = int(beat), beat - int(beat)
        if self.swing and abs(frac - 0.5) < 1e-6:
            frac = self.swing
        return int((bar * self.meter + whole + frac) * TPB)


def _voicing(chord: list[int], low: int, high: int, size: int) -> list[int]:
    """Chord tones spread upward from `low`, at most `size` notes below `high`."""
    out, pcs, k = [], [c % 12 for c in chord], 0
    note = low + (pcs[0] - low) % 12
    while len(out) < size and note < high:
        out.append(note)
        k += 1
        note = out[-1] + (pcs[k % len(pcs)] - out[-1]) % 12 or 12
    return out


def _melody(song: Song, rng, bars: int, low: int, high: int) -> list[tuple[float, float, int]]:
    """A motif of 1-2 bars on the scale, repeated with variation: [(beat, length, key)]."""
    scale = SCALES[song.mode]
    degrees = [song.root + 12 * o + s for o in range(9) for s in scale]
    pool = [d for d in degrees if low <= d <= high]
    rhythms = [[0, 1, 2, 3], [0, 0.5, 1, 2, 2.5, 3], [0, 1.5, 2, 3], [0, 0.5, 1, 1.5, 2, 3],
               [0, 2], [0.5, 1, 1.5, 2.5, 3, 3.5]]
    motif_len = int(rng.integers(1, 3))
    motif, pos = [], int(rng.integers(len(pool)))
    for b in range(motif_len):
        for beat in _pick(rng, rhythms):
            if beat >= song.meter:
                continue
            pos = int(np.clip(pos + rng.choice([-2, -1, -1, 0, 1, 1, 2, 3, -3]), 0,
                              len(pool) - 1))
            motif.append((b * song.meter + beat, pos))
    out = []
    for start in range(0, bars, motif_len):
        shift = int(rng.choice([0, 0, 1, -1, 2]))
        for k, (beat, p) in enumerate(motif):
            nxt = motif[k + 1][0] if k + 1 < len(motif) else motif_len * song.meter
            out.append((start * song.meter + beat, nxt - beat,
                        pool[int(np.clip(p + shift, 0, len(pool) - 1))]))
    return out


def play_drums(song: Song, p: Part, bar: int, level: float, fill: bool, first: bool) -> None:
    rng, m, style, kit = song.rng, song.meter, p.style, song.kit
    v = lambda base: int(base * level)  # noqa: E731
    t = lambda beat: song.tick(bar, beat)  # noqa: E731
    if first:
        p.note(t(0), TPB, kit["crash"], v(110), rng)
    if style == "jazz":
        for beat in range(m):
            p.note(t(beat), TPB // 2, kit["ride"], v(85 + 10 * (beat % 2)), rng)
            if beat % 2 and m == 4:
                p.note(t(beat + 0.5), TPB // 4, kit["ride"], v(70), rng)
                p.note(t(beat), TPB // 4, PEDAL_HAT, v(70), rng)
            if rng.random() < 0.25:
                p.note(t(beat + _pick(rng, (0.5, 0))), TPB // 4, kit["snare"], v(55), rng)
        p.note(t(0), TPB // 4, kit["kick"], v(60), rng)
    else:
        sub = 4 if style in ("funk", "electro", "metal") and rng.random() < 0.7 else 2
        hat = kit["ride"] if level > 0.95 and rng.random() < 0.4 else HAT
        for k in range(m * sub):
            beat = k / sub
            if style == "ballad" and k % sub:
                continue
            openh = style in ("rock", "pop", "electro") and k % sub == sub // 2 and \
                rng.random() < 0.15
            p.note(t(beat), TPB // 4, OPEN_HAT if openh else hat,
                   v(95 if k % sub == 0 else 70), rng)
        kicks = [0, 2] if m == 4 else [0]
        if style == "metal":
            kicks = [k / 4 for k in range(m * 4)] if rng.random() < 0.5 else \
                [k / 2 for k in range(m * 2)]
        elif style in ("funk", "electro", "rock", "pop"):
            kicks += [b for b in (1.5, 2.5, 3.5, 0.75) if b < m and rng.random() < 0.25]
        for beat in kicks:
            p.note(t(beat), TPB // 4, kit["kick"], v(105), rng)
        back = [1, 3] if m == 4 else [1, 2]
        snare = CLAP if style == "electro" else RIM if style == "ballad" else kit["snare"]
        for beat in back:
            p.note(t(beat), TPB // 4, snare, v(100), rng)
        if style == "funk" and rng.random() < 0.5:
            p.note(t(_pick(rng, (1.75, 3.25, 2.75))), TPB // 8, kit["snare"], v(50), rng)
    for key, beats in kit["perc"]:  # the percussion layer
        if isinstance(beats, str):  # "8" or "16": every eighth or sixteenth note
            n = int(beats) // 4
            beats = [k / n for k in range(m * n)]
        for beat in (b for b in beats if b < m):
            p.note(t(beat), TPB // 4, key, v(70 + 20 * (beat % 1 == 0)), rng)
    if fill:  # the last beats of a section: toms and snare
        start = m - int(rng.integers(1, 3))
        step = _pick(rng, (0.25, 0.5))
        toms = sorted(rng.choice(TOMS, size=3, replace=False), reverse=True)
        for k in range(int((m - start) / step)):
            key = kit["snare"] if rng.random() < 0.3 else \
                toms[min(2, int(k * 3 * step // (m - start)))]
            p.note(t(start + k * step), TPB // 4, int(key), v(90 + 3 * k), rng)


def play_bass(song: Song, p: Part, bar: int, level: float) -> None:
    rng, m, chord = song.rng, song.meter, song.chord(bar)
    root = song.root + (chord[0] - song.root) % 12
    v = int(95 * level)
    if p.style in ("jazz", "boogie"):
        if p.style == "boogie":
            line = [0, 4, 7, 9, 10, 9, 7, 4] if len(chord) > 3 else [0, 4, 7, 9, 12, 9, 7, 4]
            for k in range(m * 2):
                p.note(song.tick(bar, k / 2), TPB // 2 - 20, root + line[k % 8], v, rng)
            return
        nxt = song.chord(bar + 1)[0]
        for beat in range(m):
            key = root if beat == 0 else _pick(rng, chord) if beat < m - 1 else \
                nxt + _pick(rng, (-1, 1, -2))
            p.note(song.tick(bar, beat), TPB - 30, song.root + (key - song.root) % 24, v, rng)
    elif p.style == "funk":
        for k in range(m * 4):
            if rng.random() < (0.9 if k == 0 else 0.4):
                key = root + _pick(rng, (0, 0, 12, 7, 10))
                p.note(song.tick(bar, k / 4), TPB // 4 - 20, key, v + (15 if key > root else 0),
                       rng)
    elif p.style == "ballad":
        p.note(song.tick(bar, 0), m * TPB * 3 // 4, root, v - 10, rng)
        if m == 4:
            p.note(song.tick(bar, 2), 2 * TPB - 40, root + _pick(rng, (7, 12, 0)), v - 20, rng)
    elif p.style in ("rock", "metal", "pop") and rng.random() < 0.4:  # the song's riff
        for beat, step in song.riff:
            if beat < m:
                p.note(song.tick(bar, beat), TPB // 2 - 20, root + step, v, rng)
    else:
        sub = 4 if p.style in ("metal", "electro") and rng.random() < 0.5 else \
            _pick(rng, (1, 2, 2))
        nxt = song.root + (song.chord(bar + 1)[0] - song.root) % 12
        for k in range(m * sub):
            if p.style == "electro" and sub == 2 and k % 2 == 0:
                continue  # off-beat synth bass
            key = root + (12 if rng.random() < 0.1 else 7 if k == m * sub - 1 and
                          rng.random() < 0.4 else 0)
            if k == m * sub - 1 and nxt != root and rng.random() < 0.3:
                key = nxt + _pick(rng, (-1, 1, -2, 2))  # approach the next chord
            p.note(song.tick(bar, k / sub), TPB // sub - 30, key, v - (10 if k % sub else 0),
                   rng)


def play_chords(song: Song, p: Part, bar: int, level: float) -> None:
    """Guitar and piano parts (and chordal extras): the same chords in a shared register."""
    rng, m, chord = song.rng, song.meter, song.chord(bar)
    v, style = int(85 * level), p.style
    if p.role == "piano" and style in ("ballad", "pop", "jazz", "second") and rng.random() < 0.8:
        p.cc(song.tick(bar, 0) + 20, 64, 127)  # the pedal down for the bar, lifted at its end
        p.cc(song.tick(bar + 1, 0) - 30, 64, 0)
    if p.role == "guitar" and style in ("rock", "metal") and rng.random() < 0.8:
        low = song.root + 12 + (chord[0] - song.root) % 12  # power chord: root, fifth, octave
        keys = [low, low + 7, low + 12]
        sub = 4 if style == "metal" and rng.random() < 0.6 else _pick(rng, (1, 2, 2))
        for k in range(m * sub):
            dur = TPB // sub - 40 if sub > 1 and rng.random() < 0.7 else TPB // sub * 2
            for j, key in enumerate(keys):
                p.note(song.tick(bar, k / sub) + 8 * j, dur, key, v, rng)
        return
    low = 52 if p.role == "guitar" else 48
    size = 4 if p.role == "piano" else _pick(rng, (3, 4, 5))
    keys = _voicing(chord, low + int(rng.integers(0, 8)), 84, size)
    if style in ("pop", "ballad", "electro", "second") and rng.random() < 0.5:
        order = keys + keys[-2:0:-1]  # arpeggio
        sub = 2 if style == "ballad" else _pick(rng, (2, 4))
        for k in range(m * sub):
            p.note(song.tick(bar, k / sub), TPB * 2 // sub, order[k % len(order)], v - 5, rng)
        return
    if style == "boogie" and p.role == "piano":  # left hand: the boogie line an octave up
        lh = Part("piano", p.program, p.channel, "boogie")
        play_bass(song, lh, bar, level * 0.9)
        p.events.extend((t, o, msg.copy(note=min(127, msg.note + 12))) for t, o, msg in lh.events)
    hits = {"funk": [k / 4 for k in range(m * 4) if rng.random() < 0.45],
            "jazz": [b for b in (0, 1.5, 2.5, 3.5) if b < m and rng.random() < 0.6],
            "boogie": [b + 0.5 for b in range(m)],
            "ballad": [0]}.get(style, _pick(rng, ([0, 2], [0, 1, 2, 3], [0, 1.5, 2.5, 3],
                                                   [0, 0.5, 1.5, 2, 3])))
    dur = {"funk": TPB // 6, "jazz": TPB // 2}.get(style, TPB)
    for beat in [b for b in hits if b < m] or [0]:
        for j, key in enumerate(keys):
            stagger = 12 * j if p.role == "guitar" else 0  # a strum
            p.note(song.tick(bar, beat) + stagger, dur, key, v - 8 * (beat % 1 > 0), rng)


def play_line(song: Song, p: Part, bar0: int, bars: int, level: float, low: int,
              high: int) -> None:
    """A melody (leads, reeds, lead guitar) with pitch bends and expression swells."""
    rng = song.rng
    for beat, length, key in _melody(song, rng, bars, low, high):
        if rng.random() < 0.12:
            continue  # a rest
        tick = song.tick(bar0, beat)
        dur = int(length * TPB * _pick(rng, (0.9, 0.6, 1.0)))
        if rng.random() < 0.2 and dur > TPB // 2:  # bend up a whole tone and back
            for k in range(5):
                p.bend(tick + dur * k // 8, int(8191 * min(k, 4 - k + 2) / 4))
            p.bend(tick + dur, 0)
        p.note(tick, dur, key, int(90 * level), rng)
    p.cc(song.tick(bar0, 0), 11, int(rng.integers(70, 110)))



def play_extra(song: Song, p: Part, section: dict) -> None:
    """Non-target instruments: pads and strings hold chords, brass stabs, leads sing, mallets
    arpeggiate."""
    rng, family = song.rng, p.program // 8
    first, bars, level = section["start"], section["bars"], section["level"]
    if family in (3, 8, 9, 10):  # leads, reeds, pipes, lead guitar
        play_line(song, p, first, bars, level, 60, 88)
        return
    for bar in range(first, first + bars):
        keys = _voicing(song.chord(bar), 55 + int(rng.integers(0, 7)), 86, 3)
        if family in (2, 5, 6, 11):  # organ, strings, ensembles, pads: held, with a swell
            p.cc(song.tick(bar, 0), 11, 60)
            p.cc(song.tick(bar, song.meter / 2), 11, int(rng.integers(85, 127)))
            for key in keys:
                p.note(song.tick(bar, 0), song.meter * TPB - 20, key, int(70 * level), rng)
        elif family == 7:  # brass stabs
            for beat in (b for b in (0, 1.5, 2.5) if b < song.meter and rng.random() < 0.6):
                for key in keys:
                    p.note(song.tick(bar, beat), TPB // 3, key, int(95 * level), rng)
        else:  # mallets and the rest: arpeggios
            for k in range(song.meter * 2):
                p.note(song.tick(bar, k / 2), TPB // 2, keys[k % len(keys)] + 12,
                       int(75 * level), rng)


def _plays(song: Song, part: Part, section: dict) -> bool:
    rng, intro = song.rng, section["name"] in ("intro", "outro")
    chance = {"drums": 0.7 if intro else 0.97, "bass": 0.6 if intro else 0.92,
              "extra": 0.55}.get(part.role, 0.55 if intro else 0.8)
    return rng.random() < chance


def compose(seed: int, seconds: float) -> bytes:
    """One song as a type-1 General MIDI file (a tempo track, then one track per instrument)."""
    song = Song(seed, seconds)
    rng = song.rng
    tempo_events = [(0, 0, mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(song.tempo))),
                    (0, 0, mido.MetaMessage("time_signature", numerator=song.meter,
                                            denominator=4))]
    for part in song.parts:
        part.cc(0, 7, int(rng.integers(80, 116)))
        part.events.append((0, 0, mido.Message("program_change", channel=part.channel,
                                               program=part.program)))
    for si, section in enumerate(song.sections):
        if si and rng.random() < 0.1:  # a tempo change at a section
            tempo_events.append((song.tick(section["start"], 0), 0, mido.MetaMessage(
                "set_tempo", tempo=mido.bpm2tempo(song.tempo * rng.uniform(0.9, 1.1)))))
        active = [p for p in song.parts if _plays(song, p, section)]
        if not any(p.role in ("guitar", "piano") for p in active):
            active += [p for p in song.parts if p.role in ("guitar", "piano")][:1]
        for part in active:
            if part.role == "guitar" and section["name"] == "chorus" and rng.random() < 0.1:
                part.events.append((song.tick(section["start"], 0), 0, mido.Message(
                    "program_change", channel=part.channel, program=int(24 + rng.integers(8)))))
            if part.role == "extra" or (part.style == "second" and part.role == "guitar" and
                                        rng.random() < 0.4):
                play_extra(song, part, section) if part.role == "extra" else \
                    play_line(song, part, section["start"], section["bars"], section["level"],
                              55, 84)
                continue
            for bar in range(section["start"], section["start"] + section["bars"]):
                if rng.random() < 0.06:
                    continue  # a bar of rest
                last = bar == section["start"] + section["bars"] - 1
                if part.role == "drums":
                    play_drums(song, part, bar, section["level"], last and rng.random() < 0.6,
                               bar == section["start"] and si > 0)
                elif part.role == "bass":
                    play_bass(song, part, bar, section["level"])
                else:
                    play_chords(song, part, bar, section["level"])
    return midi_bytes([[(tick, msg) for tick, _, msg in sorted(events, key=lambda e: e[:2])]
                       for events in [tempo_events] + [p.events for p in song.parts]], TPB)


def midi_bytes(tracks, ticks_per_beat: int) -> bytes:
    """A type-1 Standard MIDI File of `tracks`, each a time-ordered list of (tick, message)."""
    midi = mido.MidiFile(type=1, ticks_per_beat=ticks_per_beat)
    for events in tracks:
        track, prev = mido.MidiTrack(), 0
        for tick, msg in events:
            track.append(msg.copy(time=tick - prev))
            prev = tick
        midi.tracks.append(track)
    buf = io.BytesIO()
    midi.save(file=buf)
    return buf.getvalue()
