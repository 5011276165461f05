import math

import numpy as np
import pytest
import torch

from msdm.metrics import sdr, si_sdr, si_sdri, window_starts, windowed_si_sdri


def _np_si_sdr(est, ref, eps=1e-8):
    alpha = (np.dot(est, ref) + eps) / (np.dot(ref, ref) + eps)
    t = alpha * ref
    return 10 * np.log10((np.dot(t, t) + eps) / (np.dot(t - est, t - est) + eps))


def test_si_sdr_matches_direct_numpy():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((3, 1000))
    est = ref + 0.3 * rng.standard_normal((3, 1000))
    got = si_sdr(torch.tensor(est), torch.tensor(ref))
    want = [_np_si_sdr(e, r) for e, r in zip(est, ref)]
    assert np.allclose(got.numpy(), want, atol=1e-9)


def test_si_sdr_is_scale_invariant_and_sdr_is_not():
    rng = np.random.default_rng(1)
    ref = torch.tensor(rng.standard_normal(500))
    est = ref + 0.1 * torch.tensor(rng.standard_normal(500))
    assert si_sdr(3 * est, ref).item() == pytest.approx(si_sdr(est, ref).item(), abs=1e-6)
    assert sdr(3 * est, ref).item() < sdr(est, ref).item() - 3


def test_si_sdri_of_the_mixture_is_zero_and_of_the_truth_is_large():
    rng = np.random.default_rng(2)
    refs = torch.tensor(rng.standard_normal((4, 800)))
    mix = refs.sum(0, keepdim=True)
    assert si_sdri(mix.expand(4, -1), refs, mix).abs().max() < 1e-9
    assert (si_sdri(refs, refs, mix) > 60).all()


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same shape"):
        si_sdr(torch.zeros(3, 10), torch.zeros(3, 11))
    with pytest.raises(ValueError, match=r"\[S, T\]"):
        windowed_si_sdri(torch.zeros(1, 4, 10), torch.zeros(1, 4, 10), 10)


def test_window_count_follows_protocol():
    # MSDM evaluate_separation.py: ceil((T - overlap) / step), overlap = window - hop, step = hop
    assert window_starts(10 * 100, 400, 200) == [0, 200, 400, 600]
    assert window_starts(11 * 100, 400, 200) == [0, 200, 400, 600, 800]
    assert window_starts(300, 400, 200) == [0]  # shorter than a window, longer than the overlap


def test_window_count_matches_the_official_formula_for_non_default_windows():
    def official(t, window, hop):  # the loop bound of the released evaluation code
        overlap = window - hop
        return [i * hop for i in range(math.ceil((t - overlap) / hop))]

    for window, hop in [(400, 100), (300, 200), (400, 400), (400, 200)]:
        for t in [1, 150, 299, 300, 301, 399, 400, 401, 1000, 1234]:
            assert window_starts(t, window, hop) == official(t, window, hop), (window, hop, t)
    assert window_starts(1000, 400, 100) == [0, 100, 200, 300, 400, 500, 600]  # not 9 windows


def test_a_track_no_longer_than_the_overlap_scores_no_window():
    sr = 100
    refs = torch.tensor(np.random.default_rng(0).standard_normal((2, 150)))  # 1.5 s < 2 s
    assert window_starts(150, 4 * sr, 2 * sr) == []
    assert windowed_si_sdri(refs, refs, sr).shape == (0, 2)
    three = torch.tensor(np.random.default_rng(1).standard_normal((2, 300)))
    assert windowed_si_sdri(three, three, sr, window_s=3.0, hop_s=1.0).shape == (1, 2)


def test_windowed_protocol_skips_windows_with_one_active_stem():
    sr, seconds = 100, 12  # 6 windows of 4 s at a 2 s hop (ceil((12-2)/2) = 5 windows)
    t = seconds * sr
    rng = np.random.default_rng(3)
    refs = torch.tensor(rng.standard_normal((3, t)) * 0.1)
    refs[1, : 6 * sr] = 0  # stem 1 silent for the first 6 s
    refs[2, : 6 * sr] = 0  # stem 2 too: windows at 0 s and 2 s have one active stem
    refs[:, 10 * sr :] = 0  # everything silent after 10 s: the window at 8 s keeps 8..10 s
    est = refs + 0.01 * torch.tensor(rng.standard_normal((3, t)))
    out = windowed_si_sdri(est, refs, sr)
    starts = window_starts(t, 4 * sr, 2 * sr)
    assert starts == [0, 200, 400, 600, 800]
    # windows 0 (0-4 s) and 1 (2-6 s): only stem 0 active -> skipped; 4-8, 6-10, 8-12 kept
    assert out.shape == (3, 3)
    mix = refs.sum(0, keepdim=True)
    want = si_sdri(est[:, 400:800], refs[:, 400:800], mix[:, 400:800])
    assert torch.allclose(out[0], want)


def test_windowed_protocol_silence_threshold():
    sr = 100
    refs = torch.zeros(2, 800)
    refs[0] = 1.0
    # ||s||/N >= 1.5e-5 means active: 4e-4 amplitude over 400 samples -> 4e-4*20/400 = 2e-5
    refs[1] = 4e-4
    assert windowed_si_sdri(refs, refs, sr).shape[0] == 3
    refs[1] = 2e-4  # 1e-5 < 1.5e-5: silent -> one active stem -> all windows skipped
    assert windowed_si_sdri(refs, refs, sr).shape == (0, 2)


def test_oracle_irm_separates_disjoint_tones_and_sums_to_the_mixture():
    sr = 8000
    t = torch.arange(2 * sr, dtype=torch.float64) / sr
    refs = torch.stack([torch.sin(2 * np.pi * 200 * t), 0.5 * torch.sin(2 * np.pi * 1500 * t)])
    from msdm.metrics import oracle_irm

    est = oracle_irm(refs, 512, 128)
    assert est.shape == refs.shape
    assert (si_sdr(est, refs) > 25).all()  # spectrally disjoint stems: near perfect
    assert torch.allclose(est.sum(0), refs.sum(0), atol=1e-6)  # masks sum to one
