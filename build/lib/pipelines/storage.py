"""Storage URIs for the pipelines: local paths or s3://bucket/prefix through fsspec/s3fs.

The S3 endpoint and credentials come from the standard AWS environment variables
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...) or an instance profile. Every S3 call has connect and
read timeouts and a retry cap, so an endpoint that never answers fails in seconds; change them
with MSDM_S3_CONNECT_TIMEOUT, MSDM_S3_READ_TIMEOUT (seconds) and MSDM_S3_MAX_ATTEMPTS (jobs
forward MSDM_* and AWS_* variables to their Ray workers). No Ray import here.
"""

from __future__ import annotations

import io
import os
import posixpath
import uuid
from contextlib import contextmanager

import fsspec


class StorageError(RuntimeError):
    """Storage that cannot be read or written."""


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def absolute(uri: str) -> str:
    """A local path made absolute (remote URIs unchanged): Ray Tune runs each trial in its own
    working directory, so a relative path the driver resolved would name nothing there."""
    uri = str(uri)
    if is_remote(uri):
        return uri
    return os.path.abspath(uri.removeprefix("file://"))


def get_fs(uri: str):
    """(filesystem, path) for a URI; local paths are made absolute."""
    uri = str(uri)
    if uri.startswith("s3://"):
        kwargs: dict = {"config_kwargs": s3_timeouts()}
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
        if endpoint:
            kwargs["client_kwargs"] = {"endpoint_url": endpoint}
        fs = fsspec.filesystem("s3", **kwargs)
        fs.retries = 1  # botocore retries (MSDM_S3_MAX_ATTEMPTS); s3fs's own 5 would multiply them
        fs.invalidate_cache()  # other processes write here: never trust a cached listing
        return fs, uri[len("s3://") :].rstrip("/")
    return fsspec.filesystem("file"), absolute(uri)


def s3_timeouts() -> dict:
    """botocore settings: connect/read timeouts and a retry cap (defaults 5 s, 15 s, 2 attempts:
    an endpoint that never answers fails within about 30 s)."""
    def number(name, default, kind=float):
        raw = os.environ.get(name, "")
        try:
            return kind(raw) if raw else default
        except ValueError:
            raise StorageError(f"{name}={raw!r} is not a number") from None

    return {"connect_timeout": number("MSDM_S3_CONNECT_TIMEOUT", 5.0),
            "read_timeout": number("MSDM_S3_READ_TIMEOUT", 15.0),
            "retries": {"max_attempts": number("MSDM_S3_MAX_ATTEMPTS", 2, int),
                        "mode": "standard"}}


def join(uri: str, *parts: str) -> str:
    uri = str(uri)
    if is_remote(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def full_uri(fs, path: str) -> str:
    """Inverse of get_fs: a path from `fs` back to a URI."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return f"s3://{path}" if protocol in ("s3", "s3a") else path


def exists(uri: str) -> bool:
    fs, path = get_fs(uri)
    return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    fs, path = get_fs(uri)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as e:
        raise StorageError(f"{uri}: not found") from e


def write_bytes(uri: str, data: bytes) -> None:
    """Write atomically: local files via a temp name + rename; S3 objects appear only complete."""
    fs, path = get_fs(uri)
    if is_remote(uri):
        with fs.open(path, "wb") as f:
            f.write(data)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


@contextmanager
def open_write(uri: str):
    """A binary file that appears at `uri` only complete: local files are written under a temp
    name and renamed when the block exits without error; S3 objects appear on close."""
    if is_remote(uri):
        buf = io.BytesIO()
        yield buf
        write_bytes(uri, buf.getvalue())
        return
    _, path = get_fs(uri)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "wb") as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove(uri: str) -> None:
    fs, path = get_fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def move(src: str, dst: str) -> None:
    """Move a folder or file (S3: copy then delete)."""
    fs, a = get_fs(src)
    _, b = get_fs(dst)
    if is_remote(src):
        files = fs.find(a) or [a]  # S3 has no folders: copy every key under the prefix
        for f in files:
            rel = posixpath.relpath(f, a)
            fs.copy(f, b if rel == "." else posixpath.join(b, rel))
        fs.rm(a, recursive=True)
    else:
        os.makedirs(os.path.dirname(b), exist_ok=True)
        os.replace(a, b)


def listdir(uri: str) -> list[str]:
    """Names (not paths) of the entries directly under `uri`, sorted; [] if it does not exist."""
    fs, path = get_fs(uri)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(e.rstrip("/")) for e in entries
                  if e.rstrip("/") != path.rstrip("/"))


def check_readable(uri: str) -> None:
    """Fail early, with the URI in the message, if `uri` cannot be listed."""
    fs, path = get_fs(uri)
    try:
        if not fs.exists(path):
            raise StorageError(f"input {uri} does not exist")
        fs.ls(path)
    except StorageError:
        raise
    except Exception as e:
        raise StorageError(f"cannot read {uri}: {type(e).__name__}: {e}") from e


def check_writable(uri: str) -> None:
    """Fail early if a small probe object cannot be written under `uri` (then delete it)."""
    probe = join(uri, f"._write_probe_{uuid.uuid4().hex[:8]}")
    try:
        write_bytes(probe, b"ok")
        remove(probe)
    except Exception as e:
        raise StorageError(f"cannot write to {uri}: {type(e).__name__}: {e}") from e


def pyarrow_fs(uri: str):
    """(pyarrow filesystem or None, path) for Ray Train/Tune storage: S3 goes through the same
    s3fs settings as the rest of our I/O; local paths need no filesystem object."""
    fs, path = get_fs(uri)
    if not is_remote(uri):
        return None, path
    import pyarrow.fs

    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path
