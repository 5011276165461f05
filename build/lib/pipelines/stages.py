"""Ray Data UDFs and readers for prepared Parquet chunks (train, evaluate, tune): dict-of-numpy
or pyarrow batches in, dicts out, callable without Ray (tests call them directly)."""

from __future__ import annotations

import posixpath

import numpy as np
import pyarrow.parquet as pq
import torch

from msdm.data import COL_CHUNK, COL_TRACK, batch_to_tensor
from msdm.metrics import windowed_si_sdri

from . import storage
from .models import Separator


def decode_batch(table, stems, stem: str = "") -> dict:
    """Ray Data map_batches UDF (pyarrow in): stem columns -> one float32 'x' [B, S, T]."""
    return {"x": batch_to_tensor(table, (stem,) if stem else tuple(stems)).numpy()}


def train_dataset(ray, uri: str, cfg, seed: int, materialize: bool):
    """The training split for Ray Train, decoded to 'x' [B, S, T]: files are read in a seeded
    order that changes at every execution (every epoch), and the block order is reshuffled
    every epoch too (also when a small split is materialised once in the object store). The
    driver passes a seed that includes the resume step, so a resumed run sees a new order."""
    from ray.data import FileShuffleConfig, RandomSeedConfig

    fs, path = storage.pyarrow_fs(uri)
    ds = ray.data.read_parquet(path, filesystem=fs, shuffle=FileShuffleConfig(seed=seed))
    ds = ds.map_batches(decode_batch, batch_format="pyarrow",
                        fn_kwargs={"stems": cfg.data.stems, "stem": cfg.train.stem})
    if materialize:
        ds = ds.materialize()
    return ds.randomize_block_order(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))


def epoch_batches(iterator, batch_size: int, buffer_rows: int, seed: int):
    """One epoch of torch batches from a Ray Data iterator, through a seeded shuffle buffer of
    `buffer_rows` rows (pass a seed that changes with the epoch)."""
    return iterator.iter_torch_batches(batch_size=batch_size, drop_last=True, prefetch_batches=4,
                                       local_shuffle_buffer_size=max(buffer_rows, batch_size),
                                       local_shuffle_seed=seed)


def read_chunks(uri: str, stems, limit: int, stem: str = "") -> dict:
    """The first `limit` chunks (limit <= 0: all of them) of a prepared split in file order, read
    on this process without a global sort (shards hold whole tracks in order), then sorted by
    (track, chunk).
    Returns {"x": [N, S, T] float32, "track_id": [N] object, "chunk_index": [N] int}."""
    fs, root = storage.get_fs(uri)
    files = sorted(f for f in (fs.find(root) if fs.exists(root) else [])
                   if f.endswith(".parquet") and not posixpath.basename(f).startswith((".", "_")))
    if not files:
        raise storage.StorageError(f"{uri}: no Parquet shards")
    parts, rows = [], 0
    for f in files:
        with fs.open(f, "rb") as fh:
            table = pq.ParquetFile(fh).read()
        parts.append(table.slice(0, limit - rows) if limit > 0 else table)
        rows += parts[-1].num_rows
        if 0 < limit <= rows:
            break
    import pyarrow as pa

    table = pa.concat_tables(parts).sort_by([(COL_TRACK, "ascending"), (COL_CHUNK, "ascending")])
    return {**decode_batch(table, stems, stem),
            "track_id": np.array(table.column(COL_TRACK).to_pylist(), dtype=object),
            "chunk_index": table.column(COL_CHUNK).to_numpy()}


class SeparateChunks:
    """Evaluate stage: separate prepared chunks (mixture = sum of the reference stems).

    In: track_id, chunk_index, one column per stem. Out: track_id, chunk_index, est, ref [B,S,T].
    """

    def __init__(self, ckpt, cfg: dict, num_gpus: float = 0, seed: int = 0, threads: int = 0):
        self.separator = Separator(ckpt, cfg, num_gpus, seed, threads)

    def __call__(self, batch) -> dict:
        ref = batch_to_tensor(batch, self.separator.cfg.data.stems).numpy()  # [B, S, T]
        tracks, chunks = _column(batch, COL_TRACK), _column(batch, COL_CHUNK)
        est = self.separator(ref.sum(1), list(zip(tracks, chunks)))
        return {COL_TRACK: np.asarray(tracks, dtype=object), COL_CHUNK: np.asarray(chunks),
                "est": est, "ref": ref}


def _column(batch, name):
    col = batch[name]
    return col.to_pylist() if hasattr(col, "to_pylist") else list(col)


def score_track(group: dict, sample_rate: int) -> dict:
    """Evaluate stage (map_groups): one track's chunks in order -> its windows' SI-SDRi [W, S],
    one row per window with the track's length in seconds; a track without a scored window
    gives one row with window -1 (its length still tells why, see `no_windows`)."""
    order = np.argsort(group[COL_CHUNK])
    est = np.concatenate(list(group["est"][order]), axis=-1)  # [S, T]
    ref = np.concatenate(list(group["ref"][order]), axis=-1)
    w = windowed_si_sdri(torch.from_numpy(est), torch.from_numpy(ref), sample_rate).numpy()
    n, seconds = w.shape[0], ref.shape[-1] / sample_rate
    if n == 0:
        w, index = np.zeros((1, ref.shape[0])), np.array([-1])
    else:
        index = np.arange(n)
    return {COL_TRACK: np.array([group[COL_TRACK][0]] * len(index), dtype=object),
            "window": index, "si_sdri": w, "seconds": np.full(len(index), seconds)}


def no_windows(seconds, chunk_seconds: float) -> str:
    """Why no window was scored, with the fix: the tracks' lengths against the protocol's."""
    seconds = list(seconds)
    span = f"{min(seconds):.1f}-{max(seconds):.1f} s" if seconds else "none"
    return (f"no window was scored: the paper's protocol scores 4 s windows with a 2 s hop, "
            f"each with at least two active stems, so a track must be longer than 2 s; the "
            f"{len(seconds)} track(s) here are {span} long (chunks of {chunk_seconds:.2f} s). "
            "Score whole tracks (--max-chunks 0) or more chunks per track, or longer tracks")
