"""Audio features: the CREMA-D spectrogram against an independent STFT, WAV reading, tiling."""
import numpy as np
import pytest
from scipy.io import wavfile

from mie.data.audio import cremad_spectrogram, log_spectrogram, read_wav, tile_and_clip
from mie.errors import MieInputError


def numpy_log_stft(x, n_fft, hop):
    """Centred STFT by hand: zero-pad n_fft/2 each side, periodic Hann, rfft per frame."""
    padded = np.pad(x.astype(np.float64), n_fft // 2)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    frames = [padded[i * hop:i * hop + n_fft] * window for i in range(1 + len(x) // hop)]
    return np.log(np.abs(np.fft.rfft(np.array(frames), axis=1)).T + 1e-7)


def test_spectrogram_matches_an_independent_stft():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, 66_150).astype(np.float32)
    got = log_spectrogram(x)
    assert got.shape == (257, 188) and got.dtype == np.float32
    want = numpy_log_stft(x, 512, 353)
    assert np.allclose(got, want, atol=1e-4)


def test_a_sine_on_a_bin_peaks_on_that_bin():
    rate, k = 22_050, 40                                   # bin 40 of a 512-point FFT
    t = np.arange(66_150) / rate
    spec = log_spectrogram(np.sin(2 * np.pi * k * rate / 512 * t))
    assert np.all(np.argmax(spec[:, 2:-2], axis=0) == k)   # every frame away from the padded edges


def test_cremad_input_tiles_clips_and_resamples(tmp_path):
    rate = 16_000
    x = (0.5 * np.sin(2 * np.pi * 440 * np.arange(rate) / rate)).astype(np.float32)   # 1 s at 16 kHz
    path = tmp_path / "clip.wav"
    wavfile.write(path, rate, (x * 32767).astype(np.int16))
    samples, got_rate = read_wav(path)
    assert got_rate == rate and np.allclose(samples, x, atol=1e-4)
    assert cremad_spectrogram(samples, rate).shape == (257, 188)
    tiled = tile_and_clip(np.array([0.5, 2.0, -3.0], np.float32), 7)
    assert tiled.tolist() == [0.5, 1.0, -1.0, 0.5, 1.0, -1.0, 0.5]


def test_unreadable_and_empty_wavs_are_refused(tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not a wav")
    with pytest.raises(MieInputError, match="cannot read"):
        read_wav(bad)
    empty = tmp_path / "empty.wav"
    wavfile.write(empty, 16_000, np.zeros(0, np.int16))
    with pytest.raises(MieInputError, match="no audio samples"):
        read_wav(empty)
