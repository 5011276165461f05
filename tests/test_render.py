"""pipelines.render and its pieces: MIDI parsing, SoundFont synthesis, BS.1770 loudness, Slakh
levels and layout, bad input as report rows, determinism, resume, S3."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mido
import numpy as np
import pytest
import soundfile as sf
import yaml

from pipelines import prepare, render
from pipelines.compose import midi_bytes
from pipelines.midi import Limits, MidiError, instrument_midi, parse
from pipelines.rendering import (
    content_hash,
    integrated_loudness,
    k_weighting,
    render_track,
    split_of,
)
from pipelines.soundfont import SoundFont, default_soundfont

TPB, SEC = 480, 960  # ticks per beat; ticks per second at 120 BPM
SR = 22050


def midi_file(*tracks, tempo=500_000, tpb=TPB) -> bytes:
    """A type-1 file: a tempo track, then one track per list of (tick, message)."""
    head = [(0, mido.MetaMessage("set_tempo", tempo=tempo))]
    return midi_bytes([head, *(sorted(ev, key=lambda e: e[0]) for ev in tracks)], tpb)


def notes(channel, program, keys, start=0.0, step=0.25, length=0.2, velocity=100):
    ev = [(0, mido.Message("program_change", channel=channel, program=program))]
    for i, key in enumerate(keys):
        on = int((start + i * step) * SEC)
        ev += [(on, mido.Message("note_on", channel=channel, note=key, velocity=velocity)),
               (on + int(length * SEC), mido.Message("note_off", channel=channel, note=key))]
    return ev


def band() -> bytes:
    """Bass, drums, guitar, piano and strings, 2 s."""
    return midi_file(notes(0, 33, [36, 38, 40, 43] * 2), notes(9, 0, [36, 42, 38, 42] * 2),
                     notes(1, 25, [52, 55, 59, 64] * 2), notes(2, 0, [60, 64, 67, 72] * 2),
                     notes(3, 48, [72, 76], step=1.0, length=0.9))


@pytest.fixture(scope="module")
def fonts():
    return [SoundFont(default_soundfont())]


def rms(x, a, b, sr=SR):
    return float(np.sqrt(np.mean(x[int(a * sr) : int(b * sr)] ** 2)))


def f0(x, sr=SR):
    """Fundamental frequency by the autocorrelation peak (60-1000 Hz)."""
    x = x - x.mean()
    ac = np.fft.irfft(np.abs(np.fft.rfft(x, 4 * len(x))) ** 2)[: len(x)]
    lo, hi = sr // 1000, sr // 60
    lag = lo + int(np.argmax(ac[lo:hi]))
    a, b, c = ac[lag - 1 : lag + 2]  # parabolic interpolation of the peak
    return sr / (lag + 0.5 * (a - c) / (a - 2 * b + c))


# --- BS.1770 loudness: closed forms

def test_k_weighting_is_the_standards_filter_at_48k():
    (b1, a1), (b2, a2) = k_weighting(48000)
    np.testing.assert_allclose(b1, [1.53512485958697, -2.69169618940638, 1.19839281085285],
                               atol=1e-10)
    np.testing.assert_allclose(a1, [1.0, -1.69065929318241, 0.73248077421585], atol=1e-10)
    np.testing.assert_allclose(b2, [1.0, -2.0, 1.0])
    np.testing.assert_allclose(a2, [1.0, -1.99004745483398, 0.99007225036621], atol=1e-10)


@pytest.mark.parametrize("sr", [48000, 44100, 22050])
def test_loudness_of_a_full_scale_997_hz_sine_is_minus_3_lufs(sr):
    t = np.arange(5 * sr) / sr
    x = np.sin(2 * np.pi * 997 * t)
    assert integrated_loudness(x, sr) == pytest.approx(-3.01, abs=0.03)
    assert integrated_loudness(0.1 * x, sr) == pytest.approx(-23.01, abs=0.03)


def test_loudness_gates_out_silence_and_quiet_passages():
    sr = 48000
    t = np.arange(4 * sr) / sr
    tone = 0.5 * np.sin(2 * np.pi * 997 * t)
    alone = integrated_loudness(tone, sr)
    # 4 s of silence (absolute gate) and 4 s at -40 dB (relative gate) are left out; of the
    # 40 blocks (400 ms, 100 ms hop) that hold the tone, the last 3 hold 3/4, 1/2, 1/4 of it
    padded = np.concatenate([tone, np.zeros(4 * sr), 0.005 * tone])
    expected = alone + 10 * np.log10((37 + 0.75 + 0.5 + 0.25) / 40)
    assert integrated_loudness(padded, sr) == pytest.approx(expected, abs=0.01)
    assert integrated_loudness(np.zeros(sr), sr) == float("-inf")


# --- what the MIDI says is what you hear

def _pedal_song(pedal: bool) -> bytes:
    ev = notes(0, 0, [60], length=0.2)
    if pedal:
        ev += [(int(0.1 * SEC), mido.Message("control_change", control=64, value=127)),
               (int(1.5 * SEC), mido.Message("control_change", control=64, value=0))]
    return midi_file(ev)


def test_a_sustained_note_rings_until_the_pedal_lifts(fonts):
    dry = render_track(_pedal_song(False), "p", fonts, sample_rate=SR, seconds=3.0)
    wet = render_track(_pedal_song(True), "p", fonts, sample_rate=SR, seconds=3.0)
    x, y = (r.stems["S00"] / 32768.0 for r in (dry, wet))
    # released at 0.2 s without the pedal: silent by 1.2 s; with it: still sounding
    assert rms(x, 1.2, 1.4) < 1e-4 * rms(x, 0.0, 0.2)
    assert rms(y, 1.2, 1.4) > 0.05 * rms(y, 0.0, 0.2)
    # the pedal lifts at 1.5 s: the note dies away
    assert rms(y, 2.2, 2.6) < 0.01 * rms(y, 1.2, 1.4)


@pytest.mark.parametrize("semitones", [2, 12])
def test_a_pitch_bend_moves_the_pitch(fonts, semitones):
    """A flute A3 bent fully up: +2 semitones by default, +12 after the RPN 0 range message."""
    ev = notes(0, 73, [57], length=2.0)
    if semitones != 2:
        ev += [(1, mido.Message("control_change", control=101, value=0)),
               (1, mido.Message("control_change", control=100, value=0)),
               (1, mido.Message("control_change", control=6, value=semitones))]
    ev += [(SEC, mido.Message("pitchwheel", pitch=8191))]
    r = render_track(midi_file(ev), "b", fonts, sample_rate=SR, seconds=2.0)
    x = r.stems["S00"] / 32768.0
    before, after = f0(x[int(0.4 * SR) : int(0.9 * SR)]), f0(x[int(1.3 * SR) : int(1.8 * SR)])
    assert before == pytest.approx(220.0, rel=0.01)
    assert after / before == pytest.approx(2 ** (8191 / 8192 * semitones / 12), rel=0.01)


def test_channel_state_applies_across_tracks_and_silent_stems_are_not_rendered(fonts):
    """Volume 0 sent for channel 1 on another track silences that channel's instrument: it is
    listed with audio_rendered false and no file, the other one plays. A held organ rendered
    just before leaves no tail in it (each stem plays alone)."""
    held = notes(0, 19, [57], length=2.0)
    render_track(midi_file(held), "o", fonts, sample_rate=SR, seconds=1.0)
    mute = [(0, mido.Message("control_change", channel=1, control=7, value=0))]
    r = render_track(midi_file(mute, notes(1, 0, [60, 64]), notes(2, 33, [40, 43])), "v",
                     fonts, sample_rate=SR)
    stems = r.meta["stems"]
    assert [s["audio_rendered"] for s in stems.values()] == [False, True]
    assert list(r.stems) == ["S01"]
    assert any("silent" in n for n in r.notes)


def test_a_program_change_starts_a_new_instrument_and_each_stem_has_its_midi(fonts):
    ev = notes(0, 0, [60, 62]) + [(SEC, mido.Message("program_change", program=30))] + \
        [(SEC + 10, mido.Message("note_on", note=50, velocity=90)),
         (SEC + 400, mido.Message("note_off", note=50))]
    score = parse(midi_file(ev))
    assert [(p.program, p.notes) for p in score.instruments] == [(0, 2), (30, 1)]
    for part in score.instruments:
        again = parse(instrument_midi(score, part)).instruments
        assert [(p.program, p.notes, p.channel) for p in again] == \
            [(part.program, part.notes, part.channel)]
    r = render_track(midi_file(ev), "p", fonts, sample_rate=SR)
    assert [s["inst_class"] for s in r.meta["stems"].values()] == ["Piano", "Guitar"]


def test_unknown_bank_and_kit_fall_back_with_a_reason(fonts):
    bank = [(0, mido.Message("control_change", channel=0, control=0, value=5))]
    kit = [(0, mido.Message("program_change", channel=9, program=99))]
    r = render_track(midi_file(bank + notes(0, 0, [60]), kit + notes(9, 99, [36, 38])[1:]),
                     "f", fonts, sample_rate=SR)
    assert all(s["audio_rendered"] for s in r.meta["stems"].values())
    assert any("bank 5" in n and "played bank 0" in n for n in r.notes)
    assert any("kit" in n and "99" in n for n in r.notes)


# --- levels, layout, splits

def test_levels_are_slakhs_and_stems_sum_exactly_to_the_mix(fonts):
    r = render_track(band(), "band.mid", fonts, sample_rate=SR)
    total = np.sum([s.astype(np.int64) for s in r.stems.values()], axis=0)
    np.testing.assert_array_equal(total, r.mix)
    assert 20 * np.log10(np.abs(r.mix).max() / 32767) == pytest.approx(-1.0, abs=0.01)
    louds = [integrated_loudness(s / 32768.0, SR) for s in r.stems.values()]
    assert max(louds) - min(louds) < 0.2  # every stem at the same loudness
    meta = r.meta
    assert meta["normalized"] is True and meta["target_peak"] == -1.0
    assert meta["normalization_factor"] == -13.0 and meta["lmd_midi_dir"] == "band.mid"
    classes = [(s["inst_class"], s["is_drum"], s["program_num"]) for s in meta["stems"].values()]
    assert classes == [("Bass", False, 33), ("Drums", True, 128), ("Guitar", False, 25),
                       ("Piano", False, 0), ("Strings (continued)", False, 48)]


def test_the_split_is_a_function_of_the_content():
    rng = np.random.default_rng(0)
    hashes = [content_hash(rng.bytes(16)) for _ in range(4000)]
    share = {s: sum(split_of(h) == s for h in hashes) / len(hashes)
             for s in ("train", "validation", "test")}
    assert share["train"] == pytest.approx(0.70, abs=0.03)
    assert share["validation"] == pytest.approx(0.15, abs=0.03)
    assert [split_of(h) for h in hashes[:50]] == [split_of(h) for h in hashes[:50]]


@pytest.mark.parametrize("data, reason", [
    (b"", "empty file"),
    (b"hello, not a midi file", "not a MIDI file"),
    (band()[:60], "corrupt MIDI file"),
    (midi_file([(0, mido.Message("program_change", program=3))]), "no notes"),
    (midi_file([(0, mido.Message("note_on", note=60, velocity=90)),
                (0, mido.Message("note_off", note=60))]), "zero length"),
    (midi_file(notes(0, 0, [60], start=36000.0)), "too long"),
    (midi_file(*[notes(i % 16, 0, [60]) for i in range(1000)]), "too many instruments"),
    (midi_file(notes(0, 0, [60]), tempo=50), "absurd tempo"),
])
def test_bad_midi_raises_a_reason(data, reason):
    with pytest.raises(MidiError, match=reason):
        parse(data, Limits())


# --- the Ray job

def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _tracks(out: Path) -> dict[str, Path]:
    return {f"{d.parent.name}/{d.name}": d for d in sorted(out.glob("*/Track*"))}


def _run(midi, out, *extra) -> dict:
    return render.main(["--midi", str(midi), "--output", str(out), "--sample-rate", str(SR),
                        *extra])


@pytest.mark.slow(seconds=40)
def test_render_job_writes_slakhs_layout_that_prepare_reads(ray_local, tmp_path):
    """One track per distinct MIDI content, in the Slakh2100 layout with its fields; identical
    contents are rendered once; prepare reads the tree (drums land in drums, strings nowhere)."""
    midi = _tree(tmp_path / "midi", {"a/band.mid": band(), "b/c/copy.MID": band(),
                                     "solo.midi": midi_file(notes(2, 4, [60, 64, 67]))})
    out = tmp_path / "out"
    report = _run(midi, out)
    tracks = _tracks(out)
    assert len(tracks) == 2 and report["tracks"] == 2 and report["files"] == 3
    assert report["counts"] == {"rendered": 2}
    dup = [r for r in report["rows"] if r["status"] == "duplicate"]
    assert len(dup) == 1 and "same MIDI content" in dup[0]["reason"]
    band_track = next(d for d in tracks.values()
                      if yaml.safe_load((d / "metadata.yaml").read_text())["UUID"] ==
                      content_hash(band()))
    assert band_track.parent.name == split_of(content_hash(band()))
    meta = yaml.safe_load((band_track / "metadata.yaml").read_text())
    for key in ("UUID", "audio_dir", "midi_dir", "lmd_midi_dir", "normalized",
                "normalization_factor", "overall_gain", "target_peak"):
        assert key in meta, key
    assert meta["lmd_midi_dir"] in ("a/band.mid", "b/c/copy.MID")
    for sid, stem in meta["stems"].items():
        assert set(stem) >= {"audio_rendered", "inst_class", "integrated_loudness", "is_drum",
                             "midi_program_name", "midi_saved", "plugin_name", "program_num"}
        assert (band_track / "stems" / f"{sid}.flac").exists()
        assert (band_track / "MIDI" / f"{sid}.mid").exists()
        assert stem["plugin_name"].startswith("TimGM6mb.sf2: ")
    assert (band_track / "all_src.mid").read_bytes() == band()
    mix, rate = sf.read(band_track / "mix.flac", dtype="int16")
    assert rate == SR and mix.ndim == 1 and sf.info(band_track / "mix.flac").subtype == "PCM_16"
    stems = [sf.read(f, dtype="int16")[0].astype(np.int64)
             for f in sorted((band_track / "stems").glob("*.flac"))]
    np.testing.assert_array_equal(np.sum(stems, axis=0), mix)
    # prepare reads it: the band's classes are found, the strings are left out of the mix
    prep = prepare.main(["--input", str(out), "--output", str(tmp_path / "prep"), "--config",
                         "tiny"])
    assert prep["failed"] == [] and sum(s["tracks"] for s in prep["splits"].values()) == 2
    index = json.loads((out / "_render.json").read_text())
    assert index["tracks"] == 2 and (out / "_index").is_dir()


@pytest.mark.slow(seconds=40)
def test_bad_inputs_become_report_rows_and_the_job_goes_on(ray_local, tmp_path):
    good = midi_file(notes(0, 33, [40, 43]), notes(9, 0, [36, 38]))
    bank = [(0, mido.Message("control_change", channel=0, control=0, value=7))]
    bad = {
        "good.mid": good,
        "corrupt.mid": band()[:80],
        "text.mid": b"this is not MIDI",
        "empty.mid": midi_file([(0, mido.Message("program_change", program=1))]),
        "zero.mid": midi_file([(0, mido.Message("note_on", note=60, velocity=80)),
                               (0, mido.Message("note_off", note=60))]),
        "ten_hours.mid": midi_file(notes(0, 0, [60], start=36000.0)),
        "thousand_tracks.mid": midi_file(*[notes(i % 16, 0, [60]) for i in range(1000)]),
        "tempo.mid": midi_file(notes(0, 0, [60]), tempo=40),
        "bank.mid": midi_file(bank + notes(0, 0, [60, 62])),
    }
    midi = _tree(tmp_path / "midi", bad)
    report = _run(midi, tmp_path / "out")
    rows = {Path(r["source"]).name: r for r in report["rows"]}
    expect = {"corrupt.mid": "corrupt MIDI file", "text.mid": "not a MIDI file",
              "empty.mid": "no notes", "zero.mid": "zero length", "ten_hours.mid": "too long",
              "thousand_tracks.mid": "too many instruments", "tempo.mid": "absurd tempo",
              "bank.mid": "bank 7"}
    for name, reason in expect.items():
        assert reason in rows[name]["reason"], (name, rows[name])
    assert rows["bank.mid"]["status"] == "fallback"
    assert "good.mid" not in rows
    assert report["counts"]["rendered"] == 2  # good.mid and bank.mid (played by bank 0)
    saved = json.loads((tmp_path / "out" / "_report.json").read_text())
    assert len(saved["rows"]) == len(report["rows"])


def test_a_missing_or_corrupt_soundfont_is_a_clear_error_before_ray(tmp_path):
    midi = _tree(tmp_path / "midi", {"a.mid": band()})
    bad = tmp_path / "bad.sf2"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00sfbk junk")
    for font, message in ((tmp_path / "missing.sf2", "no such file"), (bad, "cannot be loaded")):
        with pytest.raises(SystemExit, match=message):
            _run(midi, tmp_path / "out", "--soundfont", str(font))
    assert not (tmp_path / "out").exists()  # nothing written, no cluster needed


@pytest.mark.slow(seconds=60)
def test_render_is_deterministic_and_the_seed_draws_each_stems_soundfont(ray_local, tmp_path):
    second = tmp_path / "fonts" / "second.sf2"
    second.parent.mkdir()
    shutil.copy(default_soundfont(), second)
    midi = _tree(tmp_path / "midi", {"band.mid": band()})
    args = ["--soundfont", "default", "--soundfont", str(second)]
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        _run(midi, tmp_path / name, *args, "--seed", seed)
    files = {name: {f.relative_to(tmp_path / name): f.read_bytes()
                    for f in (tmp_path / name).rglob("*") if f.is_file() and "Track" in str(f)}
             for name in "abc"}
    assert files["a"] == files["b"]  # bit-identical
    fonts_of = {name: [s["plugin_name"].split(":")[0] for s in yaml.safe_load(next(
        v for k, v in files[name].items() if k.name == "metadata.yaml"))["stems"].values()]
        for name in "ac"}
    assert set(fonts_of["a"]) == {"TimGM6mb.sf2", "second.sf2"}
    assert fonts_of["a"] != fonts_of["c"]
    with pytest.raises(SystemExit, match="seed"):  # another seed into the same output: refused
        _run(midi, tmp_path / "a", *args, "--seed", "3")


def test_a_slice_of_the_index_reads_across_its_part_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.render_stages import index_rows

    parts, n = [], 0
    for part, rows in enumerate((3, 2, 4)):  # tracks 0-2, 3-4, 5-8
        ids = [f"t{n + k}" for k in range(rows)]
        pq.write_table(pa.table({"md5": ids, "source": ids, "track": ids, "split": ids}),
                       tmp_path / f"part-{part:05d}.parquet")
        parts.append((f"part-{part:05d}.parquet", rows))
        n += rows
    assert list(index_rows(str(tmp_path), parts, 2, 7)["track"]) == ["t2", "t3", "t4", "t5", "t6"]
    assert list(index_rows(str(tmp_path), parts, 8, 9)["source"]) == ["t8"]
    (tmp_path / "part-00000.parquet").unlink()  # a slice reads only the parts it overlaps
    assert list(index_rows(str(tmp_path), parts, 3, 5)["md5"]) == ["t3", "t4"]


def test_tracks_per_task_keeps_every_cpu_busy_then_grows_to_its_cap(ray_local):
    cpus = int(ray_local.cluster_resources()["CPU"])
    assert render.tracks_per_task(ray_local, 3, 10_000) == 3  # asked for: as asked
    assert render.tracks_per_task(ray_local, 0, 6) == 1  # fewer tracks than 4 tasks per CPU
    assert render.tracks_per_task(ray_local, 0, 4 * cpus * 5) == 5  # 4 tasks per CPU
    assert render.tracks_per_task(ray_local, 0, 176_581) == render.MAX_TRACKS_PER_TASK


@pytest.mark.slow(seconds=60)
def test_a_killed_render_resumes_and_skips_finished_tracks(ray_local, tmp_path):
    songs = {f"s{i}.mid": midi_file(notes(0, 33 + i, [40 + i, 43, 45], step=0.5),
                                    notes(9, 0, [36, 38] * 3, step=0.5)) for i in range(6)}
    midi, out = _tree(tmp_path / "midi", songs), tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.render", "--midi", str(midi),
                             "--output", str(out), "--sample-rate", str(SR)], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(out.glob("*/Track*/metadata.yaml")) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver dies while its tasks render
    proc.wait()
    done = {p.parent for p in out.glob("*/Track*/metadata.yaml")}
    assert done and not (out / "_report.json").exists()
    stamps = {d: (d / "metadata.yaml").stat().st_mtime_ns for d in done}
    report = _run(midi, out)
    assert report["counts"].get("finished", 0) >= len(done) - 0  # the finished ones skipped
    assert sum(report["counts"].values()) == 6 and "failed" not in report["counts"]
    assert all((d / "metadata.yaml").stat().st_mtime_ns == stamps[d] for d in done)
    assert len(_tracks(out)) == 6
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # no half-written folder


@pytest.mark.slow(seconds=40)
def test_render_round_trip_on_s3(ray_local, s3_bucket, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    fs.pipe(f"{s3_bucket}/midi/x/band.mid", band())
    fs.pipe(f"{s3_bucket}/midi/bad.mid", b"nope")
    report = render.main(["--midi", f"s3://{s3_bucket}/midi", "--output",
                          f"s3://{s3_bucket}/slakh", "--sample-rate", str(SR)])
    assert report["counts"] == {"rendered": 1}  # bad.mid is no MIDI: a row, not a track
    assert [(r["status"], r["reason"]) for r in report["rows"]] == \
        [("failed", "not a MIDI file (no MThd header)")]
    split = split_of(content_hash(band()))
    base = f"{s3_bucket}/slakh/{split}/Track00001"
    names = {p.split(f"{base}/")[1] for p in fs.find(base)}
    assert {"metadata.yaml", "mix.flac", "all_src.mid", "stems/S00.flac", "MIDI/S00.mid"} <= names
    meta = yaml.safe_load(fs.cat(f"{base}/metadata.yaml"))
    assert meta["lmd_midi_dir"] == "x/band.mid"
    mix = sf.read(io.BytesIO(fs.cat(f"{base}/mix.flac")), dtype="int16")[0]
    stems = [sf.read(io.BytesIO(fs.cat(f"{base}/stems/{s}.flac")), dtype="int16")[0]
             for s, m in meta["stems"].items() if m["audio_rendered"]]
    np.testing.assert_array_equal(np.sum(np.array(stems, dtype=np.int64), axis=0), mix)
    again = render.main(["--midi", f"s3://{s3_bucket}/midi", "--output",
                         f"s3://{s3_bucket}/slakh", "--sample-rate", str(SR)])
    assert again["counts"] == {"finished": 1}
