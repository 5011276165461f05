"""The stages of `pipelines.render` as plain functions on dict-of-numpy batches (no Ray import).

listing units (top-level folders) -> walk (paths, streamed in batches) -> hash (content md5) ->
sort by md5 on the cluster -> `Numbering` on the driver (track numbers, duplicates, the index,
one batch at a time) -> render (slices of the index, one track per row, each written complete or
not at all).
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import tempfile
import time
import traceback

import numpy as np

from . import storage
from .midi import Limits, MidiError, unwrap
from .rendering import is_finished, relative_source, render_track, split_of, write_track
from .soundfont import SoundFont, SoundFontError, default_soundfont

MIDI_EXTENSIONS = (".mid", ".midi")
WALK_BATCH = 512
DEFAULT_FONT = "default"


def listing_units(root: str) -> list[dict]:
    """What the driver lists: the root's subfolders only (a few, e.g. Lakh's 16), each walked on
    a worker, plus one unit for the files directly under the root."""
    fs, base = storage.get_fs(root)
    units = [{"uri": root, "recursive": False}]
    if storage.is_remote(root):
        dirs = [e["name"] for e in fs.ls(base, detail=True) if e["type"] == "directory"]
    else:
        with os.scandir(base) as it:  # an iterator: a flat folder of files costs nothing here
            dirs = [e.path for e in it if e.is_dir()]
    units += [{"uri": storage.full_uri(fs, d), "recursive": True} for d in sorted(dirs)]
    return units


def walk_units(batch: dict):
    """Generator UDF: every .mid/.midi under each unit, yielded WALK_BATCH paths at a time."""
    out = []
    for uri, recursive in zip(batch["uri"], batch["recursive"]):
        fs, base = storage.get_fs(str(uri))
        walker = fs.walk(base, maxdepth=None if recursive else 1)
        for folder, _, names in walker:
            for name in sorted(names):
                if name.lower().endswith(MIDI_EXTENSIONS):
                    out.append(storage.full_uri(fs, posixpath.join(folder, name)))
                    if len(out) >= WALK_BATCH:
                        yield {"uri": np.array(out, dtype=object)}
                        out = []
    if out:
        yield {"uri": np.array(out, dtype=object)}


def hash_batch(batch: dict) -> dict:
    """Content md5 of each file ("" and the reason when it cannot be read or is not MIDI at all:
    such files get no track number)."""
    md5s, errors = [], []
    for uri in batch["uri"]:
        try:
            data = storage.read_bytes(str(uri))
        except Exception as e:  # unreadable: a report row, never a dead job
            md5s.append("")
            errors.append(f"cannot read: {type(e).__name__}: {e}")
            continue
        head = unwrap(data[:64])[:4]
        md5s.append(hashlib.md5(data).hexdigest() if head == b"MThd" else "")
        errors.append("" if head == b"MThd" else "empty file" if not data else
                      "not a MIDI file (no MThd header)")
    return {"uri": batch["uri"], "md5": np.array(md5s, dtype=object),
            "error": np.array(errors, dtype=object)}


class Numbering:
    """Driver side, fed md5-sorted batches: Slakh track numbers in content order (so a re-run of
    the same files numbers them the same), the first path of identical contents is the source,
    the others are duplicate rows. Holds one batch, the fingerprint and the list of index parts
    (one per 1,024 files), never the listing."""

    def __init__(self):
        self.count, self.files, self.previous = 0, 0, None
        self.fingerprint = hashlib.sha256()
        self.rows: list[dict] = []  # report rows: unreadable files and duplicates
        self.parts: list[tuple[str, int]] = []  # the index's part files and their row counts

    def add(self, batch: dict) -> dict:
        """One sorted batch -> the index rows of its new (unique) contents."""
        index = {"md5": [], "source": [], "track": [], "split": []}
        for uri, md5, error in zip(batch["uri"], batch["md5"], batch["error"]):
            self.files += 1
            if error:
                self.rows.append({"source": str(uri), "status": "failed", "reason": error})
                continue
            if self.previous and md5 == self.previous[0]:
                self.rows.append({"source": str(uri), "status": "duplicate", "reason":
                                  f"same MIDI content as {self.previous[1]}: rendered once, as "
                                  f"{self.previous[2]}"})
                continue
            self.count += 1
            split = split_of(md5)
            track = f"{split}/Track{self.count:05d}"
            self.previous = (md5, str(uri), track)
            self.fingerprint.update(md5.encode())
            for key, value in (("md5", md5), ("source", str(uri)), ("track", track),
                               ("split", split)):
                index[key].append(value)
        return index


def clean_leftovers(output: str) -> list[str]:
    """Remove what a killed run left half-written: track folders under a temporary name and
    unpublished index folders. A finished track is never touched."""
    gone = []
    for name in storage.listdir(output):
        if name.startswith("_index.tmp-"):
            gone.append(storage.join(output, name))
        elif name in ("train", "validation", "test") and not storage.is_remote(output):
            gone += [storage.join(output, name, t) for t in storage.listdir(
                storage.join(output, name)) if t.startswith(".") and t.endswith(".tmp")]
    for uri in gone:
        storage.remove(uri)
    return gone


_FONTS: dict[tuple, list[SoundFont]] = {}  # per worker process: each SoundFont loads once


def load_soundfonts(specs) -> list[SoundFont]:
    """SoundFonts from --soundfont values: "default" (pretty-midi's GM font on this node), a
    local path, or an s3:// URI (copied once per process). Raises SoundFontError."""
    key = tuple(specs)
    if key not in _FONTS:
        fonts = []
        for spec in specs:
            if spec == DEFAULT_FONT:
                path = default_soundfont()
            elif storage.is_remote(spec):
                try:
                    data = storage.read_bytes(spec)
                except Exception as e:
                    raise SoundFontError(f"SoundFont {spec}: cannot be read ({e})") from None
                folder = tempfile.mkdtemp(prefix="msdm-sf-")
                path = os.path.join(folder, posixpath.basename(spec))
                with open(path, "wb") as f:
                    f.write(data)
            else:
                path = spec
            fonts.append(SoundFont(path))
        _FONTS[key] = fonts
    return _FONTS[key]


def index_rows(index_uri: str, parts, lo: int, hi: int) -> dict:
    """Rows lo..hi-1 (track order) of the index, whose part files `parts` = [(name, rows)] hold
    it in order: only the parts that overlap the range are read."""
    import pyarrow.parquet as pq

    cols: dict[str, list] = {"md5": [], "source": [], "track": []}
    start = 0
    for name, rows in parts:
        if start >= hi:
            break
        if start + rows > lo:
            table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(index_uri, name))),
                                  columns=list(cols))
            a, b = max(lo - start, 0), min(hi - start, rows)
            for key in cols:
                cols[key] += table.column(key).to_pylist()[a:b]
        start += rows
    return {k: np.array(v, dtype=object) for k, v in cols.items()}


def render_slices(batch: dict, *, index_uri: str, parts, per_task: int, total: int,
                  **render_kwargs) -> dict:
    """Range UDF: slice i is index rows [i * per_task, (i + 1) * per_task), read by the task
    itself (no index rows pass through the driver or between tasks), rendered by
    `render_batch`. Returns their result rows."""
    outs = []
    for i in batch["id"]:
        lo = int(i) * per_task
        outs.append(render_batch(index_rows(index_uri, parts, lo, min(total, lo + per_task)),
                                 **render_kwargs))
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def render_batch(batch: dict, *, output: str, midi_root: str, soundfonts: list[str], seed: int,
                 sample_rate: int, limits: dict) -> dict:
    """Render each index row into OUTPUT/{split}/TrackNNNNN unless it is already finished.
    Returns one result row per track: status rendered / finished / failed, reason, notes."""
    fonts = load_soundfonts(soundfonts)
    lim = Limits(**limits)
    cols = {k: [] for k in ("track", "source", "status", "reason", "notes", "seconds", "cpu",
                            "wall")}
    for md5, uri, track in zip(batch["md5"], batch["source"], batch["track"]):
        folder = storage.join(output, *str(track).split("/"))
        t0, w0 = time.process_time(), time.perf_counter()
        status, reason, notes, seconds = "rendered", "", [], 0.0
        try:
            if is_finished(folder):
                status = "finished"
            else:
                data = storage.read_bytes(str(uri))
                r = render_track(data, relative_source(midi_root, str(uri)), fonts, seed=seed,
                                 sample_rate=sample_rate, limits=lim, md5=str(md5))
                write_track(r, folder)
                notes, seconds = r.notes, r.seconds
        except MidiError as e:
            status, reason = "failed", str(e)
        except Exception as e:  # anything else about this file: its row, with where it broke
            where = traceback.extract_tb(e.__traceback__)[-1]
            status, reason = "failed", (f"{type(e).__name__}: {e} "
                                        f"({posixpath.basename(where.filename)}:{where.lineno})")
        for key, value in (("track", str(track)), ("source", str(uri)), ("status", status),
                           ("reason", reason), ("notes", "\n".join(notes)),
                           ("seconds", seconds), ("cpu", time.process_time() - t0),
                           ("wall", time.perf_counter() - w0)):
            cols[key].append(value)
    return {k: np.array(v, dtype=object if k not in ("seconds", "cpu", "wall") else np.float64)
            for k, v in cols.items()}
