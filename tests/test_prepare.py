"""pipelines.prepare and its track loading: class sums, chunking, resampling, bad input, S3."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from slakh_fixtures import SR, standard_track, tone, write_slakh_track

from msdm.config import Data
from msdm.data import ClassMap, TrackError, batch_to_tensor, chunk_starts
from pipelines import prepare, tracks

DATA = Data(sample_rate=SR, chunk_samples=4096)  # no resampling: exact sums


def _track(folder, layout="slakh"):
    return {"track_id": folder.name, "split": "train", "uri": str(folder), "layout": layout}


def test_class_sums_skip_unrendered_and_ignore_other_classes(tmp_path):
    src = standard_track(tmp_path / "train" / "Track00001")
    stems = tracks.load_track(_track(tmp_path / "train" / "Track00001"), DATA, ClassMap.load())
    assert stems.shape == (4, SR)
    q = 2**-23  # PCM_24 quantisation
    assert np.abs(stems[0] - src["S00"]).max() < 2 * q  # bass
    assert np.abs(stems[1] - src["S03"]).max() < 2 * q  # drums (is_drum)
    assert np.abs(stems[2] - (src["S01"] + src["S02"])).max() < 4 * q  # both guitars summed
    assert np.abs(stems[3]).max() == 0.0  # piano unrendered -> silent; strings ignored


def test_program_ranges_used_without_inst_class(tmp_path):
    folder = write_slakh_track(tmp_path / "T", {
        "S00": ({"inst_class": None, "program_num": 36}, tone(60, 0.5)),
        "S01": ({"inst_class": None, "program_num": 3}, tone(300, 0.5)),
    })
    stems = tracks.load_track(_track(folder), DATA, ClassMap.load())
    assert np.abs(stems[0]).max() > 0.05 and np.abs(stems[3]).max() > 0.05
    assert np.abs(stems[1:3]).max() == 0


def test_msdm_layout_missing_stem_is_silence(tmp_path):
    folder = tmp_path / "train" / "Track00002"
    folder.mkdir(parents=True)
    sf.write(folder / "bass.wav", tone(55, 0.5), SR)
    sf.write(folder / "piano.wav", tone(440, 0.5), SR)
    found = tracks.find_tracks(str(tmp_path))
    assert [(t["track_id"], t["layout"]) for t in found] == [("Track00002", "msdm")]
    stems = tracks.load_track(found[0], DATA, ClassMap.load())
    assert np.abs(stems[1]).max() == 0 and np.abs(stems[2]).max() == 0
    assert np.abs(stems[3]).max() > 0.05


def test_zero_length_wav_is_reported(tmp_path):
    folder = tmp_path / "train" / "Track00003"
    folder.mkdir(parents=True)
    sf.write(folder / "bass.wav", np.zeros(0, np.float32), SR)
    with pytest.raises(TrackError, match="zero-length"):
        tracks.load_track(tracks.find_tracks(str(tmp_path))[0], DATA, ClassMap.load())


def test_chunk_counts_and_offsets():
    assert chunk_starts(10000, 4096) == [0, 4096]
    assert chunk_starts(10000, 4096, pad_tail=True) == [0, 4096, 8192]
    assert chunk_starts(10000, 4096, hop=2048) == [0, 2048, 4096]
    assert chunk_starts(3000, 4096) == [] and chunk_starts(3000, 4096, pad_tail=True) == [0]


def test_resampling_to_22050_matches_reference(tmp_path):
    folder = write_slakh_track(tmp_path / "T", {
        "S00": ({"inst_class": "Bass"}, tone(440, 1.0, 0.5))})
    stems = tracks.load_track(_track(folder), Data(chunk_samples=4096), ClassMap.load())
    ref = 0.5 * np.sin(2 * np.pi * 440 * np.arange(22050) / 22050)
    assert stems.shape == (4, 22050)
    assert np.abs(stems[0] - ref)[300:-300].max() < 2e-4


@pytest.mark.parametrize("breakage, reason", [
    ("corrupt", "cannot decode"), ("missing", "missing file"), ("metadata", "malformed YAML"),
    ("lengths", "different lengths"), ("empty", "zero-length|cannot decode"),
])
def test_bad_tracks_raise_track_errors(tmp_path, breakage, reason):
    folder = tmp_path / "T"
    standard_track(folder)
    if breakage == "corrupt":
        (folder / "stems" / "S01.flac").write_bytes(b"fLaC" + bytes(100))
    elif breakage == "missing":
        (folder / "stems" / "S01.flac").unlink()
    elif breakage == "metadata":
        (folder / "metadata.yaml").write_text("stems: {S00: [unclosed\n")
    elif breakage == "lengths":
        sf.write(folder / "stems" / "S02.flac", tone(330, 0.7), SR, subtype="PCM_24")
    elif breakage == "empty":
        for f in (folder / "stems").glob("*.flac"):
            sf.write(f, np.zeros(0, np.float32), SR, subtype="PCM_24")
    with pytest.raises(TrackError, match=reason):
        tracks.load_track(_track(folder), DATA, ClassMap.load())


def _tree(root: Path, n: int = 4, seconds: float = 1.0):
    for i in range(n):
        standard_track(root / ("train" if i < n - 1 else "test") / f"Track{i + 1:05d}", seconds)


def _read_split(out, split):
    return pq.read_table(str(Path(out) / split))


@pytest.mark.slow(seconds=25)
def test_pipeline_reports_corrupt_track_and_keeps_the_others(ray_local, tmp_path):
    root, out = tmp_path / "slakh", tmp_path / "out"
    _tree(root)
    (root / "train" / "Track00002" / "stems" / "S00.flac").write_bytes(b"garbage")
    report = prepare.main(["--input", str(root), "--output", str(out), "--config", "tiny",
                           "--tracks-per-task", "2"])
    assert report["failed"] == [{"track_id": "Track00002", "split": "train",
                                 "error": report["failed"][0]["error"]}]
    assert "cannot decode" in report["failed"][0]["error"]
    assert report["splits"]["train"]["tracks"] == 2 and report["splits"]["test"]["tracks"] == 1
    table = _read_split(out, "train")
    assert sorted(set(table.column("track_id").to_pylist())) == ["Track00001", "Track00003"]
    on_disk = json.loads((out / "_report.json").read_text())
    assert on_disk["failed"][0]["track_id"] == "Track00002"
    # 1 s at 22050 Hz = 22050 samples -> 5 chunks of 4096, starts at multiples of 4096
    rows = table.filter(table.column("track_id").to_numpy(zero_copy_only=False) == "Track00001")
    assert sorted(rows.column("start").to_pylist()) == [0, 4096, 8192, 12288, 16384]
    assert sorted(rows.column("chunk_index").to_pylist()) == [0, 1, 2, 3, 4]
    x = batch_to_tensor(rows)
    assert x.shape == (5, 4, 4096) and x.dtype.is_floating_point
    with pytest.raises(SystemExit):
        prepare.main(["--input", str(root), "--output", str(out), "--config", "tiny", "--strict"])


def test_rerun_replaces_shards_and_never_duplicates(ray_local, tmp_path):
    root, out = tmp_path / "slakh", tmp_path / "out"
    _tree(root, 3)
    args = ["--input", str(root), "--output", str(out), "--config", "tiny"]
    prepare.main(args)
    first = sorted(p.name for p in (out / "train").iterdir())
    rows = _read_split(out, "train").num_rows
    (out / "_staging-dead").mkdir()  # leftover of a crashed run
    (out / "train" / "stale.parquet").write_bytes(b"old")
    prepare.main(args)
    assert sorted(p.name for p in (out / "train").iterdir()) == first
    assert _read_split(out, "train").num_rows == rows
    assert not [p for p in out.iterdir() if p.name.startswith("_staging")]


def test_unreadable_storage_fails_before_work(tmp_path):
    from pipelines.storage import StorageError

    with pytest.raises(StorageError, match="does not exist"):
        prepare.main(["--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o")])


def test_nothing_usable_exits_non_zero(ray_local, tmp_path):
    root = tmp_path / "slakh"
    _tree(root, 1)
    (root / "test" / "Track00001" / "metadata.yaml").write_text(": : :\n  - [")
    with pytest.raises(SystemExit) as e:
        prepare.main(["--input", str(root), "--output", str(tmp_path / "o"), "--config", "tiny"])
    assert e.value.code not in (0, None)


def test_s3_round_trip(ray_local, s3_bucket, tmp_path):
    import s3fs

    root = tmp_path / "slakh"
    _tree(root, 3, 0.5)
    fs = s3fs.S3FileSystem()
    fs.put(str(root), f"{s3_bucket}/slakh", recursive=True)
    out = f"s3://{s3_bucket}/prepared"
    report = prepare.main(["--input", f"s3://{s3_bucket}/slakh", "--output", out,
                           "--config", "tiny"])
    assert report["splits"]["train"]["tracks"] == 2 and not report["failed"]
    assert fs.exists(f"{s3_bucket}/prepared/_report.json")
    table = pq.read_table(f"{s3_bucket}/prepared/train", filesystem=fs)
    local = tmp_path / "local"
    prepare.main(["--input", str(root), "--output", str(local), "--config", "tiny"])
    ref = _read_split(local, "train")
    key = ["track_id", "chunk_index"]
    assert np.array_equal(batch_to_tensor(table.sort_by([(k, "ascending") for k in key])),
                          batch_to_tensor(ref.sort_by([(k, "ascending") for k in key])))
    shutil.rmtree(local)


def test_a_crash_while_publishing_never_loses_the_old_split(ray_local, tmp_path, monkeypatch):
    """#17: the old split is moved aside, not deleted, until the new one is in place; a re-run
    recovers. A track folder with stems but no metadata.yaml is named in the report."""
    from pipelines import storage

    root, out = tmp_path / "slakh", tmp_path / "out"
    _tree(root, 3)
    args = ["--input", str(root), "--output", str(out), "--config", "tiny"]
    prepare.main(args)
    rows = _read_split(out, "train").num_rows
    real_move, calls = storage.move, []

    def failing_move(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the old train split is aside, the new one not yet in place
            raise OSError("simulated crash")
        real_move(src, dst)

    monkeypatch.setattr(storage, "move", failing_move)
    with pytest.raises(OSError, match="simulated crash"):
        prepare.main(args)
    aside = [p for p in out.iterdir() if p.name.startswith("_previous-")]
    assert aside and (aside[0] / "train").is_dir() and not (out / "train").exists()
    monkeypatch.setattr(storage, "move", real_move)
    bad = root / "train" / "Track00009" / "stems"
    bad.mkdir(parents=True)
    sf.write(bad / "S00.flac", tone(55, 0.5), SR)
    report = prepare.main(args)
    assert _read_split(out, "train").num_rows == rows
    assert not [p for p in out.iterdir() if p.name.startswith(("_previous-", "_staging-"))]
    missing = [f for f in report["failed"] if f["track_id"] == "Track00009"]
    assert missing and "no metadata.yaml" in missing[0]["error"]
