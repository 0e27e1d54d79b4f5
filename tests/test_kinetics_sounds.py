"""Kinetics-Sounds preparation and training on a tiny raw copy in the list-file layout (mp4 made here)."""
import json

import numpy as np
import pytest
from scipy.io import wavfile

from mie.data.audio import read_audio_track
from mie.data.kinetics_sounds import clip_fbank, kinetics_sounds_datasets, parse_line, prepare_kinetics_sounds, read_list
from mie.data.synthetic.kinetics_sounds import write_kinetics_sounds, write_mp4
from mie.errors import MieInputError

av = pytest.importorskip("av")

CLASSES = ["playing bagpipes", "playing drums", "tapping pen"]


def splits(train=2, val=1, test=1):
    """{split: [(id, class)]}: ``n`` clips of each class per split, ids as in the Kinetics lists."""
    return {split: [(f"{split[:2]}{i}{c}-x_{i:06d}_{i + 10:06d}", name) for i in range(n)
                    for c, name in enumerate(CLASSES)]
            for split, n in (("train", train), ("val", val), ("test", test)) if n}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A raw copy with train/val/test lists (3/3/3 clips) and its prepared folder."""
    root = write_kinetics_sounds(tmp_path_factory.mktemp("raw"), splits(train=1), seconds=2.2, size=(24, 32))
    out = root.parent / "prepared"
    summary = prepare_kinetics_sounds(root, out, workers=1, size=16, progress=False)
    assert (summary.done, summary.skipped, summary.bad) == (9, 0, {})
    return root, out


def test_list_lines():
    assert parse_line("--4-0ihtnBU_000058_000068,10,4") == ("--4-0ihtnBU_000058_000068", "4")   # OGM-GE
    assert parse_line("abc_000001_000011.mp4 playing bagpipes\n") == ("abc_000001_000011", "playing bagpipes")
    assert parse_line("abc,tapping pen") == ("abc", "tapping pen")
    assert parse_line("abc\t12") == ("abc", "12")
    assert parse_line("  ") is None and parse_line("# comment") is None
    with pytest.raises(ValueError):
        parse_line("abc,1,2,3")


def test_list_errors_name_the_line(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("a,1\nb\n")
    with pytest.raises(MieInputError, match="train.csv:2: cannot read 'b'"):
        read_list(path)
    path.write_text("a,1\na,2\n")
    with pytest.raises(MieInputError, match="clip a is listed with labels '1' and '2'"):
        read_list(path)
    path.write_text("id,label\na,1\na,1\n")
    assert read_list(path) == [("a", "1")]


def test_audio_track_is_16khz_mono(tmp_path):
    write_mp4(tmp_path / "c.mp4", seconds=1.0, tone=1000.0, rate=44_100)
    x = read_audio_track(tmp_path / "c.mp4", 16_000)
    assert x.dtype == np.float32 and abs(len(x) - 16_000) < 2_048            # AAC adds up to a frame of padding
    spectrum = np.abs(np.fft.rfft(x[2_000:14_000]))
    assert abs(np.argmax(spectrum) * 16_000 / 12_000 - 1000.0) < 3            # the tone survives resampling
    write_mp4(tmp_path / "silent.mp4", seconds=1.0, audio=False)
    with pytest.raises(MieInputError, match="no audio track"):
        read_audio_track(tmp_path / "silent.mp4", 16_000)


def test_fbank_is_padded_or_cut_to_1024_frames():
    short = clip_fbank(np.random.default_rng(0).normal(0, 0.1, 16_000))      # 1 s: 98 frames
    assert short.shape == (1024, 128) and short.dtype == np.float32
    assert (short[98:] == 0).all() and (short[:98, 10] != 0).all()
    assert clip_fbank(np.random.default_rng(0).normal(0, 0.1, 12 * 16_000)).shape == (1024, 128)
    with pytest.raises(MieInputError, match="shorter than one 25 ms frame"):
        clip_fbank(np.zeros(100))


def test_prepared_layout_stats_and_resume(prepared):
    root, out = prepared
    manifest = json.loads((out / "splits.json").read_text())
    assert manifest["classes"] == CLASSES and [len(manifest[s]) for s in ("train", "val", "test")] == [3, 3, 3]
    clip, label = manifest["train"][0]
    assert np.load(out / "audio" / f"{clip}.npy").shape == (1024, 128)
    assert np.load(out / "video" / f"{clip}.npy").shape == (3, 3, 16, 16)     # 2.2 s at 1 fps: t = 0, 1, 2
    train = np.stack([np.load(out / "audio" / f"{c}.npy") for c, _ in manifest["train"]]).astype(np.float64)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["clips"] == 3 and np.isclose(stats["mean"], train.mean()) and np.isclose(stats["std"], train.std())
    again = prepare_kinetics_sounds(root, out, workers=1, size=16, progress=False)
    assert (again.done, again.skipped) == (0, 9)


def test_datasets_shapes_norm_and_carved_validation(prepared, tmp_path):
    root, out = prepared
    parts = kinetics_sounds_datasets(out, seed=0)
    assert [len(parts[s]) for s in ("train", "val", "test")] == [3, 3, 3]
    assert parts["train"].num_classes == 3 and parts["train"].classes == CLASSES
    x, y = parts["test"][0]
    assert x["audio"].shape == (1, 1024, 128) and x["video"].shape == (3, 3, 16, 16) and y == 0
    stats = json.loads((out / "stats.json").read_text())
    raw = np.load(out / "audio" / f"{parts['test'].clips[0][0]}.npy")
    assert np.allclose(x["audio"][0].numpy(), (raw - stats["mean"]) / stats["std"], atol=1e-5)
    ogm, _ = kinetics_sounds_datasets(out, seed=0, norm=[-4.503877, 10.282552])["test"][0]
    assert np.allclose(ogm["audio"][0].numpy(), (raw + 4.503877) / 10.282552, atol=1e-5)
    assert kinetics_sounds_datasets(out, seed=0, frames=2)["val"][0][0]["video"].shape == (3, 2, 16, 16)
    with pytest.raises(MieInputError, match="norm must be"):
        kinetics_sounds_datasets(out, seed=0, norm="imagenet")

    no_val = write_kinetics_sounds(tmp_path / "raw", splits(train=3, val=0, test=1), seconds=1.2, style="ogm")
    assert (no_val / "train.txt").read_text().splitlines()[1].endswith(",10,1")
    prepare_kinetics_sounds(no_val, tmp_path / "out", workers=1, size=8, progress=False)
    parts = kinetics_sounds_datasets(tmp_path / "out", seed=0, carve_val=0.34)
    assert [len(parts[s]) for s in ("train", "val", "test")] == [6, 3, 3]
    assert parts["train"].classes == ["0", "1", "2"]
    assert sorted(y for _, y in parts["val"].clips) == [0, 1, 2]              # stratified
    assert not {c for c, _ in parts["val"].clips} & {c for c, _ in parts["train"].clips}


def test_bad_clips_are_named_or_reported(tmp_path):
    root = write_kinetics_sounds(tmp_path / "raw", splits(train=1, val=0, test=1), seconds=1.2)
    out = tmp_path / "out"
    with open(root / "test.csv", "a") as f:
        f.write("empty_video,tapping pen\nno_video,tapping pen\nnew_class,singing\nbad_wav,playing drums\n")
    (root / "videos" / "empty_video.mp4").write_bytes(b"")
    write_mp4(root / "videos" / "bad_wav.mp4", seconds=1.2)
    (root / "audio").mkdir()
    (root / "audio" / "bad_wav.wav").write_bytes(b"RIFF....")
    with pytest.raises(MieInputError, match=r"4 bad clip\(s\), first: bad_wav, empty_video, new_class .*--skip-bad"):
        prepare_kinetics_sounds(root, out, workers=1, size=8, progress=False)
    assert not (out / "splits.json").exists()
    summary = prepare_kinetics_sounds(root, out, workers=1, skip_bad=True, size=8, progress=False)
    assert sorted(summary.bad) == ["bad_wav", "empty_video", "new_class", "no_video"]
    report = dict(line.split("\t") for line in (out / "bad_files.txt").read_text().splitlines())
    assert "not a class of the train list" in report["new_class"] and "no video file" in report["no_video"]
    assert "WAV" in report["bad_wav"] and "cannot decode" in report["empty_video"]
    assert len(json.loads((out / "splits.json").read_text())["test"]) == 3


def test_wav_beside_the_video_is_used(tmp_path):
    root = write_kinetics_sounds(tmp_path / "raw", {"train": [("a", "x")], "test": [("b", "x")]}, seconds=1.2)
    (root / "audio").mkdir()
    wavfile.write(root / "audio" / "a.wav", 8_000, np.zeros(8_000, np.int16))        # silence at 8 kHz
    prepare_kinetics_sounds(root, tmp_path / "out", workers=1, size=8, progress=False)
    fbank = np.load(tmp_path / "out" / "audio" / "a.npy")
    assert np.allclose(fbank[:98], np.log(np.finfo(np.float32).eps)) and (fbank[98:] == 0).all()


def test_layout_errors(tmp_path):
    with pytest.raises(MieInputError, match="no train.csv/train.txt or test.csv/test.txt"):
        prepare_kinetics_sounds(tmp_path, tmp_path / "out")
    (tmp_path / "train.csv").write_text("a,x\n")
    (tmp_path / "test.txt").write_text("a x\n")
    with pytest.raises(MieInputError, match="clip a is in both the train and the test list"):
        prepare_kinetics_sounds(tmp_path, tmp_path / "out")
    with pytest.raises(MieInputError, match="not a prepared Kinetics-Sounds folder"):
        kinetics_sounds_datasets(tmp_path, seed=0)


def test_prepare_command(prepared, tmp_path, capsys):
    from mie.cli import main
    root, _ = prepared
    out = tmp_path / "cli"
    assert main(["prepare", "kinetics_sounds", "--root", str(root), "--out", str(out), "--workers", "2",
                 "size=16"]) == 0
    assert "kinetics_sounds: 9 prepared, 0 already done" in capsys.readouterr().out
    assert main(["prepare", "kinetics_sounds", "--root", str(root), "--out", str(out), "--workers", "1",
                 "size=16"]) == 0
    assert "0 prepared, 9 already done" in capsys.readouterr().out
    assert main(["prepare", "kinetics_sounds", "--root", str(root), "frames=3"]) == 2
    assert "has no option frames" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["mie", "joint"])
def test_prepare_then_train(prepared, tmp_path, capsys, method):
    import torch

    from mie.cli import main
    _, out = prepared
    tiny = ["--epochs", "1", "model.dim=16", "model.head_hidden=[8]", "train.batch_size=3"]
    if method == "mie":
        tiny.append("method.epochs_per_stage=1")          # the config's {audio: 25, video: 50}
    run = tmp_path / method
    code = main(["train", "--config", "configs/kinetics_sounds.yaml", "--root", str(out), "--method", method,
                 "--out", str(run), *tiny])
    assert code == 0, capsys.readouterr().err
    spec = torch.load(run / "checkpoints" / "best.pt", weights_only=False)["spec"]
    assert spec["input_shapes"] == {"audio": (1, 1024, 128), "video": (3, 3, 16, 16)} and spec["num_classes"] == 3
    assert spec["encoders"] == {"audio": "resnet18", "video": "resnet18"}
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["test"]["per_modality"]) == {"audio", "video"} and "map" in metrics["test"]
    assert metrics["split"]["sizes"] == {"train": 3, "val": 3, "test": 3}
