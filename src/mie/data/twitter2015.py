"""Twitter2015 (Zhang et al., AAAI 2018; target-oriented release of Yu & Jiang, IJCAI 2019,
TomBERT): tweets with an image, the sentiment towards one target in each; 3 classes; split
3,179 / 1,122 / 1,037 (train / dev / test). Modalities image and text.

Raw layout read by ``prepare_twitter2015`` (TomBERT's ``absa_data/twitter2015`` beside the
image folder of the release)::

    ROOT/train.tsv  ROOT/dev.tsv  ROOT/test.tsv   (dev also as val.tsv or valid.tsv; optional)
    ROOT/twitter2015_images/<ImageID>              (or ROOT/images/)

TSV header and rows of the TomBERT release (tab-separated)::

    index  #1 Label  #2 ImageID    #3 String                               #3 String
    1      2         1860693.jpg   RT @ ltsChuckBass : $T$ is everything # MCM   Chuck Bass

The target (last field) is put back in place of ``$T$``: the text read is "RT @ ltsChuckBass :
Chuck Bass is everything # MCM". The converted TSVs of IGM's code (njustkmg/IJCAI25-IGM), with
columns ``Label``, ``String``, ``ImageID`` (the text already whole), are read as well. Labels
are 0 negative, 1 neutral, 2 positive (the names are accepted too). Tweets with several targets
repeat an image: each image is decoded once.

Prepared layout and samples: ``image_text.py``. Without a dev file, ``carve_val`` of train
(stratified, from the run's seed) is the validation split.
"""
from pathlib import Path

from ..errors import MieInputError
from .disk import DiskBenchmark
from .image_text import post_datasets, prepare_posts, read_tsv

CLASSES = ("negative", "neutral", "positive")
SPLIT_FILES = {"train": ("train.tsv",), "val": ("dev.tsv", "val.tsv", "valid.tsv"), "test": ("test.tsv",)}
IMAGE_FOLDERS = ("twitter2015_images", "images")


def find_release(root):
    """{split: TSV path} and the image folder of a Twitter2015 release in ``root``."""
    root = Path(root)
    files = {}
    for split, names in SPLIT_FILES.items():
        found = [root / n for n in names if (root / n).is_file()]
        if found:
            files[split] = found[0]
    images = next((root / d for d in IMAGE_FOLDERS if (root / d).is_dir()), None)
    if "train" not in files or "test" not in files or images is None:
        raise MieInputError(f"{root} is not a Twitter2015 release; expected train.tsv, test.tsv (dev.tsv optional) "
                            f"and the folder {IMAGE_FOLDERS[0]}/ (or images/)")
    return files, images


def prepare_twitter2015(root, out, workers=None, skip_bad=False, progress=None, size=224, max_tokens=128,
                        tokenizer=None):
    """Turn the release in ``root`` into ``out`` (layout in ``image_text.py``).

    ``size``: images resized to size × size; ``max_tokens``: texts padded / truncated to that many
    tokens by ``tokenizer`` (a folder or cached hub id; default the offline MiniLM's, which is
    bert-base-uncased's vocabulary). A row with an unknown label or a missing / unreadable image
    is an error naming the first ones, unless ``skip_bad`` (then listed in OUT/bad_files.txt).
    """
    files, images = find_release(root)
    splits, bad = {}, {}
    for split, path in files.items():
        splits[split], bad_rows = read_tsv(path, CLASSES)
        bad.update(bad_rows)
    return prepare_posts("twitter2015", splits, bad, images, out, CLASSES, workers=workers, skip_bad=skip_bad,
                         progress=progress, size=size, max_tokens=max_tokens, tokenizer=tokenizer)


def twitter2015_datasets(prepared, seed, carve_val=0.2, normalize="clip"):
    """{"train", "val", "test"} of prepared Twitter2015; ``normalize``: clip | imagenet pixel statistics."""
    return post_datasets(prepared, "twitter2015", CLASSES, seed, carve_val, normalize)


BENCHMARK = DiskBenchmark(
    "twitter2015", "Twitter2015: 5,338 tweets, 3 target sentiments, image (S×S RGB) + text (tokens)",
    ("image", "text"), prepare_twitter2015, twitter2015_datasets)
