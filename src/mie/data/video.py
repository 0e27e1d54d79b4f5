"""Video frames with PyAV (an optional extra: ``pip install 'mie[video]'``), and the frames a
clip gives its encoder."""
import numpy as np

from ..errors import MieInputError

# ImageNet pixel statistics, shaped to broadcast over (C, T, H, W)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None, None]
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None, None]


def spaced_frames(video, frames):
    """(T, 3, H, W) uint8 → (3, frames, H, W) float32: ``frames`` frames evenly spaced over the
    clip (repeated when it is shorter), scaled to [0, 1] and ImageNet-normalised."""
    pick = np.linspace(0, len(video) - 1, frames).round().astype(int)
    return (video[pick].transpose(1, 0, 2, 3).astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def read_frames(path, size=(224, 224), fps=1.0):
    """Decode a video with PyAV and keep one frame per 1/fps seconds → (T, 3, H, W) uint8."""
    try:
        import av
    except ImportError:
        raise MieInputError("reading video needs PyAV: pip install 'mie[video]' (or pip install av)") from None
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            frames, next_time = [], 0.0
            for frame in container.decode(stream):
                t = float(frame.pts * stream.time_base) if frame.pts is not None else len(frames) / fps
                if t + 1e-6 >= next_time:
                    image = frame.to_ndarray(format="rgb24", width=size[1], height=size[0])
                    frames.append(image.transpose(2, 0, 1))
                    next_time += 1.0 / fps
    except MieInputError:
        raise
    except Exception as e:
        raise MieInputError(f"cannot decode {path} ({type(e).__name__}: {e})") from None
    if not frames:
        raise MieInputError(f"{path} holds no video frames")
    return np.stack(frames).astype(np.uint8)
