"""A synthetic CREMA-D release: AudioWAV/*.wav and VideoFlash/*.flv (for tests and timing)."""
from pathlib import Path

import numpy as np
from scipy.io import wavfile


def write_flv(path, seconds=2.5, fps=30, size=(360, 480), seed=0):
    """An FLV video (CREMA-D's container and codec) of moving noise; ``size`` is (height, width)."""
    import av
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    with av.open(str(path), "w", format="flv") as container:
        stream = container.add_stream("flv", rate=fps)
        stream.height, stream.width, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(int(seconds * fps)):
            image = np.roll(base, i, axis=1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_cremad(root, clips, seconds=2.5, fps=30, size=(360, 480), rate=16_000):
    """AudioWAV/<clip>.wav (16-bit mono) and VideoFlash/<clip>.flv for each clip name."""
    root = Path(root)
    (root / "AudioWAV").mkdir(parents=True, exist_ok=True)
    (root / "VideoFlash").mkdir(parents=True, exist_ok=True)
    for i, clip in enumerate(clips):
        rng = np.random.default_rng(i)
        wave = (rng.normal(0, 0.1, int(seconds * rate)) * 32767).astype(np.int16)
        wavfile.write(root / "AudioWAV" / f"{clip}.wav", rate, wave)
        write_flv(root / "VideoFlash" / f"{clip}.flv", seconds, fps, size, seed=i)
    return root
