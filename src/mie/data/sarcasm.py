"""Sarcasm (Cai, Cai, Wan, ACL 2019, "Multi-Modal Sarcasm Detection in Twitter with Hierarchical
Fusion Model"): tweets with an image, sarcastic or not; 2 classes; split 19,816 / 2,410 / 2,409
(train / valid / test). Modalities image and text.

Raw layout read by ``prepare_sarcasm`` (the release headacheboy/data-of-multimodal-sarcasm-detection)::

    ROOT/text/train.txt  ROOT/text/valid2.txt  ROOT/text/test2.txt
    ROOT/dataset_image/<id>.jpg                 (or ROOT/images/)

One Python list literal per line (read with ``ast.literal_eval``, never ``eval``)::

    train:        ['840006160660983809', '<user> thanks for showing up for our appointment today . ', 1]
    valid / test: ['915657464401580032', 'whew ... that extra <num> miles today … emoji_3231', 1, 1]

The third item is the label used (0 not sarcastic, 1 sarcastic); the fourth, in valid / test, is
a second annotation and is not read. The annotation-TSV form is read too: ``ROOT/{train,dev,test}.tsv``
(dev also val.tsv or valid.tsv, optional) with columns ``Label``, ``String``, ``ImageID``
(an id without suffix means ``<id>.jpg``).

Prepared layout and samples: ``image_text.py``. Without a validation file, ``carve_val`` of
train (stratified, from the run's seed) is the validation split.
"""
import ast
from pathlib import Path

from ..errors import MieInputError
from .disk import DiskBenchmark
from .image_text import Post, image_file_name, parse_label, post_datasets, prepare_posts, read_tsv

CLASSES = ("not sarcastic", "sarcastic")
LIST_FILES = {"train": "train.txt", "val": "valid2.txt", "test": "test2.txt"}
TSV_FILES = {"train": ("train.tsv",), "val": ("dev.tsv", "val.tsv", "valid.tsv"), "test": ("test.tsv",)}
IMAGE_FOLDERS = ("dataset_image", "images")


def read_list_file(path):
    """Posts of one of the release's text files, and {"FILE:LINE": why} for lines that cannot be read."""
    path = Path(path)
    posts, bad = [], {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path.name}:{n}"
            try:
                item = ast.literal_eval(line.strip())
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                bad[where] = "not a Python list literal like ['<id>', '<text>', <label>]"
                continue
            if not isinstance(item, (list, tuple)) or len(item) not in (3, 4) or not isinstance(item[1], str):
                bad[where] = "expected ['<id>', '<text>', <label>] or ['<id>', '<text>', <label>, <label 2>]"
                continue
            try:
                posts.append(Post(image_file_name(item[0]), item[1].strip(), parse_label(item[2], CLASSES)))
            except MieInputError as e:
                bad[where] = str(e)
    return posts, bad


def find_release(root):
    """{split: annotation path}, the reader for them, and the image folder of a release in ``root``."""
    root = Path(root)
    images = next((root / d for d in IMAGE_FOLDERS if (root / d).is_dir()), None)
    lists = {s: root / "text" / name for s, name in LIST_FILES.items() if (root / "text" / name).is_file()}
    tsvs = {}
    for split, names in TSV_FILES.items():
        found = [root / n for n in names if (root / n).is_file()]
        if found:
            tsvs[split] = found[0]
    for files, reader in ((lists, read_list_file), (tsvs, lambda p: read_tsv(p, CLASSES))):
        if "train" in files and "test" in files and images is not None:
            return files, reader, images
    raise MieInputError(f"{root} is not a Sarcasm release; expected text/train.txt, text/valid2.txt, "
                        f"text/test2.txt (or train.tsv, dev.tsv, test.tsv) and the folder {IMAGE_FOLDERS[0]}/ "
                        "(or images/)")


def prepare_sarcasm(root, out, workers=None, skip_bad=False, progress=None, size=224, max_tokens=128,
                    tokenizer=None):
    """Turn the release in ``root`` into ``out`` (layout in ``image_text.py``).

    Options as for Twitter2015: ``size`` (pixels), ``max_tokens``, ``tokenizer`` (folder or cached
    hub id; default the offline MiniLM's = bert-base-uncased's vocabulary). Unreadable lines,
    unknown labels and missing / unreadable images are an error naming the first ones, unless
    ``skip_bad`` (then listed in OUT/bad_files.txt).
    """
    files, reader, images = find_release(root)
    splits, bad = {}, {}
    for split, path in files.items():
        splits[split], bad_rows = reader(path)
        bad.update(bad_rows)
    return prepare_posts("sarcasm", splits, bad, images, out, CLASSES, workers=workers, skip_bad=skip_bad,
                         progress=progress, size=size, max_tokens=max_tokens, tokenizer=tokenizer)


def sarcasm_datasets(prepared, seed, carve_val=0.2, normalize="clip"):
    """{"train", "val", "test"} of prepared Sarcasm; ``normalize``: clip | imagenet pixel statistics."""
    return post_datasets(prepared, "sarcasm", CLASSES, seed, carve_val, normalize)


BENCHMARK = DiskBenchmark(
    "sarcasm", "Sarcasm (Cai et al. 2019): 24,635 tweets, sarcastic or not, image (S×S RGB) + text (tokens)",
    ("image", "text"), prepare_sarcasm, sarcasm_datasets)
