"""CREMA-D (Cao et al., IEEE TAC 2014): 7,442 clips of 91 actors speaking 12 sentences with six
emotions; modalities audio and video.

Raw layout read by ``prepare_cremad`` (the release's own folder names)::

    ROOT/AudioWAV/1001_DFA_ANG_XX.wav      actor _ sentence _ emotion _ level
    ROOT/VideoFlash/1001_DFA_ANG_XX.flv

Prepared layout written to OUT (one file per clip and modality, each written atomically)::

    OUT/audio/<clip>.npy    (257, 188) float32   log-STFT of audio.py (OGM-GE's preprocessing)
    OUT/video/<clip>.npy    (T, 3, H, W) uint8   one frame per second, resized to H × W

Training reads OUT through ``cremad_datasets`` (``--dataset cremad --root OUT``). By default the
split is by actor: no actor appears in two of train / validation / test. The standard lists
(OGM-GE's ``train.csv`` / ``test.csv``, 6,698 / 744 clips, every actor in both) are used with
``data.options: {split: standard, lists: DIR}``; validation is then carved from their train.

Classes, in OGM-GE's order: NEU, HAP, SAD, FEA, DIS, ANG.
"""
import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import MieInputError
from .audio import cremad_spectrogram, read_wav
from .disk import DiskBenchmark
from .preparation import PrepareSummary, finish, run_jobs, save_npy
from .splits import carve_validation, stratified_split
from .torch_dataset import SelectedModalities
from .video import read_frames, spaced_frames

EMOTIONS = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")


@dataclass(frozen=True)
class Clip:
    name: str       # e.g. 1001_DFA_ANG_XX
    actor: str      # 1001
    sentence: str   # DFA
    emotion: str    # ANG
    level: str      # XX

    @property
    def label(self):
        return EMOTIONS.index(self.emotion)


def parse_clip(name):
    """'1001_DFA_ANG_XX' (with or without extension) → Clip; a clear error for any other name."""
    stem = Path(name).stem
    parts = stem.split("_")
    if len(parts) != 4 or not parts[0].isdigit():
        raise MieInputError(f"'{name}' is not a CREMA-D clip name (expected ACTOR_SENTENCE_EMOTION_LEVEL, "
                            "e.g. 1001_DFA_ANG_XX)")
    if parts[2] not in EMOTIONS:
        raise MieInputError(f"clip '{stem}' has emotion '{parts[2]}', not one of {', '.join(EMOTIONS)}")
    return Clip(stem, *parts)


def actor_disjoint_split(clips, seed, fractions=(0.7, 0.15, 0.15)):
    """{"train", "val", "test"} lists of clip names, with every actor in exactly one split.

    Actors (not clips) are shuffled with ``seed`` and cut in the given fractions; the standard
    CREMA-D lists share all 91 actors between train and test, this split shares none.
    """
    actors = np.array(sorted({c.actor for c in clips}))
    parts = stratified_split(np.zeros(len(actors), dtype=np.int64), list(fractions), seed)
    owner = {a: s for s, idx in zip(("train", "val", "test"), parts) for a in actors[idx]}
    return {s: [c.name for c in clips if owner[c.actor] == s] for s in ("train", "val", "test")}


def _prepare_one(job):
    """Write the audio and video arrays of one clip; returns (clip, 'done' | 'skipped' | error text)."""
    clip, root, out, size = job
    targets = {"audio": out / "audio" / f"{clip}.npy", "video": out / "video" / f"{clip}.npy"}
    if all(p.exists() for p in targets.values()):
        return clip, "skipped"
    try:
        if not targets["audio"].exists():
            samples, rate = read_wav(root / "AudioWAV" / f"{clip}.wav")
            save_npy(targets["audio"], cremad_spectrogram(samples, rate))
        if not targets["video"].exists():
            save_npy(targets["video"], read_frames(root / "VideoFlash" / f"{clip}.flv", size))
    except MieInputError as e:
        return clip, str(e)
    return clip, "done"


def prepare_cremad(root, out, workers=None, skip_bad=False, progress=None, size=224):
    """Turn the raw release in ``root`` into ``out`` (layout in the module docstring).

    ``size``: video frames are resized to size × size. Re-running skips clips whose files exist.
    A clip whose audio or video cannot be read, or whose name holds no known emotion, is an error
    naming the first bad clips, unless ``skip_bad``: then it is left out and listed in
    OUT/bad_files.txt. Returns a ``PrepareSummary``.
    """
    root, out = Path(root), Path(out)
    wav_dir = root / "AudioWAV"
    if not wav_dir.is_dir():
        raise MieInputError(f"{root} has no AudioWAV folder; expected the CREMA-D release layout "
                            "(AudioWAV/*.wav and VideoFlash/*.flv)")
    clips = sorted(p.stem for p in wav_dir.glob("*.wav"))
    if not clips:
        raise MieInputError(f"{wav_dir} holds no .wav files")
    summary = PrepareSummary()
    for name in clips:
        try:
            parse_clip(name)
        except MieInputError as e:
            summary.bad[name] = str(e)
    jobs = [(c, root, out, (size, size)) for c in clips if c not in summary.bad]
    run_jobs(_prepare_one, jobs, summary, workers, "CREMA-D", progress)
    return finish(summary, out, skip_bad, "clip")


class CremadDataset(SelectedModalities, Dataset):
    """Prepared CREMA-D clips: item i is ({"audio": (1, 257, 188), "video": (3, T, H, W)}, label).

    ``frames`` frames are taken evenly from the clip's 1-fps frames (the last one repeated when a
    clip is shorter); pixels are scaled to [0, 1] and normalised with the ImageNet mean and std.
    Only ``modalities``' files are read.
    """

    num_classes = len(EMOTIONS)
    classes = list(EMOTIONS)

    def __init__(self, prepared, clips, frames=3):
        self.prepared, self.clips, self.frames = Path(prepared), [parse_clip(c) for c in clips], frames
        self.modalities = ("audio", "video")

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, i):
        clip, xs = self.clips[i], {}
        if "audio" in self.modalities:
            xs["audio"] = torch.from_numpy(np.load(self.prepared / "audio" / f"{clip.name}.npy")[None])
        if "video" in self.modalities:
            xs["video"] = torch.from_numpy(spaced_frames(np.load(self.prepared / "video" / f"{clip.name}.npy"),
                                                         self.frames))
        return xs, clip.label


def read_list(path):
    """Clip names of a standard CREMA-D list (OGM-GE's train.csv / test.csv: ``clip,EMOTION`` lines).

    The emotion column, when present, must agree with the clip name."""
    path = Path(path)
    if not path.is_file():
        raise MieInputError(f"no such CREMA-D list: {path} (expected lines like 1001_DFA_ANG_XX,ANG)")
    names = []
    with open(path, newline="") as f:
        for n, row in enumerate(csv.reader(f), start=1):
            if not row or not row[0].strip():
                continue
            clip = parse_clip(row[0].strip())
            if len(row) > 1 and row[1].strip() and row[1].strip() != clip.emotion:
                raise MieInputError(f"{path}:{n}: label '{row[1].strip()}' disagrees with clip {clip.name}")
            names.append(clip.name)
    if not names:
        raise MieInputError(f"{path} lists no clips")
    return names


def standard_split(names, lists, seed, carve_val):
    """{"train", "val", "test"} from the standard lists (LISTS/train.csv, LISTS/test.csv), with
    ``carve_val`` of train (stratified by emotion, from ``seed``) as validation."""
    lists = Path(lists)
    train, test = read_list(lists / "train.csv"), read_list(lists / "test.csv")
    missing = sorted(set(train + test) - set(names))
    if missing:
        raise MieInputError(f"{len(missing)} listed clip(s) are not prepared, first: {', '.join(missing[:3])}; "
                            "run `mie prepare cremad` on the full release (or --skip-bad listed them as bad)")
    if set(train) & set(test):
        raise MieInputError(f"{lists}: train.csv and test.csv share clips, e.g. {sorted(set(train) & set(test))[0]}")
    labels = np.array([parse_clip(n).label for n in train])
    keep, carved = carve_validation(labels, carve_val, seed)
    return {"train": [train[i] for i in keep], "val": [train[i] for i in carved], "test": test}


def cremad_datasets(prepared, seed, carve_val=0.2, split="actor", lists=None, frames=3,
                    fractions=(0.7, 0.15, 0.15)):
    """{"train", "val", "test"} CremadDatasets over the prepared clips.

    split "actor" (default): actors shuffled with ``seed`` and cut in ``fractions``, no actor in two
    splits. split "standard": the 6,698 / 744 lists in folder ``lists`` (train.csv, test.csv), which
    share all 91 actors, with ``carve_val`` of train as validation.
    """
    prepared = Path(prepared)
    if not (prepared / "audio").is_dir() or not (prepared / "video").is_dir():
        raise MieInputError(f"{prepared} is not a prepared CREMA-D folder (audio/ and video/); "
                            "run `mie prepare cremad --root RAW --out DIR` first and pass DIR")
    names = sorted(p.stem for p in (prepared / "audio").glob("*.npy") if (prepared / "video" / p.name).exists())
    if not names:
        raise MieInputError(f"{prepared} holds no prepared clips")
    if split == "actor":
        if lists is not None:
            raise MieInputError("data.options.lists is read with split: standard only")
        parts = actor_disjoint_split([parse_clip(n) for n in names], seed, list(fractions))
    elif split == "standard":
        if lists is None:
            raise MieInputError("split: standard needs data.options.lists, the folder holding train.csv and test.csv")
        parts = standard_split(names, lists, seed, carve_val)
    else:
        raise MieInputError(f"CREMA-D split '{split}' is not one of: actor, standard")
    return {s: CremadDataset(prepared, parts[s], frames) for s in ("train", "val", "test")}


BENCHMARK = DiskBenchmark(
    "cremad", "CREMA-D: 7,442 clips, 6 emotions, audio (257×188 log-STFT) + video (1 fps frames)",
    ("audio", "video"), prepare_cremad, cremad_datasets)
