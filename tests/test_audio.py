import io

import numpy as np
import pytest
import soundfile as sf

from msdm.audio import (
    AudioError,
    SegmentPlan,
    extract_segment,
    overlap_add,
    read_audio,
    resample,
    to_mono,
    write_audio,
)


@pytest.mark.parametrize("fmt, subtype, tol", [("wav", "FLOAT", 0), ("wav", "PCM_16", 4e-5),
                                               ("flac", "PCM_24", 1e-6), ("ogg", "VORBIS", 0.05)])
def test_write_read_round_trip(tmp_path, fmt, subtype, tol):
    sr = 16000
    t = np.arange(sr) / sr
    x = np.stack([0.5 * np.sin(2 * np.pi * 440 * t), 0.25 * np.sin(2 * np.pi * 220 * t)])
    path = tmp_path / f"a.{fmt}"
    write_audio(path, x, sr, fmt, subtype)
    y, sr2 = read_audio(path)
    assert sr2 == sr and y.shape == x.shape and y.dtype == np.float32
    if fmt != "ogg":
        assert np.abs(y - x).max() <= tol + 1e-7
    else:
        assert np.corrcoef(y[0], x[0])[0, 1] > 0.99
    assert not list(tmp_path.glob(".*tmp"))  # no temp file left behind


def test_stereo_to_mono_averages():
    x = np.stack([np.ones(10, np.float32), np.zeros(10, np.float32)])
    assert np.allclose(to_mono(x), 0.5)
    assert to_mono(x[:1]).shape == (10,)


def test_bad_audio_is_an_audio_error(tmp_path):
    (tmp_path / "junk.flac").write_bytes(b"fLaC" + b"\x00" * 20)
    with pytest.raises(AudioError, match="cannot decode"):
        read_audio(tmp_path / "junk.flac")
    buf = io.BytesIO()
    sf.write(buf, np.zeros((0, 1), np.float32), 8000, format="WAV")
    with pytest.raises(AudioError, match="zero-length"):
        read_audio(buf.getvalue(), "empty.wav")
    with pytest.raises(AudioError):
        read_audio(tmp_path / "missing.wav")


def test_truncated_flac_is_an_error_or_shorter(tmp_path):
    x = np.random.default_rng(0).standard_normal(44100).astype(np.float32) * 0.1
    p = tmp_path / "a.flac"
    sf.write(p, x, 44100, subtype="PCM_16")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 3])
    try:
        y, _ = read_audio(p)
    except AudioError:
        return
    assert y.shape[-1] < 44100


def test_resampling_matches_analytic_sine():
    sr, new = 44100, 22050
    t = np.arange(2 * sr) / sr
    x = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    y = resample(x, sr, new)
    ref = np.sin(2 * np.pi * 440 * np.arange(2 * new) / new)
    err = np.abs(y - ref)[500:-500].max()
    assert y.shape == (2 * new,) and err < 1e-4
    # a tone above the new Nyquist is removed
    hi = resample(np.sin(2 * np.pi * 15000 * t).astype(np.float32), sr, new)
    assert np.sqrt((hi[500:-500] ** 2).mean()) < 0.01


@pytest.mark.parametrize("n, margin, overlap", [(10000, 100, 300), (1000, 0, 0), (2048, 64, 128),
                                                (37, 10, 20)])
def test_overlap_add_of_identity_model_reconstructs_input(n, margin, overlap):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((3, n)).astype(np.float32)
    plan = SegmentPlan(n, 1024, margin, overlap)
    segs = [extract_segment(x, plan, j) for j in range(plan.num_segments)]
    assert all(s.shape == (3, 1024) for s in segs)
    assert np.allclose(overlap_add(segs, plan), x, atol=1e-6)
    total = np.zeros(n)
    for j in range(plan.num_segments):
        start = plan.start(j)
        w = plan.weights(j)
        lo, hi = max(start, 0), min(start + 1024, n)
        total[lo:hi] += w[lo - start : hi - start]
    assert np.allclose(total, 1.0)


def test_segment_plan_validates():
    with pytest.raises(ValueError, match="too short"):
        SegmentPlan(100, 64, 30, 10)
    with pytest.raises(ValueError, match="empty"):
        SegmentPlan(0, 64, 0, 0)
