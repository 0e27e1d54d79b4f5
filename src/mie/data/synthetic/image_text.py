"""Synthetic Twitter2015 and Sarcasm releases in their exact layouts (TomBERT's TSVs with
``$T$`` targets; Cai et al.'s Python-list text files) with noise JPEGs, for tests and timing."""
from pathlib import Path

import numpy as np

WORDS = ("good day great match sad news again today love hate the a so very funny weather train late "
         "coffee music win lose team city rain sun").split()


def write_jpeg(path, size=(48, 64), seed=0):
    """A noise JPEG of ``size`` (height, width)."""
    from PIL import Image
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")


def _sentence(rng, n):
    return " ".join(rng.choice(WORDS, n))


def write_twitter2015(root, counts=None, classes=3, image_size=(48, 64), seed=0):
    """ROOT/{train,dev,test}.tsv (TomBERT header and rows) and ROOT/twitter2015_images/*.jpg.

    ``counts``: {split: rows} (default 12 / 4 / 4); every third row reuses the previous row's
    image with another target, as tweets with several targets do."""
    root = Path(root)
    images = root / "twitter2015_images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    image_id = 1860693
    for split, n in (counts or {"train": 12, "dev": 4, "test": 4}).items():
        lines = ["index\t#1 Label\t#2 ImageID\t#3 String\t#3 String"]
        for i in range(n):
            if i % 3 != 2:
                image_id += 1
                write_jpeg(images / f"{image_id}.jpg", image_size, seed=image_id)
            target = _sentence(rng, 2)
            text = f"RT @ user{i} : $T$ is {_sentence(rng, int(rng.integers(3, 12)))} # MCM"
            lines.append(f"{i + 1}\t{i % classes}\t{image_id}.jpg\t{text}\t{target}")
        (root / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def write_sarcasm(root, counts=None, image_size=(48, 64), seed=0):
    """ROOT/text/{train.txt, valid2.txt, test2.txt} (one list literal per line, valid / test with a
    second label) and ROOT/dataset_image/<id>.jpg. ``counts``: {split file: rows}, default 12 / 4 / 4."""
    root = Path(root)
    (root / "text").mkdir(parents=True, exist_ok=True)
    (root / "dataset_image").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tweet = 840006160660983809
    for name, n in (counts or {"train.txt": 12, "valid2.txt": 4, "test2.txt": 4}).items():
        lines = []
        for i in range(n):
            tweet += 1
            write_jpeg(root / "dataset_image" / f"{tweet}.jpg", image_size, seed=i)
            text = f"<user> {_sentence(rng, int(rng.integers(3, 12)))} <num> emoji_3231 'quoted' . "
            item = [str(tweet), text, i % 2] + ([i % 2] if name != "train.txt" else [])
            lines.append(repr(item))
        (root / "text" / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root
