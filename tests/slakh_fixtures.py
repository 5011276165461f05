"""Hand-made Slakh-format tracks with known stem contents."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import yaml

SR = 44100


def tone(freq: float, seconds: float, amp: float = 0.1, sr: int = SR) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(seconds * sr)) / sr)).astype(np.float32)


def write_slakh_track(folder: Path, stems: dict[str, tuple[dict, np.ndarray | None]],
                      sr: int = SR) -> Path:
    """stems: SID -> (metadata fields, mono audio or None for no file)."""
    (folder / "stems").mkdir(parents=True, exist_ok=True)
    meta = {"UUID": "x", "audio_dir": "stems", "midi_dir": "MIDI", "normalized": True,
            "overall_gain": 1.0, "target_peak": -1.0, "stems": {}}
    for sid, (fields, audio) in stems.items():
        entry = {"audio_rendered": True, "is_drum": False, "midi_saved": True,
                 "plugin_name": "p.nkm", "program_num": 0, "inst_class": "Piano",
                 "midi_program_name": "x"}
        entry.update(fields)
        meta["stems"][sid] = entry
        if audio is not None:
            sf.write(folder / "stems" / f"{sid}.flac", audio, sr, subtype="PCM_24")
    (folder / "metadata.yaml").write_text(yaml.safe_dump(meta))
    return folder


def standard_track(folder: Path, seconds: float = 1.0) -> dict[str, np.ndarray]:
    """Bass, two guitars, drums, strings (ignored), an unrendered piano; returns the sources."""
    src = {"S00": tone(55, seconds), "S01": tone(220, seconds), "S02": tone(330, seconds),
           "S03": tone(100, seconds, 0.2), "S04": tone(440, seconds)}
    write_slakh_track(folder, {
        "S00": ({"inst_class": "Bass", "program_num": 33}, src["S00"]),
        "S01": ({"inst_class": "Guitar", "program_num": 25}, src["S01"]),
        "S02": ({"inst_class": "Guitar", "program_num": 29}, src["S02"]),
        "S03": ({"inst_class": "Drums", "is_drum": True}, src["S03"]),
        "S04": ({"inst_class": "Strings (continued)", "program_num": 48}, src["S04"]),
        "S05": ({"inst_class": "Piano", "audio_rendered": False}, None),
    })
    return src
