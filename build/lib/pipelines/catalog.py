"""The catalog of a separation job: input listing, output names (confined to --output) and the
manifest (per-job parts, merged on read, compacted at the end). No Ray import, no audio."""

from __future__ import annotations

import json
import os
import posixpath
import string
import time
import uuid

from msdm.audio import AUDIO_EXTENSIONS

from . import storage

MANIFEST = "_manifest.jsonl"
PARTS = "_manifest.parts"  # one file per job and wave; never rewritten, so concurrent jobs are safe
TEMPLATE_FIELDS = {"track", "key", "parent", "stem", "ext"}


def list_inputs(spec: str) -> list[dict]:
    """Audio inputs from a folder (recursive), a glob, a manifest (.txt / .jsonl) or one file.
    Each item: {input, key (relative path without extension), track, parent}. Entries that are
    not readable files (a folder named x.wav, a symlink loop) are listed too: reading them fails
    and they become failed rows, so one bad entry never stops the listing."""
    fs, path = storage.get_fs(spec)
    if any(c in spec for c in "*?["):
        root = path[: min(path.find(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
        files = [f for f in fs.glob(path) if f.lower().endswith(AUDIO_EXTENSIONS)]
    elif spec.endswith((".txt", ".jsonl")):
        text = storage.read_bytes(spec).decode()
        uris = [json.loads(ln)["input"] if spec.endswith(".jsonl") else ln.strip()
                for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
        return [_item(u, posixpath.dirname(storage.get_fs(u)[1])) for u in uris]
    elif fs.isdir(path):
        root = path
        files = _walk_local(path) if not storage.is_remote(spec) else \
            [f for f in fs.find(path) if f.lower().endswith(AUDIO_EXTENSIONS)]
    elif fs.exists(path) or os.path.islink(path):
        root, files = posixpath.dirname(path), [path]
    else:
        raise storage.StorageError(f"input {spec} does not exist")
    return [_item(storage.full_uri(fs, f), root) for f in sorted(files)]


def _walk_local(root: str) -> list[str]:
    """Audio-named entries under root; symlinked folders are followed once (loops are cut)."""
    out, seen = [], set()
    for folder, dirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        out += [os.path.join(folder, n) for n in names + dirs
                if n.lower().endswith(AUDIO_EXTENSIONS)]
    return out


def _item(uri: str, root: str) -> dict:
    path = storage.get_fs(uri)[1]
    rel = posixpath.relpath(path, root) if root else posixpath.basename(path)
    key = posixpath.splitext(rel)[0]
    return {"input": uri, "key": key, "track": posixpath.basename(key),
            "parent": posixpath.basename(posixpath.dirname(path))}


def check_template(template: str) -> None:
    """Refuse a --filename template that names unknown fields or leaves the output folder."""
    fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    if fields - TEMPLATE_FIELDS or "stem" not in fields:
        raise ValueError(f"--filename {template!r}: fields must be among {sorted(TEMPLATE_FIELDS)} "
                         "and include {stem}")
    probe = {"track": "t", "key": "k", "parent": "p", "stem": "s", "ext": "wav"}
    _confined(template.format(**probe), template)


def _confined(rel: str, what: str) -> str:
    norm = posixpath.normpath(rel.replace("\\", "/"))
    if rel.startswith(("/", "\\")) or norm == ".." or norm.startswith("../"):
        raise ValueError(f"{what}: the output path {rel!r} leaves the output folder")
    return norm


def output_paths(item: dict, stems, output: str, template: str, ext: str) -> dict[str, str]:
    """{stem: URI} from a --filename template with {track}, {key}, {parent}, {stem}, {ext}.
    Every path is normalised and must stay under `output` (ValueError otherwise)."""
    fields = {k: item[k] for k in ("track", "key", "parent")}
    return {s: storage.join(output, _confined(template.format(**fields, stem=s, ext=ext),
                                              item["input"])) for s in stems}


def read_manifest(output: str) -> tuple[dict[str, dict], list[str]]:
    """{input: newest row} from the compacted manifest and every part; unreadable lines (a
    truncated last line after a kill) are skipped and returned as problems."""
    uris = [storage.join(output, MANIFEST)]
    uris += [storage.join(output, PARTS, n) for n in storage.listdir(storage.join(output, PARTS))]
    rows: dict[str, dict] = {}
    problems = []
    for uri in uris:
        if not storage.exists(uri):
            continue
        for i, line in enumerate(storage.read_bytes(uri).decode(errors="replace").splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                key = row["input"]
            except (ValueError, KeyError, TypeError):
                problems.append(f"{uri} line {i + 1}: not a manifest row, skipped")
                continue
            if row.get("time", 0) >= rows.get(key, {}).get("time", 0):
                rows[key] = row
    return rows, problems


class ManifestWriter:
    """This job's manifest rows: one new part file per wave, compacted into _manifest.jsonl."""

    def __init__(self, output: str):
        self.output = output
        self.job = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.parts: list[str] = []

    def append(self, rows: list[dict]) -> None:
        if not rows:
            return
        uri = storage.join(self.output, PARTS, f"{self.job}-{len(self.parts):05d}.jsonl")
        storage.write_bytes(uri, "".join(json.dumps(r, default=float) + "\n"
                                         for r in rows).encode())
        self.parts.append(uri)

    def compact(self) -> dict[str, dict]:
        """Write the merged view of every job's rows to _manifest.jsonl; fold this job's wave
        parts into one part (other jobs' parts are left alone)."""
        rows, _ = read_manifest(self.output)
        text = "".join(json.dumps(r, default=float) + "\n" for r in rows.values()).encode()
        storage.write_bytes(storage.join(self.output, MANIFEST), text)
        if len(self.parts) > 1:
            mine = b"".join(storage.read_bytes(u) for u in self.parts)
            storage.write_bytes(storage.join(self.output, PARTS, f"{self.job}.jsonl"), mine)
            for uri in self.parts:
                storage.remove(uri)
            self.parts = [storage.join(self.output, PARTS, f"{self.job}.jsonl")]
        return rows


def settle(items: list[dict], names, output: str, template: str, ext: str,
           manifest: dict[str, dict]) -> tuple[list[dict], list[dict]]:
    """(items to do, rows of settled items): complete outputs are `skipped` (keeping their old
    row), an output name that leaves the folder is `failed`."""
    have, todo, rows = existing_files(output), [], []
    for it in items:
        try:
            paths = output_paths(it, names, output, template, ext)
        except ValueError as e:
            rows.append({"input": it["input"], "key": it["key"], "status": "failed",
                         "error": str(e), "outputs": {}, "time": time.time()})
            continue
        if all(storage.get_fs(p)[1] in have for p in paths.values()):
            old = manifest.get(it["input"], {})
            rows.append({**old, "input": it["input"], "key": it["key"], "outputs": paths,
                         "status": "skipped", "error": "", "time": time.time()})
        else:
            todo.append(it)
    return todo, rows


def existing_files(output: str) -> set[str]:
    fs, path = storage.get_fs(output)
    return set(fs.find(path)) if fs.exists(path) else set()
