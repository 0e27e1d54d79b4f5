"""Audio features for the audio-video benchmarks, computed as the field computes them.

CREMA-D (as OGM-GE, Peng et al. CVPR'22, prepares it): the waveform at 22,050 Hz is tiled to
3 s (66,150 samples), clipped to [−1, 1], and turned into

    S = log(|STFT(x)| + 1e-7),   n_fft = 512, hop = 353, periodic Hann window,
                                 frames centred with zero padding of n_fft/2 on both sides

which is 257 frequency bins × 188 frames (librosa.stft's defaults with those sizes).

``read_audio_track`` decodes the sound of a video file (Kinetics-Sounds) with FFmpeg through PyAV.
"""
import math
from pathlib import Path

import numpy as np
import torch

from ..errors import MieInputError

CREMAD_RATE = 22_050
CREMAD_SECONDS = 3
CREMAD_N_FFT = 512
CREMAD_HOP = 353


def read_wav(path):
    """(samples float32 in [−1, 1], mono (N,), sample rate) of a PCM or float WAV file."""
    from scipy.io import wavfile
    path = Path(path)
    try:
        rate, data = wavfile.read(path)
    except Exception as e:
        raise MieInputError(f"cannot read {path} as a WAV file ({type(e).__name__}: {e})") from None
    if data.size == 0:
        raise MieInputError(f"{path} holds no audio samples")
    if data.dtype.kind == "i":
        data = data.astype(np.float32) / float(np.iinfo(data.dtype).max + 1)
    elif data.dtype.kind == "u":  # 8-bit WAV is unsigned, centred on 128
        data = (data.astype(np.float32) - 128.0) / 128.0
    data = data.astype(np.float32)
    return (data.mean(axis=1) if data.ndim == 2 else data), int(rate)


def resample(samples, rate, target):
    """Polyphase resampling of (N,) samples from ``rate`` to ``target`` Hz."""
    if rate == target:
        return samples.astype(np.float32)
    from scipy.signal import resample_poly
    g = math.gcd(rate, target)
    return resample_poly(samples, target // g, rate // g).astype(np.float32)


def tile_and_clip(samples, length):
    """Repeat (N,) samples until ``length`` long, cut to ``length``, clip to [−1, 1]."""
    reps = -(-length // len(samples))
    return np.clip(np.tile(samples, reps)[:length], -1.0, 1.0).astype(np.float32)


def log_spectrogram(samples, n_fft=CREMAD_N_FFT, hop=CREMAD_HOP):
    """log(|STFT| + 1e-7) of (N,) samples → float32 (n_fft/2 + 1, 1 + N // hop)."""
    x = torch.as_tensor(samples, dtype=torch.float64)
    window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64)
    stft = torch.stft(x, n_fft, hop_length=hop, window=window, center=True, pad_mode="constant",
                      return_complex=True)
    return torch.log(stft.abs() + 1e-7).to(torch.float32).numpy()


def cremad_spectrogram(samples, rate):
    """The CREMA-D audio input: (257, 188) float32 from a mono waveform at any sample rate."""
    x = tile_and_clip(resample(samples, rate, CREMAD_RATE), CREMAD_RATE * CREMAD_SECONDS)
    return log_spectrogram(x)


def read_audio_track(path, rate):
    """The first audio track of a media file, decoded and resampled by FFmpeg (libswresample) to
    16-bit mono at ``rate`` Hz → (N,) float32 in [−1, 1)."""
    try:
        import av
    except ImportError:
        raise MieInputError("reading the audio of a video needs PyAV: pip install 'mie[video]'") from None
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise MieInputError(f"{path} has no audio track")
            resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
            chunks = []
            for frame in container.decode(container.streams.audio[0]):
                chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
            chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
    except MieInputError:
        raise
    except Exception as e:
        raise MieInputError(f"cannot decode the audio of {path} ({type(e).__name__}: {e})") from None
    if not chunks or sum(len(c) for c in chunks) == 0:
        raise MieInputError(f"{path} holds no audio samples")
    return np.concatenate(chunks).astype(np.float32) / 32768.0
