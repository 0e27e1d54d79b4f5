"""A synthetic NVGesture release: the two .lst lists, Video_data/class_XX/subjectN_rM/sk_color.avi
and sk_depth.avi, and optionally IGM's precomputed flow arrays (for tests and timing)."""
from pathlib import Path

import numpy as np

from ..nvgesture import LIST_NAMES


def write_avi(path, frames):
    """An MJPEG .avi of (T, H, W, 3) uint8 RGB frames at 30 fps."""
    import av
    with av.open(str(path), "w", format="avi") as container:
        stream = container.add_stream("mjpeg", rate=30)
        stream.height, stream.width, stream.pix_fmt = frames.shape[1], frames.shape[2], "yuvj420p"
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def moving_noise(frames, size, seed):
    """(frames, H, W, 3) uint8: one random image shifted a pixel to the right per frame."""
    base = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    return np.stack([np.roll(base, t, axis=1) for t in range(frames)])


def write_nvgesture(root, train_labels, test_labels, frames=20, size=(24, 32), window=(2, 14),
                    flow_size=None, igm_names=False):
    """Clips labelled ``train_labels`` / ``test_labels`` (1-based), each ``frames`` frames of
    ``size`` (height, width) with the list window ``window``; the i-th clip of a label lives in
    Video_data/class_<label>/subject<i>_r<split index>. ``flow_size`` (H, W): also write
    flow_data/{train,test}/<line>.npy of shape (H, W, 2, window length). ``igm_names``: name the
    lists nvgesture_{train,test}_correct_v2.lst, as IGM's code reads them."""
    root = Path(root)
    start, end = window
    for s, (split, labels) in enumerate((("train", train_labels), ("test", test_labels))):
        lines = []
        for line, label in enumerate(labels):
            clip = Path("Video_data") / f"class_{label:02d}" / f"subject{line}_r{s}"
            (root / clip).mkdir(parents=True, exist_ok=True)
            colour = moving_noise(frames, size, seed=100 * s + line)
            write_avi(root / clip / "sk_color.avi", colour)
            write_avi(root / clip / "sk_depth.avi", np.repeat(colour.mean(axis=3, keepdims=True), 3, axis=3)
                      .astype(np.uint8))
            lines.append(f"path:./{clip.as_posix()} depth:sk_depth:{start}:{end} color:sk_color:{start}:{end} "
                         f"duo_left:duo_left:{start + 10}:{end + 10} label:{label}\n")
            if flow_size:
                flow_dir = root / "Video_data" / "flow_data" / split
                flow_dir.mkdir(parents=True, exist_ok=True)
                flow = np.random.default_rng(line).normal(size=(*flow_size, 2, end - start)).astype(np.float32)
                np.save(flow_dir / f"{line}.npy", flow)
        (root / LIST_NAMES[split][1 if igm_names else 0]).write_text("".join(lines))
    return root
