"""One MIDI file -> one Slakh2100 track: every instrument rendered alone, Slakh's levels and
metadata, written so that a track exists only complete (no Ray import).

Levels as Slakh's: each stem is brought to the same integrated loudness (ITU-R BS.1770-4,
`normalization_factor` LUFS), then one `overall_gain` puts the mix peak at `target_peak` dBFS.
Stems are quantized to 16 bits first and the mix is their integer sum, so the stems in stems/
sum exactly to mix.flac.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import posixpath
import shutil
import uuid
from dataclasses import dataclass, field

import numpy as np
import soundfile as sf
import yaml
from scipy.signal import sosfilt

from . import storage
from .midi import Limits, MidiError, instrument_midi, parse
from .soundfont import SoundFont

NORMALIZATION_LUFS = -13.0  # Slakh's normalization_factor
TARGET_PEAK_DB = -1.0
TAIL_SECONDS = 2.0  # release tails after the last note-off
SPLITS = (("train", 0.70), ("validation", 0.15), ("test", 0.15))


def k_weighting(sample_rate: int):
    """BS.1770-4 pre-filter as two biquads (b, a) at any rate: the high shelf and the RLB
    high-pass, from the analogue prototypes of the 48 kHz coefficients in the standard."""
    k = math.tan(math.pi * 1681.974450955533 / sample_rate)
    q, vh = 0.7071752369554196, 10 ** (3.999843853973347 / 20)
    vb = vh ** 0.4996667741545416
    a0 = 1 + k / q + k * k
    shelf = ([(vh + vb * k / q + k * k) / a0, 2 * (k * k - vh) / a0,
              (vh - vb * k / q + k * k) / a0],
             [1.0, 2 * (k * k - 1) / a0, (1 - k / q + k * k) / a0])
    k = math.tan(math.pi * 38.13547087602444 / sample_rate)
    q = 0.5003270373238773
    a0 = 1 + k / q + k * k
    highpass = ([1.0, -2.0, 1.0], [1.0, 2 * (k * k - 1) / a0, (1 - k / q + k * k) / a0])
    return shelf, highpass


def integrated_loudness(x: np.ndarray, sample_rate: int) -> float:
    """Integrated loudness of a mono signal in LUFS (BS.1770-4: K-weighting, 400 ms blocks with
    75 % overlap, absolute gate -70 LUFS, relative gate -10 LU); -inf when nothing passes."""
    sos = np.array([[*b, *a] for b, a in k_weighting(sample_rate)])
    y = sosfilt(sos, np.asarray(x, np.float64))
    hop = round(0.1 * sample_rate)  # a 400 ms block is 4 hops of 100 ms
    hops = len(y) // hop
    if hops < 4:
        return float("-inf")
    e = np.square(y[: hops * hop]).reshape(hops, hop).sum(1)
    z = (e[:-3] + e[1:-2] + e[2:-1] + e[3:]) / (4 * hop)
    with np.errstate(divide="ignore"):
        z = z[-0.691 + 10 * np.log10(z) > -70.0]
        if len(z) == 0:
            return float("-inf")
        gate = -0.691 + 10 * np.log10(z.mean()) - 10.0
        z = z[-0.691 + 10 * np.log10(z) > gate]
    return float(-0.691 + 10 * np.log10(z.mean()))


def content_hash(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def split_of(md5: str) -> str:
    """The split is a function of the MIDI content: identical files can never land in two."""
    u = int(md5[:8], 16) / 2**32
    edge = 0.0
    for name, share in SPLITS:
        edge += share
        if u < edge:
            return name
    return SPLITS[-1][0]


@dataclass
class Rendered:
    meta: dict
    stems: dict[str, np.ndarray]  # SNN -> int16 [T], rendered stems only
    mix: np.ndarray  # int16 [T], the integer sum of the stems
    midi: dict[str, bytes]  # SNN -> that instrument alone
    source: bytes  # all_src.mid
    sample_rate: int
    notes: list[str] = field(default_factory=list)  # fallbacks and silent stems, for the report

    @property
    def seconds(self) -> float:
        return len(self.mix) / self.sample_rate


def pick_soundfont(soundfonts: list[SoundFont], seed: int, md5: str, index: int) -> int:
    """Which SoundFont plays stem `index`: drawn from (seed, content, stem), so reproducible."""
    rng = np.random.default_rng([seed, int(md5[:15], 16), index])
    return int(rng.integers(len(soundfonts)))


def render_track(data: bytes, source: str, soundfonts: list[SoundFont], *, seed: int = 0,
                 sample_rate: int = 44100, limits: Limits | None = None,
                 md5: str | None = None, seconds: float | None = None) -> Rendered:
    """Render every instrument of a MIDI file alone and mix them with Slakh's levels (the track
    lasts until the last note-off plus a release tail, or `seconds`). Raises MidiError (the
    report's reason) when nothing can be rendered."""
    md5 = md5 or content_hash(data)
    score = parse(data, limits or Limits())
    length = round((seconds or score.seconds + TAIL_SECONDS) * sample_rate)
    audio, entries, notes, midi = {}, {}, [], {}
    for i, part in enumerate(score.instruments):
        sid = f"S{i:02d}"
        first = pick_soundfont(soundfonts, seed, md5, i)
        # the drawn SoundFont plays it if it has the preset; else the next one that has it
        order = [soundfonts[(first + j) % len(soundfonts)] for j in range(len(soundfonts))]
        found = [(font, font.preset(part)) for font in order]
        found = [(font, preset) for font, preset in found if preset is not None]
        chosen = next(((f, p) for f, p in found if not p.fallback), found[0] if found else None)
        entry = {"audio_rendered": False, "inst_class": part.inst_class,
                 "integrated_loudness": None, "is_drum": part.is_drum,
                 "midi_program_name": part.program_name, "midi_saved": True,
                 "name": part.name, "plugin_name": None,
                 "program_num": 128 if part.is_drum else part.program}
        midi[sid] = instrument_midi(score, part)
        entries[sid] = entry
        if chosen is None:
            notes.append(f"{sid}: program {part.program} (bank {part.bank}) is in none of the "
                         "SoundFonts: not rendered")
            continue
        font, preset = chosen
        entry["plugin_name"] = f"{font.name}: {preset.name}"
        if preset.fallback:
            notes.append(f"{sid}: {preset.fallback}")
        x = font.render(score, part, preset, sample_rate, length)
        loud = integrated_loudness(x, sample_rate)
        if not math.isfinite(loud) or not np.isfinite(x).all():
            notes.append(f"{sid}: {part.program_name} renders silent: not rendered")
            continue
        audio[sid] = x * np.float32(10 ** ((NORMALIZATION_LUFS - loud) / 20))
    if not audio:
        raise MidiError("silent: no instrument produced audio")
    mix = np.sum(list(audio.values()), axis=0, dtype=np.float64)
    peak = max([np.abs(mix).max()] + [np.abs(x).max() for x in audio.values()])
    gain = 10 ** (TARGET_PEAK_DB / 20) / peak  # a stem louder than the mix sets it (rare)
    stems, total = {}, np.zeros(length, np.int32)
    for sid, x in audio.items():
        stems[sid] = np.round(np.clip(x * np.float32(gain), -1, 1) * 32767).astype(np.int16)
        total += stems[sid]
        entries[sid]["audio_rendered"] = True  # its loudness as written (no second measurement)
        entries[sid]["integrated_loudness"] = round(NORMALIZATION_LUFS + 20 * math.log10(gain), 3)
    meta = {"UUID": md5, "audio_dir": "stems", "midi_dir": "MIDI", "lmd_midi_dir": source,
            "normalized": True, "normalization_factor": NORMALIZATION_LUFS,
            "overall_gain": float(gain), "target_peak": TARGET_PEAK_DB,
            "sample_rate": sample_rate, "seed": seed, "stems": entries}
    return Rendered(meta, stems, np.clip(total, -32768, 32767).astype(np.int16), midi, data,
                    sample_rate, notes)


def _flac(x: np.ndarray, sample_rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sample_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def track_files(r: Rendered) -> dict[str, bytes]:
    """Relative path -> bytes of a Slakh track folder; metadata.yaml comes last."""
    files = {f"stems/{sid}.flac": _flac(x, r.sample_rate) for sid, x in r.stems.items()}
    files["mix.flac"] = _flac(r.mix, r.sample_rate)
    files.update({f"MIDI/{sid}.mid": m for sid, m in r.midi.items()})
    files["all_src.mid"] = r.source
    files["metadata.yaml"] = yaml.safe_dump(r.meta, sort_keys=True).encode()
    return files


def write_track(r: Rendered, folder: str) -> None:
    """Write a track folder so that it exists only complete: locally under a temporary name,
    then one rename; on S3 every object is put before metadata.yaml, the track's last file
    (a folder without it counts as unfinished and is rendered again)."""
    files = track_files(r)
    if storage.is_remote(folder):
        for rel, data in files.items():
            storage.write_bytes(storage.join(folder, *rel.split("/")), data)
        return
    final = storage.absolute(folder)
    tmp = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}."
                       f"{uuid.uuid4().hex[:8]}.tmp")
    try:
        for rel, data in files.items():
            path = os.path.join(tmp, *rel.split("/"))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
        if os.path.isdir(final):  # an unfinished folder of an older layout: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def is_finished(folder: str) -> bool:
    return storage.exists(storage.join(folder, "metadata.yaml"))


def relative_source(root: str, uri: str) -> str:
    """The source path as Slakh's lmd_midi_dir: relative to the --midi root."""
    base = root.rstrip("/")
    return posixpath.relpath(uri, base) if uri.startswith(base) else uri
