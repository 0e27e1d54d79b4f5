"""CREMA-D preparation on a tiny raw copy in the release's layout (wav + flv made here)."""
from pathlib import Path

import numpy as np
import pytest
import torch

from mie.data.cremad import EMOTIONS, actor_disjoint_split, parse_clip, prepare_cremad
from mie.data.video import read_frames
from mie.data.synthetic.cremad import write_cremad, write_flv
from mie.errors import MieInputError

av = pytest.importorskip("av")

CONFIGS = Path(__file__).parent.parent / "configs"

CLIPS = ["1001_DFA_ANG_XX", "1002_IEO_HAP_HI", "1003_TIE_NEU_XX"]


def make_raw(root, clips=CLIPS):
    return write_cremad(root, clips, seconds=2.5, fps=10, size=(24, 32))


def test_clip_names():
    clip = parse_clip("1001_DFA_ANG_XX.wav")
    assert (clip.actor, clip.sentence, clip.emotion, clip.level) == ("1001", "DFA", "ANG", "XX")
    assert clip.label == EMOTIONS.index("ANG") == 5
    with pytest.raises(MieInputError, match="emotion 'BOR'"):
        parse_clip("1001_DFA_BOR_XX")
    with pytest.raises(MieInputError, match="not a CREMA-D clip name"):
        parse_clip("hello.wav")


def test_actor_disjoint_split_shares_no_actor():
    clips = [parse_clip(f"{1001 + a}_DFA_{e}_XX") for a in range(20) for e in EMOTIONS]
    split = actor_disjoint_split(clips, seed=0)
    actors = {s: {n.split("_")[0] for n in names} for s, names in split.items()}
    assert not actors["train"] & actors["test"] and not actors["train"] & actors["val"]
    assert not actors["val"] & actors["test"]
    assert sum(len(v) for v in split.values()) == 120 and (len(actors["train"]), len(actors["test"])) == (14, 3)


def test_frames_one_per_second(tmp_path):
    write_flv(tmp_path / "v.flv", seconds=2.5, fps=10, size=(24, 32))
    frames = read_frames(tmp_path / "v.flv", size=(16, 20))
    assert frames.shape == (3, 3, 16, 20) and frames.dtype == np.uint8   # t = 0, 1, 2 s


def test_prepare_writes_shapes_resumes_and_reports_bad_clips(tmp_path):
    root = make_raw(tmp_path / "raw")
    out = tmp_path / "prepared"
    summary = prepare_cremad(root, out, workers=2, size=16, progress=False)
    assert (summary.done, summary.skipped, summary.bad) == (3, 0, {})
    for clip in CLIPS:
        assert np.load(out / "audio" / f"{clip}.npy").shape == (257, 188)
        assert np.load(out / "video" / f"{clip}.npy").shape == (3, 3, 16, 16)
    again = prepare_cremad(root, out, workers=1, size=16, progress=False)
    assert (again.done, again.skipped) == (0, 3)

    (root / "AudioWAV" / "1004_DFA_SAD_XX.wav").write_bytes(b"")          # zero-length audio
    (root / "VideoFlash" / "1004_DFA_SAD_XX.flv").write_bytes(b"")
    with pytest.raises(MieInputError, match="1 bad clip.*1004_DFA_SAD_XX.*--skip-bad"):
        prepare_cremad(root, out, workers=1, progress=False)
    summary = prepare_cremad(root, out, workers=1, skip_bad=True, progress=False)
    assert list(summary.bad) == ["1004_DFA_SAD_XX"] and summary.skipped == 3
    assert (out / "bad_files.txt").read_text().startswith("1004_DFA_SAD_XX\t")
    assert not (out / "audio" / "1004_DFA_SAD_XX.npy").exists()


def test_missing_layout_is_refused(tmp_path):
    with pytest.raises(MieInputError, match="no AudioWAV folder"):
        prepare_cremad(tmp_path, tmp_path / "out")


def test_prepare_command(tmp_path, capsys):
    from mie.cli import main
    root = make_raw(tmp_path / "raw", CLIPS[:2])
    assert main(["prepare", "cremad", "--root", str(root), "--workers", "1", "size=16"]) == 0
    assert "2 prepared, 0 already done" in capsys.readouterr().out
    assert np.load(root / "prepared" / "video" / f"{CLIPS[0]}.npy").shape == (3, 3, 16, 16)
    assert main(["prepare", "cremad", "--root", str(tmp_path / "nowhere")]) == 2
    assert "is not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["mie", "joint"])
def test_prepare_then_train(tmp_path, capsys, method):
    import json

    import torch

    from mie.cli import main
    clips = [f"{1001 + a}_DFA_{e}_XX" for a in range(10) for e in ("ANG", "NEU")]
    root = make_raw(tmp_path / "raw", clips)
    prepared = tmp_path / "prepared"
    assert main(["prepare", "cremad", "--root", str(root), "--out", str(prepared), "--workers", "2",
                 "size=16"]) == 0
    out = tmp_path / method
    stages = ["method.epochs_per_stage={audio: 1, video: 1}"] if method == "mie" else []
    code = main(["train", "--config", str(CONFIGS / "cremad.yaml"), "--root", str(prepared), "--method", method,
                 "--out", str(out), "--epochs", "1", "model.dim=16", "model.head_hidden=[8]", "train.batch_size=4",
                 "train.num_workers=2", "data.options.frames=3", *stages])
    assert code == 0, capsys.readouterr().err
    spec = torch.load(out / "checkpoints" / "best.pt", weights_only=False)["spec"]
    assert spec["input_shapes"] == {"audio": (1, 257, 188), "video": (3, 3, 16, 16)} and spec["num_classes"] == 6
    assert spec["encoders"] == {"audio": "resnet18", "video": "resnet18"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["test"]["per_modality"]) == {"audio", "video"}
    assert sum(metrics["split"]["sizes"].values()) == 20
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "checkpoints" / "best.pt")]) == 0    # read again from disk
    again = json.loads(capsys.readouterr().out)
    assert again["accuracy"] == metrics["test"]["accuracy"] and again["map"] == metrics["test"]["map"]


def test_train_without_root_is_refused(capsys):
    from mie.cli import main
    assert main(["train", "--dataset", "cremad", "--out", "/tmp/never"]) == 2
    assert "--root DIR" in capsys.readouterr().err


def _prepared_names(prepared, names):
    for sub in ("audio", "video"):
        (prepared / sub).mkdir(parents=True, exist_ok=True)
        for n in names:
            (prepared / sub / f"{n}.npy").touch()


def test_standard_lists_with_validation_carved_from_train(tmp_path):
    from mie.data.cremad import cremad_datasets
    train = [f"{1001 + a}_DFA_{e}_XX" for a in range(10) for e in EMOTIONS]
    test = [f"{1001 + a}_IEO_{e}_HI" for a in range(3) for e in EMOTIONS]
    _prepared_names(tmp_path / "p", train + test)
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train.csv").write_text("".join(f"{n},{n.split('_')[2]}\r\n" for n in train))   # OGM-GE's CRLF lines
    (lists / "test.csv").write_text("".join(f"{n},{n.split('_')[2]}\n" for n in test))
    parts = cremad_datasets(tmp_path / "p", seed=0, split="standard", lists=str(lists), carve_val=0.2)
    names = {s: [c.name for c in d.clips] for s, d in parts.items()}
    assert sorted(names["test"]) == sorted(test)
    assert sorted(names["train"] + names["val"]) == sorted(train) and not set(names["train"]) & set(names["val"])
    assert len(names["val"]) == 12 and {n.split("_")[2] for n in names["val"]} == set(EMOTIONS)   # 2 per class
    other = cremad_datasets(tmp_path / "p", seed=1, split="standard", lists=str(lists))
    assert sorted(c.name for c in other["val"].clips) != sorted(names["val"])               # seeded carve

    (lists / "test.csv").write_text("1001_DFA_ANG_XX,SAD\n")
    with pytest.raises(MieInputError, match="test.csv:1: label 'SAD' disagrees"):
        cremad_datasets(tmp_path / "p", seed=0, split="standard", lists=str(lists))
    (lists / "test.csv").write_text("1099_DFA_ANG_XX,ANG\n")
    with pytest.raises(MieInputError, match="1 listed clip.*not prepared.*1099_DFA_ANG_XX"):
        cremad_datasets(tmp_path / "p", seed=0, split="standard", lists=str(lists))
    with pytest.raises(MieInputError, match="needs data.options.lists"):
        cremad_datasets(tmp_path / "p", seed=0, split="standard")
    with pytest.raises(MieInputError, match="split 'random' is not one of"):
        cremad_datasets(tmp_path / "p", seed=0, split="random")


def test_unknown_options_are_one_line_errors(tmp_path, capsys):
    from mie.cli import main
    _prepared_names(tmp_path / "p", ["1001_DFA_ANG_XX"])
    assert main(["train", "--dataset", "cremad", "--root", str(tmp_path / "p"), "--out", str(tmp_path / "o"),
                 "data.options.frame=3"]) == 2
    assert "dataset 'cremad' has no option frame; its options are: split='actor', lists=None, frames=3" \
        in capsys.readouterr().err
    assert main(["prepare", "cremad", "--root", str(tmp_path), "colour=1"]) == 2
    assert "has no option colour; its options are: size=224" in capsys.readouterr().err
    assert main(["train", "--dataset", "mfeat", "--out", str(tmp_path / "o"), "data.options.split=standard"]) == 2
    assert "benchmarks on disk only" in capsys.readouterr().err


def test_compare_reads_the_benchmark_from_disk(tmp_path, capsys):
    from mie.cli import main
    clips = [f"{1001 + a}_DFA_{e}_XX" for a in range(8) for e in ("ANG", "NEU")]
    prepared = tmp_path / "prepared"
    prepare_cremad(make_raw(tmp_path / "raw", clips), prepared, workers=1, size=16, progress=False)
    assert main(["compare", "--config", str(CONFIGS / "cremad.yaml"), "--root", str(prepared), "--methods", "joint",
                 "--seeds", "0", "--out", str(tmp_path / "cmp"), "--epochs", "1", "model.dim=8",
                 "model.head_hidden=[8]", "train.batch_size=4", "train.num_workers=0", "train.lr=0.001"]) == 0
    assert "| joint |" in (tmp_path / "cmp" / "results.md").read_text()


def test_a_view_of_one_modality_reads_no_other_file(tmp_path):
    """``only(["audio"])`` reads the audio files alone: with the video folder gone, it still loads."""
    from mie.data.cremad import CremadDataset
    name = "1001_DFA_ANG_XX"
    for sub, array in (("audio", np.ones((257, 188), np.float32)), ("video", np.zeros((3, 3, 8, 8), np.float32))):
        (tmp_path / sub).mkdir()
        np.save(tmp_path / sub / f"{name}.npy", array)
    both = CremadDataset(tmp_path, [name])
    xs, label = both[0]
    assert sorted(xs) == ["audio", "video"]
    audio = both.only(["audio"])
    for f in (tmp_path / "video").iterdir():
        f.unlink()
    xs_audio, label_audio = audio[0]
    assert list(xs_audio) == ["audio"] and torch.equal(xs_audio["audio"], xs["audio"]) and label_audio == label
    assert both.modalities == ("audio", "video")
