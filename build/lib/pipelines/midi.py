"""Standard MIDI files -> the instruments Slakh renders one by one (no Ray import).

A MIDI *instrument* (one Slakh stem) is the notes one track plays on one channel with one
program and bank: a program change starts a new instrument, channel 10 (index 9) is drums with
the program as the kit. Channel state is the synthesizer's, not the track's: controllers, pitch
bends and the sustain pedal of a channel apply to every instrument on it, whichever track sends
them, and each instrument carries them so that it can be rendered alone. Bad input raises
`MidiError` whose message is the reason written to the report.
"""

from __future__ import annotations

import bisect
import io
from dataclasses import dataclass, field

import mido

DRUM_CHANNEL = 9
BANK_MSB, BANK_LSB, SUSTAIN = 0, 32, 64
# GM program families (0-based, 8 programs each), named as Slakh's inst_class values
FAMILIES = ("Piano", "Chromatic Percussion", "Organ", "Guitar", "Bass", "Strings",
            "Strings (continued)", "Brass", "Reed", "Pipe", "Synth Lead", "Synth Pad",
            "Synth Effects", "Ethnic", "Percussive", "Sound Effects")
# General MIDI Level 1 program names (0-based) and the GS / GM2 drum kits by program
PROGRAM_NAMES = tuple((
    "Acoustic Grand Piano|Bright Acoustic Piano|Electric Grand Piano|Honky-tonk Piano|"
    "Electric Piano 1|Electric Piano 2|Harpsichord|Clavinet|Celesta|Glockenspiel|Music Box|"
    "Vibraphone|Marimba|Xylophone|Tubular Bells|Dulcimer|Drawbar Organ|Percussive Organ|"
    "Rock Organ|Church Organ|Reed Organ|Accordion|Harmonica|Tango Accordion|"
    "Acoustic Guitar (nylon)|Acoustic Guitar (steel)|Electric Guitar (jazz)|"
    "Electric Guitar (clean)|Electric Guitar (muted)|Overdriven Guitar|Distortion Guitar|"
    "Guitar Harmonics|Acoustic Bass|Electric Bass (finger)|Electric Bass (pick)|Fretless Bass|"
    "Slap Bass 1|Slap Bass 2|Synth Bass 1|Synth Bass 2|Violin|Viola|Cello|Contrabass|"
    "Tremolo Strings|Pizzicato Strings|Orchestral Harp|Timpani|String Ensemble 1|"
    "String Ensemble 2|Synth Strings 1|Synth Strings 2|Choir Aahs|Voice Oohs|Synth Choir|"
    "Orchestra Hit|Trumpet|Trombone|Tuba|Muted Trumpet|French Horn|Brass Section|Synth Brass 1|"
    "Synth Brass 2|Soprano Sax|Alto Sax|Tenor Sax|Baritone Sax|Oboe|English Horn|Bassoon|"
    "Clarinet|Piccolo|Flute|Recorder|Pan Flute|Blown Bottle|Shakuhachi|Whistle|Ocarina|"
    "Lead 1 (square)|Lead 2 (sawtooth)|Lead 3 (calliope)|Lead 4 (chiff)|Lead 5 (charang)|"
    "Lead 6 (voice)|Lead 7 (fifths)|Lead 8 (bass + lead)|Pad 1 (new age)|Pad 2 (warm)|"
    "Pad 3 (polysynth)|Pad 4 (choir)|Pad 5 (bowed)|Pad 6 (metallic)|Pad 7 (halo)|Pad 8 (sweep)|"
    "FX 1 (rain)|FX 2 (soundtrack)|FX 3 (crystal)|FX 4 (atmosphere)|FX 5 (brightness)|"
    "FX 6 (goblins)|FX 7 (echoes)|FX 8 (sci-fi)|Sitar|Banjo|Shamisen|Koto|Kalimba|Bagpipe|"
    "Fiddle|Shanai|Tinkle Bell|Agogo|Steel Drums|Woodblock|Taiko Drum|Melodic Tom|Synth Drum|"
    "Reverse Cymbal|Guitar Fret Noise|Breath Noise|Seashore|Bird Tweet|Telephone Ring|"
    "Helicopter|Applause|Gunshot").split("|"))
DRUM_KITS = {0: "Standard Kit", 8: "Room Kit", 16: "Power Kit", 24: "Electronic Kit",
             25: "TR-808 Kit", 32: "Jazz Kit", 40: "Brush Kit", 48: "Orchestra Kit",
             56: "SFX Kit"}


class MidiError(ValueError):
    """A MIDI file that cannot be rendered; the message is the reason in `_report.json`."""


@dataclass(frozen=True)
class Limits:
    """What the renderer accepts; anything outside is a report row, not a crash."""

    max_seconds: float = 1200.0  # 20 min: Lakh songs are shorter; a 10-hour file is an error
    max_instruments: int = 128
    max_events: int = 2_000_000
    min_bpm: float = 8.0
    max_bpm: float = 1000.0


@dataclass
class Instrument:
    """One stem: its notes and the channel state it is played with, as (tick, order, message)."""

    track: int
    channel: int
    program: int
    bank: int
    name: str
    events: list = field(default_factory=list)  # note_on / note_off of its own notes
    notes: int = 0

    @property
    def is_drum(self) -> bool:
        return self.channel == DRUM_CHANNEL

    @property
    def inst_class(self) -> str:
        return "Drums" if self.is_drum else FAMILIES[self.program // 8]

    @property
    def program_name(self) -> str:
        if self.is_drum:
            return DRUM_KITS.get(self.program, f"Drum Kit {self.program}")
        return PROGRAM_NAMES[self.program]


@dataclass
class Score:
    """A parsed file: instruments, per-channel control events and the tempo map (ticks)."""

    ticks_per_beat: int
    tempos: list  # [(tick, microseconds per beat)], sorted, starting at tick 0
    meta: list  # [(tick, order, MetaMessage)]: tempo, time and key signatures (tempo track)
    controls: dict  # channel -> [(tick, order, message)]: control changes and pitch bends
    instruments: list[Instrument]
    last_tick: int  # the last note-off

    def timeline(self):
        """A tick -> seconds function through the tempo map."""
        ticks = [at for at, _ in self.tempos]
        scale = [tempo / (1e6 * self.ticks_per_beat) for _, tempo in self.tempos]
        starts = [0.0]
        for i in range(1, len(ticks)):
            starts.append(starts[-1] + (ticks[i] - ticks[i - 1]) * scale[i - 1])

        def to_seconds(tick: int) -> float:
            i = bisect.bisect_right(ticks, tick) - 1
            return starts[i] + (tick - ticks[i]) * scale[i]

        return to_seconds

    @property
    def seconds(self) -> float:
        """When the last note ends (before any pedal or release tail)."""
        return self.timeline()(self.last_tick)


def unwrap(data: bytes) -> bytes:
    """The Standard MIDI File inside `data` (a RIFF RMID file wraps one)."""
    if data[:4] == b"RIFF" and data[8:12] == b"RMID":
        at = data.find(b"MThd", 12, 64)
        if at > 0:
            return data[at:]
    return data


def read(data: bytes, limits: Limits = Limits()) -> mido.MidiFile:
    """Parse bytes with mido; every failure is a MidiError naming what is wrong."""
    data = unwrap(data)
    if len(data) == 0:
        raise MidiError("empty file")
    if data[:4] != b"MThd":
        raise MidiError("not a MIDI file (no MThd header)")
    try:
        midi = mido.MidiFile(file=io.BytesIO(data), clip=True)
    except Exception as e:  # mido raises EOFError, OSError, KeyError, ValueError, IndexError...
        raise MidiError(f"corrupt MIDI file ({type(e).__name__}: {e})") from None
    if midi.type == 2:
        raise MidiError("type 2 MIDI file (independent sequences) is not supported")
    if not 0 < midi.ticks_per_beat < 0x8000:
        raise MidiError(f"time division {midi.ticks_per_beat} (SMPTE) is not supported")
    if sum(len(t) for t in midi.tracks) > limits.max_events:
        raise MidiError(f"too many MIDI events (limit {limits.max_events})")
    return midi


def _merged(midi: mido.MidiFile) -> list:
    """Every message of every track as (tick, order, track, message), in playback order."""
    out = []
    for ti, track in enumerate(midi.tracks):
        tick = 0
        for i, msg in enumerate(track):
            tick += msg.time
            out.append((tick, (ti, i), ti, msg))
    out.sort(key=lambda e: (e[0], e[1]))
    return out


def _tempo_map(events, limits: Limits) -> list:
    tempos = [(0, 500_000)]
    for tick, _, _, msg in events:
        if msg.type != "set_tempo":
            continue
        bpm = 60e6 / msg.tempo if msg.tempo > 0 else float("inf")
        if not limits.min_bpm <= bpm <= limits.max_bpm:
            raise MidiError(f"absurd tempo {bpm:.4g} BPM at tick {tick} (accepted: "
                            f"{limits.min_bpm:g}-{limits.max_bpm:g} BPM)")
        if tempos[-1][0] == tick:
            tempos[-1] = (tick, msg.tempo)
        else:
            tempos.append((tick, msg.tempo))
    return tempos


def parse(data: bytes, limits: Limits = Limits()) -> Score:
    """MIDI bytes -> Score, checked against `limits`: note-offs pair with the oldest open note of
    their channel and key; notes never released end at the last event."""
    midi = read(data, limits)
    events = _merged(midi)
    tempos = _tempo_map(events, limits)
    names = {}
    program, bank = [0] * 16, [0] * 16
    parts: dict[tuple, Instrument] = {}
    open_notes: dict[tuple[int, int], list[Instrument]] = {}
    controls: dict[int, list] = {}
    meta = []
    for tick, order, ti, msg in events:
        kind = msg.type
        if kind == "track_name" and ti not in names:
            names[ti] = msg.name.strip()
        elif kind in ("set_tempo", "time_signature", "key_signature"):
            meta.append((tick, order, msg))
        elif kind == "program_change":
            program[msg.channel] = msg.program
        elif kind == "control_change" and msg.control == BANK_MSB:
            bank[msg.channel] = msg.value
        elif kind in ("control_change", "pitchwheel"):
            controls.setdefault(msg.channel, []).append((tick, order, msg))
        elif kind == "note_on" and msg.velocity > 0:
            ch = msg.channel
            key = (ti, ch, program[ch], 0 if ch == DRUM_CHANNEL else bank[ch])
            part = parts.get(key)
            if part is None:
                part = parts[key] = Instrument(ti, ch, key[2], key[3], names.get(ti, ""))
                if len(parts) > limits.max_instruments:
                    raise MidiError(f"too many instruments: more than {limits.max_instruments} "
                                    "(--max-instruments)")
            part.events.append((tick, order, msg))
            part.notes += 1
            open_notes.setdefault((ch, msg.note), []).append(part)
        elif kind in ("note_off", "note_on"):  # note_on with velocity 0 is a note-off
            stack = open_notes.get((msg.channel, msg.note))
            if stack:
                stack.pop(0).events.append(
                    (tick, order, mido.Message("note_off", channel=msg.channel, note=msg.note)))
    if not parts:
        raise MidiError("no notes")
    last = max(e[0] for e in events)
    for (ch, note), stack in open_notes.items():  # never released: end at the last event
        for part in stack:
            part.events.append((last, (1 << 30, 0), mido.Message("note_off", channel=ch,
                                                                 note=note)))
    order = sorted(parts.values(), key=lambda p: (p.track, p.events[0][0], p.channel, p.program))
    end = max(p.events[-1][0] for p in order)
    score = Score(midi.ticks_per_beat, tempos, meta, controls, order, end)
    seconds = score.seconds
    if seconds <= 0:
        raise MidiError("zero length (every note ends at 0 s)")
    if seconds > limits.max_seconds:
        raise MidiError(f"too long: {seconds:.0f} s (limit {limits.max_seconds:g} s, "
                        "--max-seconds)")
    return score


def instrument_midi(score: Score, part: Instrument) -> bytes:
    """One instrument alone as a type-1 MIDI file: the tempo track, then its channel's bank,
    program, controllers and bends and its own notes, at the source's ticks."""
    out = mido.MidiFile(type=1, ticks_per_beat=score.ticks_per_beat)
    head = [(0, (-1, 0), mido.Message("control_change", channel=part.channel, control=BANK_MSB,
                                       value=part.bank)),
            (0, (-1, 1), mido.Message("program_change", channel=part.channel,
                                      program=part.program))]
    body = sorted(head + score.controls.get(part.channel, []) + part.events,
                  key=lambda e: (e[0], e[1]))
    for rows, name in ((score.meta, None), (body, part.name)):
        track, prev = mido.MidiTrack(), 0
        if name:
            track.append(mido.MetaMessage("track_name", name=name, time=0))
        for tick, _, msg in rows:
            track.append(msg.copy(time=tick - prev))
            prev = tick
        track.append(mido.MetaMessage("end_of_track", time=0))
        out.tracks.append(track)
    buf = io.BytesIO()
    out.save(file=buf)
    return buf.getvalue()
