"""Video frames with PyAV (an optional extra: ``pip install 'mie[video]'``)."""
import numpy as np

from ..errors import MieInputError


def read_frames(path, size=(224, 224), fps=1.0):
    """Decode a video with PyAV and keep one frame per 1/fps seconds → (T, 3, H, W) uint8."""
    try:
        import av
    except ImportError:
        raise MieInputError("reading CREMA-D video needs PyAV: pip install 'mie[video]' (or pip install av)") from None
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
