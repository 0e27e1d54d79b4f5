"""A synthetic Kinetics-Sounds copy: list files and videos/<id>.mp4 with an AAC audio track
(for tests and timing). Each class has its own tone; frames are moving noise."""
from pathlib import Path

import numpy as np


def write_mp4(path, seconds=2.5, fps=10, size=(24, 32), rate=44_100, tone=440.0, seed=0, audio=True):
    """An MP4 (MPEG-4 video, and unless ``audio`` is false stereo AAC at ``rate`` Hz holding a
    ``tone`` Hz sine plus noise, as YouTube clips carry); ``size`` is (height, width)."""
    import av
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    with av.open(str(path), "w", format="mp4") as container:
        video = container.add_stream("mpeg4", rate=fps)
        video.height, video.width, video.pix_fmt = size[0], size[1], "yuv420p"
        sound = container.add_stream("aac", rate=rate, layout="stereo") if audio else None
        for i in range(int(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(np.roll(base, i, axis=1), format="rgb24")
            container.mux(video.encode(frame))
        container.mux(video.encode())
        if sound is not None:
            t = np.arange(int(seconds * rate)) / rate
            wave = 0.3 * np.sin(2 * np.pi * tone * t) + rng.normal(0, 0.02, t.size)
            chunk = sound.codec_context.frame_size or 1024
            for start in range(0, t.size, chunk):
                part = np.repeat(wave[None, start:start + chunk], 2, axis=0).astype(np.float32)
                frame = av.AudioFrame.from_ndarray(part, format="fltp", layout="stereo")
                frame.sample_rate, frame.pts = rate, start
                container.mux(sound.encode(frame))
            container.mux(sound.encode())


def write_kinetics_sounds(root, splits, seconds=2.5, fps=10, size=(24, 32), rate=44_100, style="names"):
    """ROOT/<split> lists and ROOT/videos/<id>.mp4 for ``splits`` = {split: [(id, class name), ...]}.

    style "names": ``<split>.csv`` of ``id,class name`` lines; "ogm": OGM-GE's ``<split>.txt`` of
    ``id,10,class index`` lines, the index being the class's place among all sorted names.
    """
    root = Path(root)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    classes = sorted({label for clips in splits.values() for _, label in clips})
    for split, clips in splits.items():
        if style == "names":
            (root / f"{split}.csv").write_text("".join(f"{clip},{label}\n" for clip, label in clips))
        else:
            (root / f"{split}.txt").write_text("".join(f"{clip},10,{classes.index(label)}\n" for clip, label in clips))
        for clip, label in clips:
            write_mp4(root / "videos" / f"{clip}.mp4", seconds, fps, size, rate,
                      tone=300.0 * (1 + classes.index(label)), seed=sum(map(ord, clip)))
    return root
