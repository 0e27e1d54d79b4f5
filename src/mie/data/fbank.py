"""Kaldi's log mel filterbank ("fbank") features in PyTorch, as ``compute-fbank-feats`` and
``torchaudio.compliance.kaldi.fbank`` compute them (Povey et al., the Kaldi toolkit,
``feat/feature-fbank.cc``, ``feat/feature-window.cc``, ``feat/mel-computations.cc``).

For a waveform x (N,) at sample rate r, with L = r·frame_length/1000 and S = r·frame_shift/1000
samples, and P the power of two ≥ L:

1. frames     x_t = x[t·S : t·S + L],  t = 0 … 1 + (N − L) // S − 1   (Kaldi's snip_edges)
2. DC offset  x_t ← x_t − mean(x_t)
3. pre-emph.  x_t[i] ← x_t[i] − α·x_t[i−1],  x_t[0] ← x_t[0] − α·x_t[0]   (α = preemphasis)
4. window     x_t ← x_t · w,   w one of hanning (0.5 − 0.5 cos(2πi/(L−1))), hamming, povey
              (hanning^0.85), rectangular, blackman (coefficient 0.42)
5. power      p_t = |rfft(x_t zero-padded to P)|²   (P/2 + 1 bins)
6. mel        m_t[b] = Σ_k W[b, k] · p_t[k],  W triangles on mel(f) = 1127 ln(1 + f/700), the
              b-th spanning mel bins b, b+1, b+2 of num_bins + 2 points spaced evenly between
              mel(low_freq) and mel(high_freq) (high_freq ≤ 0 counts down from Nyquist); the
              Nyquist bin has weight 0
7. log        log(max(m_t[b], ε)),  ε = float32 machine epsilon 1.1920929e-07

→ (frames, num_bins). Dither is 0 (deterministic); energy is not appended. The defaults
(25 ms / 10 ms, pre-emphasis 0.97, DC removal, povey window, 20 Hz … Nyquist) are Kaldi's.
"""
import math

import torch

from ..errors import MieInputError

EPSILON = torch.finfo(torch.float32).eps


def mel(freq):
    """Kaldi's mel scale: 1127 ln(1 + f / 700)."""
    return 1127.0 * torch.log1p(torch.as_tensor(freq, dtype=torch.float64) / 700.0)


def window(kind, length, blackman_coeff=0.42):
    """Kaldi's analysis windows (symmetric, ``length`` samples) → (length,) float64."""
    i = torch.arange(length, dtype=torch.float64)
    a = 2 * math.pi / (length - 1)
    windows = {
        "hanning": lambda: 0.5 - 0.5 * torch.cos(a * i),
        "povey": lambda: (0.5 - 0.5 * torch.cos(a * i)) ** 0.85,
        "hamming": lambda: 0.54 - 0.46 * torch.cos(a * i),
        "rectangular": lambda: torch.ones(length, dtype=torch.float64),
        "blackman": lambda: blackman_coeff - 0.5 * torch.cos(a * i) + (0.5 - blackman_coeff) * torch.cos(2 * a * i),
    }
    if kind not in windows:
        raise MieInputError(f"window '{kind}' is not one of: {', '.join(windows)}")
    return windows[kind]()


def mel_banks(num_bins, fft_size, sample_rate, low_freq=20.0, high_freq=0.0):
    """Triangular mel filters W (num_bins, fft_size/2 + 1) float64; the Nyquist column is 0."""
    nyquist = 0.5 * sample_rate
    high = high_freq if high_freq > 0 else nyquist + high_freq
    if not 0 <= low_freq < high <= nyquist:
        raise MieInputError(f"mel band {low_freq}…{high} Hz must lie within 0…{nyquist} Hz (Nyquist), low < high")
    low_mel, high_mel = mel(low_freq), mel(high)
    delta = (high_mel - low_mel) / (num_bins + 1)
    b = torch.arange(num_bins, dtype=torch.float64)[:, None]
    left, center, right = low_mel + b * delta, low_mel + (b + 1) * delta, low_mel + (b + 2) * delta
    bin_mel = mel(sample_rate / fft_size * torch.arange(fft_size // 2, dtype=torch.float64))[None, :]
    up, down = (bin_mel - left) / (center - left), (right - bin_mel) / (right - center)
    weights = torch.clamp(torch.minimum(up, down), min=0.0)
    return torch.cat([weights, torch.zeros(num_bins, 1, dtype=torch.float64)], dim=1)


def kaldi_fbank(samples, sample_rate=16_000, num_mel_bins=23, frame_length=25.0, frame_shift=10.0,
                window_type="povey", preemphasis=0.97, remove_dc_offset=True, low_freq=20.0, high_freq=0.0,
                dtype=torch.float32):
    """Log mel filterbank of a mono waveform (N,) → (frames, num_mel_bins) tensor of ``dtype``.

    ``frame_length`` and ``frame_shift`` in milliseconds; the steps are in the module docstring.
    A waveform shorter than one frame gives (0, num_mel_bins).
    """
    x = torch.as_tensor(samples).to(dtype).reshape(-1)
    length = int(sample_rate * frame_length * 0.001)
    shift = int(sample_rate * frame_shift * 0.001)
    if length < 2 or shift < 1:
        raise MieInputError(f"frame_length {frame_length} ms and frame_shift {frame_shift} ms are too short "
                            f"at {sample_rate} Hz")
    fft_size = 1 << (length - 1).bit_length()
    if len(x) < length:
        return torch.zeros(0, num_mel_bins, dtype=dtype)
    frames = x.unfold(0, length, shift)                                   # (T, L)
    if remove_dc_offset:
        frames = frames - frames.mean(dim=1, keepdim=True)
    if preemphasis:
        previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
        frames = frames - preemphasis * previous
    frames = frames * window(window_type, length).to(dtype)
    power = torch.fft.rfft(frames, n=fft_size).abs().pow(2)              # (T, P/2 + 1)
    banks = mel_banks(num_mel_bins, fft_size, sample_rate, low_freq, high_freq).to(dtype)
    return torch.clamp(power @ banks.T, min=EPSILON).log()
