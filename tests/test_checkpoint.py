import io

import pytest
import torch

import msdm
from msdm.checkpoint import CheckpointError, build_denoiser, load_checkpoint, load_factorized, save
from msdm.config import apply_overrides
from msdm.training import make_ema, make_optimizer


def test_round_trip_gives_identical_output(tmp_path, tiny_cfg):
    torch.manual_seed(0)
    den = build_denoiser(tiny_cfg)
    ema = make_ema(den)
    for p in ema.parameters():
        p.data.add_(0.01)
    opt = make_optimizer(den, tiny_cfg)
    path = tmp_path / "model.ckpt"
    save(path, tiny_cfg, den, ema, step=7, optimizer=opt, extra={"history": [{"step": 1}]})
    state = torch.load(path, weights_only=True)  # loadable without pickled classes
    assert state["step"] == 7 and state["extra"]["history"] == [{"step": 1}]
    x, sigma = torch.randn(2, 4, 4096), torch.tensor([0.1, 1.0])
    cfg, loaded = load_checkpoint(path)
    assert cfg == tiny_cfg
    with torch.no_grad():
        assert torch.equal(loaded(x, sigma), ema(x, sigma))
        _, raw = load_checkpoint(path, use_ema=False)
        assert torch.equal(raw(x, sigma), den(x, sigma))


def test_file_objects_round_trip(tiny_cfg):
    den = build_denoiser(tiny_cfg)
    buf = io.BytesIO()
    save(buf, tiny_cfg, den)
    buf.seek(0)
    _, loaded = load_checkpoint(buf)
    x = torch.randn(1, 4, 4096)
    with torch.no_grad():
        assert torch.equal(loaded(x, torch.tensor([0.3])), den(x, torch.tensor([0.3])))


def _state(cfg, **changes):
    state = {"format_version": 1, "config": cfg.to_dict(), "model": {}, "ema": None, "step": 0}
    state.update(changes)
    return state


def test_an_oversized_network_is_refused_before_it_is_built(tmp_path, tiny_cfg):
    """#19.3: a small file whose config asks for 4096 channels must not exhaust memory."""
    huge = apply_overrides(msdm.load_config("paper"), {"model.channels": 4096})
    path = tmp_path / "huge.ckpt"
    torch.save(_state(huge), path)
    assert path.stat().st_size < 100_000
    with pytest.raises(CheckpointError, match=r"huge.ckpt: .* above the cap"):
        load_checkpoint(path)


@pytest.mark.parametrize("change, match", [
    ({"format_version": "1"}, "format_version must be a positive integer"),
    ({"format_version": None}, "format_version must be a positive integer"),
    ({"ema": [1, 2]}, "'ema' must be a dict"),
    ({"model": "weights"}, "'model' must be a dict"),
    ({"model": {"net.embed.weights": torch.zeros(3)}}, "weights do not fit"),
])
def test_malformed_fields_name_the_file(tmp_path, tiny_cfg, change, match):
    path = tmp_path / "bad.ckpt"
    torch.save(_state(tiny_cfg, **change), path)
    with pytest.raises(CheckpointError, match=match) as e:
        load_checkpoint(path)
    assert "bad.ckpt" in str(e.value)


def test_a_folder_or_a_pickle_payload_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="is a folder"):
        load_checkpoint(tmp_path)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"format_version": 1, "config": {}, "x": Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="evil.ckpt"):
        load_checkpoint(tmp_path / "evil.ckpt")
    assert not marker.exists()  # nothing in the file ran


def test_corrupt_and_foreign_files_give_clear_errors(tmp_path, tiny_cfg):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable msdm checkpoint"):
        load_checkpoint(bad)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not an msdm checkpoint"):
        load_checkpoint(foreign)
    good = tmp_path / "good.ckpt"
    save(good, tiny_cfg, build_denoiser(tiny_cfg))
    truncated = tmp_path / "trunc.ckpt"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError):
        load_checkpoint(truncated)
    with pytest.raises(CheckpointError, match="no such"):
        load_checkpoint(tmp_path / "missing.ckpt")


def test_isdm_checkpoints_build_a_factorized_denoiser(tmp_path, tiny_cfg):
    paths = {}
    for stem in tiny_cfg.data.stems:
        cfg = apply_overrides(tiny_cfg, {"train.stem": stem})
        paths[stem] = tmp_path / f"{stem}.ckpt"
        save(paths[stem], cfg, build_denoiser(cfg))
    cfg, fact = load_factorized(paths, tiny_cfg.data.stems)
    assert cfg.train.stem == "" and cfg.sampler.s_churn == 40.0
    assert fact(torch.randn(1, 4, 4096), torch.tensor([0.5])).shape == (1, 4, 4096)
    with pytest.raises(CheckpointError, match="missing"):
        load_factorized({k: v for k, v in paths.items() if k != "piano"}, tiny_cfg.data.stems)
    swapped = dict(paths, bass=paths["drums"])
    with pytest.raises(CheckpointError, match="prior of drums"):
        load_factorized(swapped, tiny_cfg.data.stems)
    other = apply_overrides(tiny_cfg, {"train.stem": "piano", "data.sample_rate": 16000})
    save(paths["piano"], other, build_denoiser(other))
    with pytest.raises(CheckpointError, match="sample_rate"):
        load_factorized(paths, tiny_cfg.data.stems)


def test_stem_names_from_a_checkpoint_must_be_file_name_safe(tmp_path, tiny_cfg):
    """#19.2: a checkpoint whose data.stems holds `../..` paths is refused when read."""
    state = _state(tiny_cfg)
    state["config"]["data"]["stems"] = ["../../x", "drums", "guitar", "piano"]
    torch.save(state, tmp_path / "stems.ckpt")
    with pytest.raises(CheckpointError, match=r"stems.ckpt: .*stem names must match"):
        load_checkpoint(tmp_path / "stems.ckpt")
