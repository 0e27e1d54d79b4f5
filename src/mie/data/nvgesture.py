"""NVGesture (Molchanov et al., "Online Detection and Classification of Dynamic Hand Gestures
with Recurrent 3D Convolutional Neural Networks", CVPR 2016): 1,532 clips of 25 hand gestures by
20 subjects in a car simulator; modalities RGB, depth and optical flow (the MIE paper's setting,
after the authors' code njustkmg/IJCAI25-IGM, datasets/nvGesture.py).

Raw layout read by ``prepare_nvgesture`` (NVIDIA's release; the lists may also carry IGM's names
``nvgesture_{train,test}_correct_v2.lst``)::

    ROOT/nvgesture_train_correct_cvpr2016_v2.lst      1,050 lines
    ROOT/nvgesture_test_correct_cvpr2016_v2.lst         482 lines
    ROOT/Video_data/class_01/subject3_r0/sk_color.avi   colour (SoftKinetic)
    ROOT/Video_data/class_01/subject3_r0/sk_depth.avi   depth, stored as grey colour frames
    ROOT/Video_data/flow_data/train/<line>.npy          optional: precomputed flow, float32 (H, W, 2, T),
    ROOT/Video_data/flow_data/test/<line>.npy           <line> the 0-based line number in the list (IGM)

A list line, space separated (label 1-based; the window ``start:end`` in frames, 80 for sk_*)::

    path:./Video_data/class_01/subject3_r0 depth:sk_depth:146:226 color:sk_color:146:226 duo_left:duo_left:170:263 label:1

The folder name is not the class: a clip in class_01/ may be labelled 2; the label field decides.

Prepared layout written to OUT (one file per clip and modality, each written atomically)::

    OUT/rgb/<split>_<line>.npy     (T, 3, S, S) uint8     the colour window, resized to S × S
    OUT/depth/<split>_<line>.npy   (T, 1, S, S) uint8     the depth window, one channel (blue, as IGM)
    OUT/flow/<split>_<line>.npy    (T, 2, S, S) float16   (x, y) displacement in pixels at S × S
    OUT/clips.tsv                  key, split, line, path, label (0-based) of every prepared clip

T ≤ 80 (fewer when a video ends inside its window); S = ``size`` (256, as IGM's cv2.resize).
Flow: ``flow="auto"`` reads the precomputed arrays when ROOT/Video_data/flow_data exists and
otherwise prepares no flow; ``flow="farneback"`` computes it from the colour window with OpenCV's
Farnebäck method (``pip install 'mie[flow]'``; pyr_scale 0.5, levels 3, winsize 15, iterations 3,
poly_n 5, poly_sigma 1.2; the flow of frame t is t → t+1, the last frame's is zero). How IGM's
arrays were computed is not documented; arrays of another size are resized to S × S with the
displacements scaled to match.

Training reads OUT through ``nvgesture_datasets``, as IGM: a train clip is ``frames[0]`` (64)
consecutive frames from a random offset (zero-padded when shorter) and a random ``crop`` × ``crop``
(224) window shared by all modalities, no flip; evaluation takes ``frames[1]`` (80) frames and the
centre crop. RGB is scaled to [0, 1] and normalised with the ImageNet mean and std, depth only
scaled to [0, 1], flow left as it is. Validation is ``carve_val`` of the train list (stratified,
seeded); the test list is only tested on.
"""
import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import MieInputError
from ..io import write_text
from .disk import DiskBenchmark
from .preparation import PrepareSummary, finish, run_jobs, save_npy
from .splits import carve_validation
from .torch_dataset import SelectedModalities
from .video import IMAGENET_MEAN, IMAGENET_STD

CLASSES = tuple(f"class_{i:02d}" for i in range(1, 26))
MODALITIES = ("rgb", "depth", "flow")
LIST_NAMES = {"train": ("nvgesture_train_correct_cvpr2016_v2.lst", "nvgesture_train_correct_v2.lst"),
              "test": ("nvgesture_test_correct_cvpr2016_v2.lst", "nvgesture_test_correct_v2.lst")}
FLOW_SOURCES = ("auto", "precomputed", "farneback", "none")
FARNEBACK = dict(pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0)
CLIPS_FILE = "clips.tsv"


@dataclass(frozen=True)
class ListedClip:
    split: str      # train | test
    line: int       # 0-based line number in its list (the name of IGM's flow array)
    path: str       # e.g. class_01/subject3_r0, relative to Video_data
    color: tuple    # (video name, start, end): frames start … end−1 of <path>/<video name>.avi
    depth: tuple    # the same for the depth video
    label: int      # 0-based

    @property
    def key(self):
        return f"{self.split}_{self.line:04d}"

    @property
    def name(self):
        return f"{self.path} ({self.split} list line {self.line + 1})"


def find_list(root, split):
    """The path of the train or test list in ``root``, under either of its names."""
    for name in LIST_NAMES[split]:
        if (Path(root) / name).is_file():
            return Path(root) / name
    raise MieInputError(f"{root} has no NVGesture {split} list; expected {' or '.join(LIST_NAMES[split])} "
                        "(NVIDIA's release layout)")


def parse_line(text, split, line):
    """One list line → ListedClip with the label field minus 1 (not yet checked against the
    classes); MieInputError for a line that is not in the list format."""
    fields = dict(item.split(":", 1) for item in text.split() if ":" in item)
    try:
        path = fields["path"].removeprefix("./").removeprefix("Video_data/")
        windows = {}
        for sensor in ("color", "depth"):
            video, start, end = fields[sensor].split(":")
            windows[sensor] = (video, int(start), int(end))
            if int(end) <= int(start) or not video:
                raise ValueError
        label = int(fields["label"])
    except (KeyError, ValueError):
        raise MieInputError(f"cannot read '{text.strip()}'; expected path:./Video_data/class_01/subject3_r0 "
                            "depth:sk_depth:START:END color:sk_color:START:END ... label:N") from None
    return ListedClip(split, line, path, windows["color"], windows["depth"], label - 1)


def read_list(root, split, bad):
    """ListedClips of the ``split`` list; unreadable lines and labels outside 1…25 go into
    ``bad`` (name → why)."""
    clips = []
    with open(find_list(root, split)) as f:
        for line, text in enumerate(f):
            if not text.strip():
                continue
            try:
                clip = parse_line(text, split, line)
            except MieInputError as e:
                bad[f"{split} list line {line + 1}"] = str(e)
                continue
            if 0 <= clip.label < len(CLASSES):
                clips.append(clip)
            else:
                bad[clip.name] = f"label {clip.label + 1} is not a class (1…{len(CLASSES)})"
    return clips


def read_window(path, start, end, size):
    """Frames start … end−1 of a video, decoded with PyAV and resized → (T, H, W, 3) uint8 RGB,
    T ≤ end − start (the video may end inside the window)."""
    try:
        import av
    except ImportError:
        raise MieInputError("reading NVGesture video needs PyAV: pip install 'mie[video]' (or pip install av)") from None
    if not Path(path).is_file():
        raise MieInputError(f"no such video: {path}")
    frames, count = [], 0
    try:
        with av.open(str(path)) as container:
            for count, frame in enumerate(container.decode(video=0)):
                if count >= end:
                    break
                if count >= start:
                    frames.append(frame.to_ndarray(format="rgb24", width=size, height=size))
    except Exception as e:
        raise MieInputError(f"cannot decode {path} ({type(e).__name__}: {e})") from None
    if not frames:
        raise MieInputError(f"{path} has no frame in the listed window {start}:{end}")
    return np.stack(frames)


def farneback_flow(rgb):
    """Dense optical flow of (T, H, W, 3) uint8 frames with OpenCV's Farnebäck method →
    (T, 2, H, W) float16 (x, y) displacements; frame t's is t → t+1, the last frame's zero."""
    try:
        import cv2
    except ImportError:
        raise MieInputError("flow=farneback needs OpenCV: pip install 'mie[flow]' (or pip install "
                            "opencv-python-headless)") from None
    grey = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in rgb]
    flow = np.zeros((len(grey), *grey[0].shape, 2), np.float32)
    for t in range(len(grey) - 1):
        flow[t] = cv2.calcOpticalFlowFarneback(grey[t], grey[t + 1], None, **FARNEBACK)
    return flow.transpose(0, 3, 1, 2).astype(np.float16)


def read_flow_array(path, size):
    """IGM's precomputed flow (H, W, 2, T) float32 → (T, 2, size, size) float16; another H × W is
    resized bilinearly with the x and y displacements scaled by the resize factors."""
    if not Path(path).is_file():
        raise MieInputError(f"no precomputed flow array {path}")
    try:
        array = np.load(path)
    except Exception as e:
        raise MieInputError(f"cannot read {path} ({type(e).__name__}: {e})") from None
    if array.ndim != 4 or array.shape[2] != 2 or 0 in array.shape:
        raise MieInputError(f"{path} has shape {array.shape}; expected (H, W, 2, T) as IGM's flow_data")
    flow = torch.from_numpy(np.ascontiguousarray(array.transpose(3, 2, 0, 1), dtype=np.float32))
    height, width = flow.shape[2:]
    if (height, width) != (size, size):
        flow = torch.nn.functional.interpolate(flow, size=(size, size), mode="bilinear", align_corners=False)
        flow[:, 0] *= size / width
        flow[:, 1] *= size / height
    return flow.numpy().astype(np.float16)


def _prepare_one(job):
    """Write one clip's rgb, depth (and flow) arrays; returns (clip name, 'done' | 'skipped' | error text)."""
    clip, root, out, size, flow = job
    targets = {m: out / m / f"{clip.key}.npy" for m in ("rgb", "depth") + (("flow",) if flow != "none" else ())}
    if all(p.exists() for p in targets.values()):
        return clip.name, "skipped"
    video = root / "Video_data" / clip.path
    try:
        rgb = read_window(video / f"{clip.color[0]}.avi", *clip.color[1:], size)
        depth = read_window(video / f"{clip.depth[0]}.avi", *clip.depth[1:], size)
        if flow == "precomputed":
            flow_array = read_flow_array(root / "Video_data" / "flow_data" / clip.split / f"{clip.line}.npy", size)
        elif flow == "farneback":
            flow_array = farneback_flow(rgb)
        save_npy(targets["rgb"], rgb.transpose(0, 3, 1, 2))
        save_npy(targets["depth"], depth[:, None, :, :, 2])   # blue of BGR, as IGM's frame[..., 0]
        if flow != "none":
            save_npy(targets["flow"], flow_array)
    except MieInputError as e:
        return clip.name, str(e)
    return clip.name, "done"


def prepare_nvgesture(root, out, workers=None, skip_bad=False, progress=None, size=256, flow="auto"):
    """Turn the raw release in ``root`` into ``out`` (layout in the module docstring).

    ``size``: frames are resized to size × size. ``flow``: auto | precomputed | farneback | none
    (see the module docstring). Re-running skips clips whose files exist. A clip whose video is
    missing or unreadable, whose window holds no frame, whose flow array is missing or malformed,
    or whose label is not a class, is an error naming the first bad clips, unless ``skip_bad``:
    then it is left out and listed in OUT/bad_files.txt. Returns a ``PrepareSummary``.
    """
    root, out = Path(root), Path(out)
    if flow not in FLOW_SOURCES:
        raise MieInputError(f"flow={flow!r} is not one of: {', '.join(FLOW_SOURCES)}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise MieInputError(f"size must be an integer >= 8, got {size!r}")
    if not (root / "Video_data").is_dir():
        raise MieInputError(f"{root} has no Video_data folder; expected NVIDIA's NVGesture layout "
                            "(the two .lst lists and Video_data/class_XX/subjectN_rM/sk_color.avi, sk_depth.avi)")
    has_arrays = (root / "Video_data" / "flow_data").is_dir()
    if flow == "auto":
        flow = "precomputed" if has_arrays else "none"
    if flow == "precomputed" and not has_arrays:
        raise MieInputError(f"flow=precomputed needs the arrays in {root / 'Video_data' / 'flow_data'}/{{train,test}}/"
                            "<line>.npy; use flow=farneback to compute flow, or flow=none")
    summary = PrepareSummary()
    clips = read_list(root, "train", summary.bad) + read_list(root, "test", summary.bad)
    jobs = [(c, root, out, size, flow) for c in clips]
    run_jobs(_prepare_one, jobs, summary, workers, "NVGesture", progress)
    finish(summary, out, skip_bad, "clip")
    prepared = [c for c in clips if c.name not in summary.bad]
    write_text(out / CLIPS_FILE, "key\tsplit\tline\tpath\tlabel\n" + "".join(
        f"{c.key}\t{c.split}\t{c.line}\t{c.path}\t{c.label}\n" for c in prepared))
    return summary


def read_prepared(prepared):
    """Rows {key, split, line, path, label} of OUT/clips.tsv."""
    path = Path(prepared) / CLIPS_FILE
    if not path.is_file():
        raise MieInputError(f"{prepared} is not a prepared NVGesture folder (no {CLIPS_FILE}); run "
                            "`mie prepare nvgesture --root RAW --out DIR` to the end and pass DIR")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows:
        raise MieInputError(f"{path} lists no prepared clips")
    return rows


def _frame_counts(frames):
    """``frames`` option → (train, eval) frame counts: one integer for both, or a pair."""
    pair = [frames, frames] if isinstance(frames, int) and not isinstance(frames, bool) else list(frames or [])
    if len(pair) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in pair):
        raise MieInputError(f"frames must be a positive integer or a pair [train, eval] (IGM: [64, 80]), got {frames!r}")
    return tuple(pair)


class NVGestureDataset(SelectedModalities, Dataset):
    """Prepared NVGesture clips: item i is ({"rgb": (3, F, C, C), "depth": (1, F, C, C),
    "flow": (2, F, C, C)}, label) float32, F = ``frames``, C = ``crop``, for ``modalities``.

    ``train``: a random F-frame window and a random crop, the same for every modality; otherwise the
    centre window and centre crop. Windows shorter than F are zero-padded at the end. ``only`` reads
    fewer modalities' frames; the window is still drawn from all of them (memory-mapped headers), so
    it is the same as when every modality is read.
    """

    num_classes = len(CLASSES)
    classes = list(CLASSES)

    def __init__(self, prepared, keys, labels, modalities, frames, crop, train):
        self.prepared, self.keys, self.labels = Path(prepared), list(keys), list(labels)
        self.modalities, self.frames, self.crop, self.train = tuple(modalities), frames, crop, train
        self.window_from = self.modalities

    def __len__(self):
        return len(self.keys)

    def _window(self, length, size):
        """(first frame, top, left) of the window: random for training, centred otherwise."""
        spare_t, spare_s = max(length - self.frames, 0), size - self.crop
        if self.train:
            return tuple(int(torch.randint(0, n + 1, ())) for n in (spare_t, spare_s, spare_s))
        return spare_t // 2, spare_s // 2, spare_s // 2

    def __getitem__(self, i):
        arrays = {m: np.load(self.prepared / m / f"{self.keys[i]}.npy", mmap_mode="r") for m in self.window_from}
        length = max(len(a) for a in arrays.values())
        start, top, left = self._window(length, next(iter(arrays.values())).shape[-1])
        sample = {}
        for m in self.modalities:
            a = arrays[m]
            clip = np.asarray(a[start:start + self.frames, :, top:top + self.crop, left:left + self.crop], np.float32)
            if len(clip) < self.frames:
                clip = np.concatenate([clip, np.zeros((self.frames - len(clip), *clip.shape[1:]), np.float32)])
            clip = clip.transpose(1, 0, 2, 3)                                    # (C, F, crop, crop)
            if m == "rgb":
                clip = (clip / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
            elif m == "depth":
                clip = clip / 255.0
            sample[m] = torch.from_numpy(np.ascontiguousarray(clip))
        return sample, self.labels[i]


def nvgesture_datasets(prepared, seed, carve_val=0.2, modalities=None, frames=(64, 80), crop=224):
    """{"train", "val", "test"} NVGestureDatasets over the prepared clips.

    train / test are NVIDIA's lists; validation is ``carve_val`` of train (stratified by label,
    from ``seed``). ``modalities``: default every prepared one (rgb, depth, and flow when prepared).
    ``frames``: [train, eval] frames per clip (IGM: 64 random consecutive / all 80) or one number
    for both; ``crop``: the square crop (224), at most the prepared size.
    """
    prepared = Path(prepared)
    rows = read_prepared(prepared)
    has_flow = all((prepared / "flow" / f"{r['key']}.npy").exists() for r in rows)
    modalities = list(modalities or (MODALITIES if has_flow else ("rgb", "depth")))
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown:
        raise MieInputError(f"NVGesture has no modality {', '.join(unknown)}; it has {', '.join(MODALITIES)}")
    if "flow" in modalities and not has_flow:
        raise MieInputError(f"{prepared} holds no optical flow for every clip; put IGM's flow arrays in "
                            "RAW/Video_data/flow_data/{train,test}/ or run `mie prepare nvgesture ... flow=farneback`, "
                            "or train on rgb and depth (data.modalities: [rgb, depth])")
    missing = [r["key"] for r in rows if not all((prepared / m / f"{r['key']}.npy").exists() for m in modalities)]
    if missing:
        raise MieInputError(f"{len(missing)} listed clip(s) have no prepared {'/'.join(modalities)} files, first "
                            f"{missing[0]}; re-run `mie prepare nvgesture` on {prepared}")
    size = np.load(prepared / modalities[0] / f"{rows[0]['key']}.npy", mmap_mode="r").shape[-1]
    if isinstance(crop, bool) or not isinstance(crop, int) or not 1 <= crop <= size:
        raise MieInputError(f"crop must be an integer in 1…{size} (the prepared size), got {crop!r}")
    train_frames, eval_frames = _frame_counts(frames)
    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"]
    if not train or not test:
        raise MieInputError(f"{prepared} needs clips of both lists; it has {len(train)} train and {len(test)} test")
    keep, carved = carve_validation([int(r["label"]) for r in train], carve_val, seed)
    parts = {"train": [train[i] for i in keep], "val": [train[i] for i in carved], "test": test}
    return {s: NVGestureDataset(prepared, [r["key"] for r in part], [int(r["label"]) for r in part], modalities,
                                train_frames if s == "train" else eval_frames, crop, train=s == "train")
            for s, part in parts.items()}


BENCHMARK = DiskBenchmark(
    "nvgesture", "NVGesture: 1,532 clips, 25 hand gestures, RGB + depth (SoftKinetic) + optical flow",
    MODALITIES, prepare_nvgesture, nvgesture_datasets)
