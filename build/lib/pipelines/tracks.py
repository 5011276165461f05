"""Track discovery, loading and Parquet shard writing for `pipelines.prepare` (no Ray import).

Layouts: Slakh2100 (ROOT/{split}/TrackNNNNN/{metadata.yaml, stems/SNN.flac}) and the MSDM
pre-rendered one (ROOT/{split}/TrackNNNNN/{bass,drums,guitar,piano}.wav). A track that cannot be
used raises `TrackError` with the reason; the caller records it and moves on.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from msdm.audio import AUDIO_EXTENSIONS, AudioError, read_audio, resample, to_mono
from msdm.config import Data
from msdm.data import (
    COL_CHUNK,
    COL_SPLIT,
    COL_START,
    COL_TRACK,
    SPLITS,
    ClassMap,
    TrackError,
    assign_stems,
    chunk_track,
    parse_metadata,
    stack_stems,
)

from . import storage


def find_tracks(root: str, splits=SPLITS) -> list[dict]:
    """Every track folder under root/{split}/ as {track_id, split, uri, layout}, sorted."""
    fs, base = storage.get_fs(root)
    files = fs.find(base)
    by_track: dict[tuple[str, str], set[str]] = defaultdict(set)
    for f in files:
        rel = posixpath.relpath(f, base).split("/")
        if len(rel) >= 3 and rel[0] in splits:
            by_track[(rel[0], rel[1])].add("/".join(rel[2:]))
    tracks = []
    for (split, track), names in sorted(by_track.items()):
        if "metadata.yaml" in names:
            layout = "slakh"
        elif any(n.lower().endswith(AUDIO_EXTENSIONS) and "/" not in n for n in names):
            layout = "msdm"
        else:  # reported, not skipped silently: stems without their metadata.yaml, ...
            layout = "none"
        uri = storage.full_uri(fs, posixpath.join(base, split, track))
        tracks.append({"track_id": track, "split": split, "uri": uri, "layout": layout})
    return tracks


def _read(uri: str) -> tuple[np.ndarray, int]:
    if storage.is_remote(uri):
        try:
            data = storage.read_bytes(uri)
        except storage.StorageError as e:
            raise TrackError(f"missing file {posixpath.basename(uri)}") from e
    elif not os.path.exists(uri):
        raise TrackError(f"missing file {posixpath.basename(uri)}")
    else:
        data = uri  # soundfile decodes straight from the file
    try:
        x, sr = read_audio(data, posixpath.basename(uri))
    except AudioError as e:
        raise TrackError(str(e)) from e
    return to_mono(x), sr


def _sum_class(files: list[str], name: str) -> tuple[np.ndarray, int]:
    total, rate = None, None
    for uri in files:
        x, sr = _read(uri)
        if rate is not None and sr != rate:
            raise TrackError(f"{name}: stems at different sample rates ({rate} and {sr})")
        if total is not None and len(x) != len(total):
            raise TrackError(f"{name}: stems of different lengths ({len(total)} and {len(x)})")
        total, rate = (x.astype(np.float32) if total is None else total + x), sr
    return total, rate


def load_track(track: dict, data: Data, class_map: ClassMap) -> np.ndarray:
    """Decode, downmix, sum per class and resample one track to [S, T] at data.sample_rate."""
    uri, name = track["uri"], track["track_id"]
    if track["layout"] == "none":
        raise TrackError(f"{name}: no metadata.yaml (Slakh layout) and no stem audio files at "
                         "the top of the folder (MSDM layout)")
    if track["layout"] == "slakh":
        try:
            meta = parse_metadata(storage.read_bytes(storage.join(uri, "metadata.yaml")).decode(),
                                  f"{name}/metadata.yaml")
        except UnicodeDecodeError as e:
            raise TrackError(f"{name}/metadata.yaml is not text") from e
        audio_dir = str(meta.get("audio_dir") or "stems")
        groups = assign_stems(meta, class_map, data.stems)
        files = {stem: [storage.join(uri, audio_dir, f"{sid}.flac") for sid in sids]
                 for stem, sids in groups.items()}
    else:
        present = set(storage.listdir(uri))
        files = {}
        for stem in data.stems:
            match = [f for f in present if posixpath.splitext(f)[0] == stem
                     and f.lower().endswith(AUDIO_EXTENSIONS)]
            files[stem] = [storage.join(uri, sorted(match)[0])] if match else []
    parts, rates = {}, set()
    for stem, uris in files.items():
        parts[stem] = None
        if uris:
            parts[stem], sr = _sum_class(uris, f"{name}/{stem}")
            rates.add(sr)
    if len(rates) > 1:
        raise TrackError(f"{name}: stems at different sample rates {sorted(rates)}")
    stems = stack_stems(parts, data.stems, name)  # validates lengths
    sr = rates.pop()
    if stems.shape[-1] / sr < data.min_seconds:
        raise TrackError(f"{name}: {stems.shape[-1] / sr:.1f} s is shorter than data.min_seconds")
    if sr == data.sample_rate:
        return stems
    out = np.zeros((len(data.stems), round(stems.shape[-1] * data.sample_rate / sr)), np.float32)
    for i, stem in enumerate(data.stems):
        if parts[stem] is not None:  # absent classes stay silent: no need to resample zeros
            out[i] = resample(stems[i], sr, data.sample_rate)[: out.shape[-1]]
    return out


def chunk_schema(data: Data) -> pa.Schema:
    fields = [pa.field(COL_TRACK, pa.string()), pa.field(COL_SPLIT, pa.string()),
              pa.field(COL_CHUNK, pa.int32()), pa.field(COL_START, pa.int64())]
    fields += [pa.field(s, pa.list_(pa.float32(), data.chunk_samples)) for s in data.stems]
    return pa.schema(fields)


class ShardWriter:
    """Buffers chunk rows and writes Parquet files of about `target_bytes` each."""

    def __init__(self, folder_uri: str, prefix: str, data: Data):
        self.folder, self.prefix, self.data = folder_uri, prefix, data
        self.schema = chunk_schema(data)
        row_bytes = 4 * data.chunk_samples * len(data.stems)
        self.rows_per_file = max(1, int(data.shard_mb * 2**20 // row_bytes))
        self.rows: list[tuple] = []
        self.files: list[str] = []

    def add(self, track_id: str, split: str, index: int, start: int, chunk: np.ndarray) -> None:
        self.rows.append((track_id, split, index, start, chunk))
        if len(self.rows) >= self.rows_per_file:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        n, length = len(self.rows), self.data.chunk_samples
        cols = [pa.array([r[0] for r in self.rows], pa.string()),
                pa.array([r[1] for r in self.rows], pa.string()),
                pa.array([r[2] for r in self.rows], pa.int32()),
                pa.array([r[3] for r in self.rows], pa.int64())]
        for i in range(len(self.data.stems)):
            flat = pa.array(np.concatenate([r[4][i] for r in self.rows]))  # [n * T], one copy
            cols.append(pa.FixedSizeListArray.from_arrays(flat, length))
        table = pa.Table.from_arrays(cols, schema=self.schema)
        uri = storage.join(self.folder, f"{self.prefix}-{len(self.files):03d}.parquet")
        # float audio barely compresses (zstd: -7 %) and compression costs more CPU than I/O
        with storage.open_write(uri) as f:
            pq.write_table(table, f, compression="none", use_dictionary=False,
                           row_group_size=max(1, min(n, 64)))
        self.files.append(uri)
        self.rows = []


def prepare_unit(unit: dict, cfg: dict, class_map: str, staging: str) -> dict:
    """Ray Data `map` function: process the tracks of one work unit (all of one split) into
    shards under staging/{split}/ and return a JSON summary row. Bad tracks are reported."""
    from msdm.config import Config

    cfg = Config.from_dict(cfg).data
    cmap = ClassMap.load(class_map or None)
    tracks = json.loads(unit["tracks"])
    split = tracks[0]["split"]
    writer = ShardWriter(storage.join(staging, split), f"part-{unit['unit']:05d}", cfg)
    results, t0 = [], time.time()
    for tr in tracks:
        try:
            stems = load_track(tr, cfg, cmap)
        except (TrackError, AudioError, ValueError) as e:
            results.append({"track_id": tr["track_id"], "split": split, "error": str(e)})
            continue
        count = 0
        for idx, start, chunk in chunk_track(stems, cfg.chunk_samples, cfg.hop_samples,
                                             cfg.pad_tail, cfg.drop_silent, cfg.silence_rms):
            writer.add(tr["track_id"], split, idx, start, chunk)
            count += 1
        results.append({"track_id": tr["track_id"], "split": split, "chunks": count,
                        "seconds": stems.shape[-1] / cfg.sample_rate})
    writer.flush()
    summary = {"tracks": results, "files": len(writer.files), "wall_s": time.time() - t0}
    return {"summary": json.dumps(summary)}


def make_units(tracks: list[dict], per_unit: int) -> list[dict]:
    """Group tracks of the same split into work units of at most `per_unit` tracks."""
    units, by_split = [], defaultdict(list)
    for t in tracks:
        by_split[t["split"]].append(t)
    for split in sorted(by_split):
        items = by_split[split]
        for i in range(0, len(items), per_unit):
            units.append({"unit": len(units), "tracks": json.dumps(items[i : i + per_unit])})
    return units


def build_report(summaries: list[dict], input_uri: str, output_uri: str, data: Data) -> dict:
    splits: dict[str, dict] = {}
    failed, files = [], 0
    for s in summaries:
        files += s["files"]
        for r in s["tracks"]:
            if "error" in r:
                failed.append(r)
                continue
            agg = splits.setdefault(r["split"], {"tracks": 0, "chunks": 0, "seconds": 0.0})
            agg["tracks"] += 1
            agg["chunks"] += r["chunks"]
            agg["seconds"] += r["seconds"]
    return {"input": input_uri, "output": output_uri, "sample_rate": data.sample_rate,
            "chunk_samples": data.chunk_samples, "stems": list(data.stems), "files": files,
            "splits": splits, "failed": sorted(failed, key=lambda r: (r["split"], r["track_id"]))}


def excerpt_tree(src: str, dst: str, seconds: float, max_tracks: int = 0,
                 split: str | None = None, start: float = 0.3) -> int:
    """A local copy of a Slakh tree with every finished track cut to `seconds` from `start` of
    its length (whole real songs take hours to score on a few CPUs); `split` puts every track
    in that one split. Returns the number of tracks written."""
    import shutil

    import soundfile as sf

    shutil.rmtree(dst, ignore_errors=True)
    folders = []
    for name in SPLITS:
        root = os.path.join(src, name)
        if os.path.isdir(root):
            folders += [os.path.join(root, t) for t in os.listdir(root)
                        if os.path.exists(os.path.join(root, t, "metadata.yaml"))]
    folders = sorted(folders, key=os.path.basename)[: max_tracks or None]
    for folder in folders:
        out = os.path.join(dst, split or os.path.basename(os.path.dirname(folder)),
                           os.path.basename(folder))
        os.makedirs(os.path.join(out, "stems"))
        shutil.copy(os.path.join(folder, "metadata.yaml"), out)
        info = sf.info(os.path.join(folder, "mix.flac"))
        n = int(seconds * info.samplerate) if seconds else info.frames
        a = max(0, min(int(start * info.frames), info.frames - n))
        stems = sorted(os.listdir(os.path.join(folder, "stems")))
        for rel in ["mix.flac", *(os.path.join("stems", s) for s in stems)]:
            x, sr = sf.read(os.path.join(folder, rel), start=a, stop=a + n, dtype="int16")
            sf.write(os.path.join(out, rel), x, sr, subtype="PCM_16")
    return len(folders)
