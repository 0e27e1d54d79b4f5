"""Kaldi fbank: against kaldi-native-fbank (an independent C++ port of Kaldi) and closed forms."""
import numpy as np
import pytest
import torch

from mie.data.fbank import EPSILON, kaldi_fbank, mel, mel_banks
from mie.errors import MieInputError


def chirp_and_noise(rate=16_000, seconds=1.3, seed=0):
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    return (0.5 * np.sin(2 * np.pi * (100 * t + 0.4 * rate * t ** 2 / seconds)) + 0.05 * rng.normal(size=t.size)
            ).astype(np.float32)


@pytest.mark.parametrize("window,bins,rate", [("hanning", 80, 16_000), ("povey", 40, 16_000),
                                              ("hamming", 64, 22_050), ("rectangular", 23, 8_000)])
def test_matches_kaldi_native_fbank(window, bins, rate):
    knf = pytest.importorskip("kaldi_native_fbank")
    x = chirp_and_noise(rate)
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq, opts.frame_opts.dither, opts.frame_opts.window_type = rate, 0.0, window
    opts.mel_opts.num_bins = bins
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(rate, x.tolist())
    fbank.input_finished()
    reference = np.stack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)])
    ours = kaldi_fbank(x, rate, bins, window_type=window).numpy()
    assert ours.shape == reference.shape == (1 + (len(x) - int(0.025 * rate)) // int(0.010 * rate), bins)
    diff = np.abs(ours - reference)
    # float32 round-off: most values agree to ~1e-5; near-silent low bins (log ≈ −12) to ~1e-3
    assert np.median(diff) < 2e-5 and diff.max() < 3e-3, (np.median(diff), diff.max())


def test_pure_tone_lands_in_its_mel_bin():
    rate, bins, freq = 16_000, 40, 1000.0
    x = np.sin(2 * np.pi * freq * np.arange(rate) / rate).astype(np.float32)
    fbank = kaldi_fbank(x, rate, bins, window_type="hanning")
    low, high = mel(20.0), mel(rate / 2)
    centers = low + (torch.arange(bins) + 1) * (high - low) / (bins + 1)       # filter centres, mel
    expected = int(torch.argmin((centers - mel(freq)).abs()))
    assert (fbank.argmax(dim=1) == expected).all()
    assert fbank[:, expected].mean() - fbank.mean() > 5                          # far above the rest


def test_128_bins_at_16khz_leave_one_filter_empty():
    """OGM-GE's setting: 512-point FFT bins are 31.25 Hz apart, narrower low filters miss them all."""
    weights = mel_banks(128, 512, 16_000)
    assert weights.shape == (128, 257) and (weights[:, -1] == 0).all()
    assert torch.nonzero(weights.sum(dim=1) == 0).flatten().tolist() == [3]
    fbank = kaldi_fbank(chirp_and_noise(), 16_000, 128, window_type="hanning")
    assert torch.allclose(fbank[:, 3], torch.full_like(fbank[:, 3], float(np.log(EPSILON))))


def test_short_input_and_bad_band():
    assert kaldi_fbank(np.zeros(399, np.float32), 16_000, 128).shape == (0, 128)
    assert kaldi_fbank(np.zeros(400, np.float32), 16_000, 128).shape == (1, 128)
    with pytest.raises(MieInputError, match="mel band"):
        mel_banks(23, 512, 16_000, low_freq=9000.0)
    with pytest.raises(MieInputError, match="window 'kaiser'"):
        kaldi_fbank(np.zeros(800, np.float32), window_type="kaiser")
