"""Storage failures are fast and clear: an S3 endpoint that accepts connections and never
answers fails in seconds (#19.12), and the timeouts are configurable."""

import socket
import threading
import time

import pytest

from pipelines import storage


@pytest.fixture
def black_hole():
    """A TCP server on loopback that accepts connections and never sends a byte."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    held, stop = [], threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    stop.set()
    t.join()
    for c in held:
        c.close()
    srv.close()


def test_a_silent_s3_endpoint_fails_in_seconds(black_hole, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", black_hole)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("MSDM_S3_READ_TIMEOUT", "1")
    monkeypatch.setenv("MSDM_S3_MAX_ATTEMPTS", "1")
    t0 = time.time()
    with pytest.raises(storage.StorageError, match="s3://bkt/data"):
        storage.check_readable("s3://bkt/data")
    took = time.time() - t0
    print(f"silent endpoint: failed after {took:.1f} s")
    assert took < 10


def test_timeouts_come_from_the_environment(monkeypatch):
    assert storage.s3_timeouts()["connect_timeout"] == 5.0
    monkeypatch.setenv("MSDM_S3_CONNECT_TIMEOUT", "2.5")
    monkeypatch.setenv("MSDM_S3_MAX_ATTEMPTS", "7")
    t = storage.s3_timeouts()
    assert t["connect_timeout"] == 2.5 and t["retries"]["max_attempts"] == 7
    monkeypatch.setenv("MSDM_S3_READ_TIMEOUT", "soon")
    with pytest.raises(storage.StorageError, match="MSDM_S3_READ_TIMEOUT"):
        storage.s3_timeouts()
