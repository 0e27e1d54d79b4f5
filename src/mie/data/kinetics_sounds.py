"""Kinetics-Sounds (Arandjelović & Zisserman, ICCV 2017): the Kinetics-400 clips of 31 classes
whose action can be heard (playing instruments, singing, tapping, ...); modalities audio and video.
The MIE paper's split is about 15K / 1.9K / 1.9K clips of 10 s.

Raw layout read by ``prepare_kinetics_sounds`` (the list-file layout the field shares)::

    ROOT/train.csv | train.txt    one clip a line: ``id,label`` or ``id label``
    ROOT/val.csv   | val.txt      (optional: without it validation is carved from train)
    ROOT/test.csv  | test.txt
    ROOT/videos/<id>.mp4          the clip, with its audio track (.mkv, .webm, .avi also found)
    ROOT/audio/<id>.wav           (optional) the clip's audio; used instead of the video's track

A list line is ``id,label``, ``id label`` (whitespace: the label is the rest of the line, so class
names may hold spaces, as MLA's ``<clip>.mp4 <class name>`` lines), or OGM-GE's three fields
``id,10,class index`` (the middle field, the clip length, is ignored). A media extension on the id
is dropped. Labels are class names or class indices; the classes are the sorted labels of the
train list (numerically when all are integers). A val/test clip whose label is not among them is
a bad clip, as is one whose audio cannot be read or whose video is missing, empty or undecodable.

Prepared layout written to OUT (each file written atomically)::

    OUT/audio/<id>.npy    (1024, 128) float32   log-mel fbank, not normalised
    OUT/video/<id>.npy    (T, 3, H, W) uint8    one frame per second, resized to size × size
    OUT/splits.json       {"classes": [...], "train": [[id, class], ...], "val"?: ..., "test": ...}
    OUT/stats.json        {"mean", "std", "clips"}: the fbank's mean and std over the train list
    OUT/bad_files.txt     (with --skip-bad) the clips left out, and why

Audio, as OGM-GE (Peng et al., CVPR 2022; GeWu-Lab/OGM-GE_CVPR2022,
data/KineticSound/process_audio.py) prepares it: the track decoded and resampled to 16 kHz mono
16-bit PCM (FFmpeg's libswresample through PyAV, as their ``ffmpeg -ar 16000`` extraction; a
ROOT/audio wav at another rate is resampled polyphase), scaled to [−1, 1), its mean subtracted,
then Kaldi's fbank (``fbank.py``; ``torchaudio.compliance.kaldi.fbank`` with htk_compat=True,
use_energy=False, window_type='hanning', num_mel_bins=128, dither=0, frame_shift=10): 25 ms
frames every 10 ms, pre-emphasis 0.97, DC offset removed, 512-point FFT, power spectrum, 128 mel
filters over 20 Hz … 8 kHz, log with floor 1.19e-7; then zero-padded or cut to 1,024 frames
(10.24 s). At 16 kHz the 4th mel filter (index 3) covers no FFT bin, so that row is always
log(1.19e-7) = −15.94, in OGM-GE's features as here (Kaldi itself refuses 128 bins at 16 kHz).

Training reads OUT through ``kinetics_sounds_datasets``: audio (1, 1024, 128) normalised as
(x − mean) / std with the train statistics of stats.json (``norm: dataset``), or with a given
[mean, std]: OGM-GE's is [−4.503877, 10.282552] (they divide by 2 × 5.141276), MLA's
(Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation) [−5.081, 4.4849]. The
statistics include the zero padding, as those constants (AudioSet's recipe) do. Video: ``frames``
(3) frames evenly spaced over the clip's 1-fps frames, scaled to [0, 1] and normalised with the
ImageNet mean and std → (3, frames, H, W).
"""
import csv
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..errors import MieInputError
from ..io import write_json
from .audio import read_audio_track, read_wav, resample
from .disk import DiskBenchmark
from .fbank import kaldi_fbank
from .preparation import PrepareSummary, finish, run_jobs, save_npy
from .splits import carve_validation
from .torch_dataset import SelectedModalities
from .video import read_frames, spaced_frames

RATE = 16_000
FBANK = {"sample_rate": RATE, "num_mel_bins": 128, "frame_length": 25.0, "frame_shift": 10.0,
         "window_type": "hanning", "preemphasis": 0.97, "remove_dc_offset": True,
         "low_freq": 20.0, "high_freq": 0.0}
NUM_FRAMES = 1024
SPLITS = ("train", "val", "test")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi")
ID_SUFFIXES = VIDEO_SUFFIXES + (".wav", ".npy")


def parse_line(line):
    """One list line → (id, label), or None for a blank or ``#`` line; see the module docstring."""
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    if "," in line:
        fields = [f.strip() for f in next(csv.reader([line]))]
        if len(fields) == 3:
            fields = [fields[0], fields[2]]
    else:
        fields = line.split(None, 1)
    if len(fields) != 2 or not all(fields):
        raise ValueError("expected 'id,label', 'id label' or 'id,10,class index'")
    clip, label = fields
    if Path(clip).suffix.lower() in ID_SUFFIXES:
        clip = clip[: -len(Path(clip).suffix)]
    return clip, label


def read_list(path):
    """[(id, label), ...] of a list file; an id listed twice must carry the same label."""
    clips = {}
    with open(path, newline="") as f:
        for n, line in enumerate(f, start=1):
            try:
                item = parse_line(line)
            except ValueError as e:
                raise MieInputError(f"{path}:{n}: cannot read '{line.strip()}': {e}") from None
            if item is None or (n == 1 and item == ("id", "label")):
                continue
            clip, label = item
            if clips.setdefault(clip, label) != label:
                raise MieInputError(f"{path}:{n}: clip {clip} is listed with labels '{clips[clip]}' and '{label}'")
    if not clips:
        raise MieInputError(f"{path} lists no clips")
    return list(clips.items())


def find_lists(root):
    """{split: list path} of ROOT/{train,val,test}.{csv,txt}; train and test must be there."""
    lists = {}
    for split in SPLITS:
        found = [root / f"{split}{ext}" for ext in (".csv", ".txt") if (root / f"{split}{ext}").is_file()]
        if len(found) > 1:
            raise MieInputError(f"{root} holds both {found[0].name} and {found[1].name}; keep one {split} list")
        if found:
            lists[split] = found[0]
    missing = [s for s in ("train", "test") if s not in lists]
    if missing:
        raise MieInputError(f"{root} has no {' or '.join(f'{s}.csv/{s}.txt' for s in missing)}; expected list files "
                            "of 'id,label' lines beside a videos/ folder (layout: mie datasets, docs)")
    return lists


def class_list(labels):
    """The classes: sorted labels (numerically when every label is an integer)."""
    labels = set(labels)
    if all(label.isdigit() for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def clip_fbank(samples, num_frames=NUM_FRAMES):
    """The Kinetics-Sounds audio input: mono 16 kHz (N,) → (num_frames, 128) float32 log-mel."""
    samples = np.asarray(samples, np.float32)
    fbank = kaldi_fbank(samples - samples.mean(), **FBANK).numpy()
    if len(fbank) == 0:
        raise MieInputError(f"the audio is {len(samples)} samples long, shorter than one 25 ms frame")
    out = np.zeros((num_frames, fbank.shape[1]), np.float32)
    out[: min(num_frames, len(fbank))] = fbank[:num_frames]
    return out


def _prepare_one(job):
    """Write the audio and video arrays of one clip; returns (clip, 'done' | 'skipped' | error text)."""
    clip, video_path, wav_path, out, size = job
    targets = {"audio": out / "audio" / f"{clip}.npy", "video": out / "video" / f"{clip}.npy"}
    if all(p.exists() for p in targets.values()):
        return clip, "skipped"
    try:
        if not targets["audio"].exists():
            if wav_path is not None:
                samples, rate = read_wav(wav_path)
                samples = resample(samples, rate, RATE)
            else:
                samples = read_audio_track(video_path, RATE)
            save_npy(targets["audio"], clip_fbank(samples))
        if not targets["video"].exists():
            save_npy(targets["video"], read_frames(video_path, size))
    except MieInputError as e:
        return clip, str(e)
    return clip, "done"


def fbank_stats(out, clips, progress=None):
    """Mean and std of the prepared fbank arrays of ``clips`` (all 1024 × 128 values of each)."""
    total = squares = count = 0.0
    for clip in tqdm(clips, desc="fbank mean/std", disable=None if progress is None else not progress):
        x = np.load(out / "audio" / f"{clip}.npy").astype(np.float64)
        total, squares, count = total + x.sum(), squares + np.square(x).sum(), count + x.size
    mean = total / count
    return mean, float(np.sqrt(max(squares / count - mean ** 2, 0.0)))


def prepare_kinetics_sounds(root, out, workers=None, skip_bad=False, progress=None, size=224):
    """Turn the raw copy in ``root`` into ``out`` (layouts in the module docstring).

    ``size``: video frames are resized to size × size. Re-running skips clips whose files exist
    (splits.json and stats.json are written anew). A bad clip is an error naming the first bad
    clips, unless ``skip_bad``: then it is left out and listed in OUT/bad_files.txt.
    """
    root, out = Path(root), Path(out)
    lists = {split: read_list(path) for split, path in find_lists(root).items()}
    seen = {}
    for split, clips in lists.items():
        for clip, _ in clips:
            if clip in seen:
                raise MieInputError(f"clip {clip} is in both the {seen[clip]} and the {split} list; "
                                    "a clip belongs to one split")
            seen[clip] = split
    classes = class_list(label for _, label in lists["train"])
    summary, jobs = PrepareSummary(), []
    for split, clips in lists.items():
        for clip, label in clips:
            video = next((p for p in (root / "videos" / f"{clip}{s}" for s in VIDEO_SUFFIXES) if p.is_file()), None)
            wav = root / "audio" / f"{clip}.wav"
            if label not in classes:
                summary.bad[clip] = f"{split} label '{label}' is not a class of the train list"
            elif video is None:
                summary.bad[clip] = f"no video file videos/{clip}.mp4"
            else:
                jobs.append((clip, video, wav if wav.is_file() else None, out, (size, size)))
    run_jobs(_prepare_one, jobs, summary, workers, "Kinetics-Sounds", progress)
    finish(summary, out, skip_bad, "clip")
    kept = {split: [[clip, classes.index(label)] for clip, label in clips if clip not in summary.bad]
            for split, clips in lists.items()}
    if not kept["train"] or not kept["test"]:
        raise MieInputError(f"no {'train' if not kept['train'] else 'test'} clip could be prepared "
                            f"(see {out / 'bad_files.txt'})")
    mean, std = fbank_stats(out, [clip for clip, _ in kept["train"]], progress)
    write_json(out / "stats.json", {"mean": mean, "std": std, "clips": len(kept["train"])})
    write_json(out / "splits.json", {"classes": classes, **kept})
    return summary


class KineticsSoundsDataset(SelectedModalities, Dataset):
    """Prepared clips: item i is ({"audio": (1, 1024, 128), "video": (3, frames, H, W)}, label); only
    ``modalities``' files are read."""

    def __init__(self, prepared, clips, classes, mean, std, frames=3):
        self.prepared, self.clips, self.frames = Path(prepared), clips, frames
        self.classes, self.num_classes = list(classes), len(classes)
        self.mean, self.std = np.float32(mean), np.float32(std)
        self.modalities = ("audio", "video")

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, i):
        (clip, label), xs = self.clips[i], {}
        if "audio" in self.modalities:
            xs["audio"] = torch.from_numpy((np.load(self.prepared / "audio" / f"{clip}.npy")[None] - self.mean)
                                           / self.std)
        if "video" in self.modalities:
            xs["video"] = torch.from_numpy(spaced_frames(np.load(self.prepared / "video" / f"{clip}.npy"), self.frames))
        return xs, label


def audio_norm(norm, prepared):
    """(mean, std) from ``norm``: "dataset" (OUT/stats.json) or an explicit [mean, std]."""
    if norm == "dataset":
        stats = json.loads((prepared / "stats.json").read_text())
        return stats["mean"], stats["std"]
    if (isinstance(norm, (list, tuple)) and len(norm) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in norm) and norm[1] > 0):
        return float(norm[0]), float(norm[1])
    raise MieInputError(f"norm must be 'dataset' or [mean, std] with std > 0 (OGM-GE's: [-4.503877, 10.282552]); "
                        f"got {norm!r}")


def kinetics_sounds_datasets(prepared, seed, carve_val=0.2, frames=3, norm="dataset"):
    """{"train", "val", "test"} KineticsSoundsDatasets over the prepared clips.

    The lists' split; without a val list, ``carve_val`` of train (stratified by class, from
    ``seed``) is validation. ``frames`` video frames per clip; ``norm`` the audio normalisation.
    """
    prepared = Path(prepared)
    if not (prepared / "splits.json").is_file() or not (prepared / "stats.json").is_file():
        raise MieInputError(f"{prepared} is not a prepared Kinetics-Sounds folder (splits.json, stats.json); run "
                            "`mie prepare kinetics_sounds --root RAW --out DIR` first (with --skip-bad if it "
                            "reported bad clips) and pass DIR")
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise MieInputError(f"frames must be a positive integer, got {frames!r}")
    manifest = json.loads((prepared / "splits.json").read_text())
    parts = {split: [tuple(c) for c in manifest[split]] for split in SPLITS if split in manifest}
    if "val" not in parts:
        train = parts["train"]
        keep, carved = carve_validation([label for _, label in train], carve_val, seed)
        parts["train"], parts["val"] = [train[i] for i in keep], [train[i] for i in carved]
    empty = [split for split in SPLITS if not parts[split]]
    if empty:
        raise MieInputError(f"the {empty[0]} split of {prepared} is empty; every run needs train, validation and "
                            "test clips")
    mean, std = audio_norm(norm, prepared)
    return {split: KineticsSoundsDataset(prepared, parts[split], manifest["classes"], mean, std, frames)
            for split in SPLITS}


BENCHMARK = DiskBenchmark(
    "kinetics_sounds", "Kinetics-Sounds: 31 classes of audible actions, audio (1024×128 log-mel fbank) "
    "+ video (1 fps frames)", ("audio", "video"), prepare_kinetics_sounds, kinetics_sounds_datasets)
