"""NVGesture preparation and loading on a tiny raw copy in NVIDIA's layout (lists + avi made here)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mie.data.nvgesture import (CLASSES, farneback_flow, nvgesture_datasets, parse_line, prepare_nvgesture,
                                read_window)
from mie.data.synthetic.nvgesture import moving_noise, write_avi, write_nvgesture
from mie.errors import MieInputError

av = pytest.importorskip("av")

CONFIG = Path(__file__).parent.parent / "configs" / "nvgesture.yaml"
TRAIN, TEST = [1, 1, 2, 2, 3, 3, 1, 2, 3], [1, 2, 3]     # 1-based labels, as in the lists


def make_raw(root, flow_size=(20, 20), **kw):
    """Clips of 20 frames (24 × 32) listed with the window 2:14 (12 frames)."""
    return write_nvgesture(root, TRAIN, TEST, frames=20, size=(24, 32), window=(2, 14), flow_size=flow_size, **kw)


def test_list_line_as_released():
    line = ("path:./Video_data/class_01/subject3_r0 depth:sk_depth:146:226 color:sk_color:146:226 "
            "duo_left:duo_left:170:263 label:2\n")
    clip = parse_line(line, "train", 4)
    assert (clip.path, clip.color, clip.depth, clip.label) == ("class_01/subject3_r0", ("sk_color", 146, 226),
                                                               ("sk_depth", 146, 226), 1)
    assert clip.key == "train_0004" and len(CLASSES) == 25
    with pytest.raises(MieInputError, match="cannot read.*expected path:"):
        parse_line("path:./Video_data/class_01/subject3_r0 label:1", "train", 0)


def test_window_is_the_listed_frames(tmp_path):
    frames = np.stack([np.full((24, 32, 3), 10 * t, np.uint8) for t in range(20)])
    write_avi(tmp_path / "v.avi", frames)
    window = read_window(tmp_path / "v.avi", 2, 6, 16)
    assert window.shape == (4, 16, 16, 3)
    assert np.allclose(window.mean(axis=(1, 2, 3)), [20, 30, 40, 50], atol=2)
    assert len(read_window(tmp_path / "v.avi", 15, 95, 16)) == 5          # the video ends inside the window
    with pytest.raises(MieInputError, match="no frame in the listed window 30:40"):
        read_window(tmp_path / "v.avi", 30, 40, 16)


def test_prepare_shapes_labels_resume_and_bad_clips(tmp_path):
    root = make_raw(tmp_path / "raw", igm_names=True)
    out = tmp_path / "prepared"
    summary = prepare_nvgesture(root, out, workers=2, size=40, progress=False)
    assert (summary.done, summary.skipped, summary.bad) == (12, 0, {})
    rgb, depth, flow = (np.load(out / m / "train_0000.npy") for m in ("rgb", "depth", "flow"))
    assert rgb.shape == (12, 3, 40, 40) and rgb.dtype == np.uint8
    assert depth.shape == (12, 1, 40, 40) and depth.dtype == np.uint8
    assert flow.shape == (12, 2, 40, 40) and flow.dtype == np.float16
    raw_flow = np.load(root / "Video_data" / "flow_data" / "train" / "0.npy")          # (20, 20, 2, 12)
    assert np.allclose(flow.astype(np.float32).mean(axis=(2, 3)), 2 * raw_flow.mean(axis=(0, 1)).T, atol=0.02)
    again = prepare_nvgesture(root, out, workers=1, size=40, progress=False)
    assert (again.done, again.skipped) == (0, 12)

    bad_video = root / "Video_data" / "class_02" / "subject2_r0" / "sk_color.avi"
    bad_video.write_bytes(b"")                                              # zero-length video
    listing = root / "nvgesture_test_correct_v2.lst"
    listing.write_text(listing.read_text().replace("label:3", "label:26"))  # not one of the 25 classes
    (out / "rgb" / "train_0002.npy").unlink()
    with pytest.raises(MieInputError, match=r"2 bad clip\(s\), first: class_02/subject2_r0 \(train list line 3\)"
                                            r".*cannot decode.*--skip-bad"):
        prepare_nvgesture(root, out, workers=1, progress=False, size=40)
    summary = prepare_nvgesture(root, out, workers=1, skip_bad=True, progress=False, size=40)
    assert sorted(summary.bad) == ["class_02/subject2_r0 (train list line 3)", "class_03/subject2_r1 (test list line 3)"]
    assert "label 26 is not a class" in (out / "bad_files.txt").read_text()
    datasets = nvgesture_datasets(out, seed=0, carve_val=0.25, frames=8, crop=32)
    assert {s: len(d) for s, d in datasets.items()} == {"train": 6, "val": 2, "test": 2}


def test_samples_crops_frames_and_scaling(tmp_path):
    root = make_raw(tmp_path / "raw")
    out = tmp_path / "prepared"
    prepare_nvgesture(root, out, workers=1, size=40, progress=False)
    datasets = nvgesture_datasets(out, seed=0, carve_val=0.34, frames=[8, 16], crop=32)
    assert {s: len(d) for s, d in datasets.items()} == {"train": 6, "val": 3, "test": 3}
    assert sorted(datasets["val"].labels) == [0, 1, 2]                     # stratified
    torch.manual_seed(0)
    x, _ = datasets["train"][0]
    assert {m: tuple(v.shape) for m, v in x.items()} == {"rgb": (3, 8, 32, 32), "depth": (1, 8, 32, 32),
                                                        "flow": (2, 8, 32, 32)}
    x, label = datasets["test"][1]
    assert label == 1 and x["rgb"].shape == (3, 16, 32, 32)
    depth = np.load(out / "depth" / "test_0001.npy")                       # (12, 1, 40, 40)
    assert torch.allclose(x["depth"][:, :12], torch.from_numpy(depth[:, :, 4:36, 4:36] / 255.0).float().transpose(0, 1))
    assert not x["depth"][:, 12:].any() and 0 <= x["depth"].min() and x["depth"].max() <= 1   # zero-padded to 16
    flow = np.load(out / "flow" / "test_0001.npy")
    assert torch.equal(x["flow"][:, :12], torch.from_numpy(flow[:, :, 4:36, 4:36].astype(np.float32)).transpose(0, 1))
    rgb = np.load(out / "rgb" / "test_0001.npy")[:, 0, 4:36, 4:36] / 255.0
    assert torch.allclose(x["rgb"][0, :12], torch.from_numpy((rgb - 0.485) / 0.229).float(), atol=1e-5)

    # a view of one modality draws its window from every modality's length: the one the full item draws
    train, key = datasets["train"], datasets["train"].keys[0]
    np.save(out / "depth" / f"{key}.npy", np.load(out / "depth" / f"{key}.npy")[:9])     # depth shorter than rgb
    torch.manual_seed(1)
    full, _ = train[0]
    torch.manual_seed(1)
    alone, _ = train.only(["depth"])[0]
    assert list(alone) == ["depth"] and torch.equal(alone["depth"], full["depth"])

    plain = tmp_path / "no_flow"
    prepare_nvgesture(root, plain, workers=1, size=40, flow="none", progress=False)
    assert set(nvgesture_datasets(plain, 0, frames=8, crop=32)["train"][0][0]) == {"rgb", "depth"}
    with pytest.raises(MieInputError, match="no optical flow.*flow=farneback"):
        nvgesture_datasets(plain, 0, modalities=["rgb", "flow"])
    with pytest.raises(MieInputError, match="crop must be an integer in 1…40"):
        nvgesture_datasets(out, 0, crop=224)


def test_farneback_flow_follows_motion():
    pytest.importorskip("cv2")
    flow = farneback_flow(moving_noise(4, (32, 32), seed=0))                # one pixel right per frame
    assert flow.shape == (4, 2, 32, 32) and flow.dtype == np.float16
    assert abs(float(flow[0, 0, 8:24, 8:24].mean()) - 1) < 0.2 and abs(float(flow[0, 1, 8:24, 8:24].mean())) < 0.2
    assert not flow[-1].any()


def test_missing_layout_is_refused(tmp_path):
    with pytest.raises(MieInputError, match="no Video_data folder"):
        prepare_nvgesture(tmp_path, tmp_path / "out")
    (tmp_path / "Video_data").mkdir()
    with pytest.raises(MieInputError, match="no NVGesture train list; expected nvgesture_train_correct_cvpr2016_v2"):
        prepare_nvgesture(tmp_path, tmp_path / "out")
    with pytest.raises(MieInputError, match="flow=precomputed needs"):
        prepare_nvgesture(tmp_path, tmp_path / "out", flow="precomputed")
    with pytest.raises(MieInputError, match="not a prepared NVGesture folder"):
        nvgesture_datasets(tmp_path, 0)


@pytest.mark.parametrize("method", ["mie", "joint"])
def test_prepare_then_train(tmp_path, capsys, method):
    from mie.cli import main
    root = make_raw(tmp_path / "raw")
    prepared = tmp_path / "prepared"
    assert main(["prepare", "nvgesture", "--root", str(root), "--out", str(prepared), "--workers", "1",
                 "size=40"]) == 0
    assert "nvgesture: 12 prepared, 0 already done" in capsys.readouterr().out
    out = tmp_path / method
    tiny = ["model.dim=16", "model.head_hidden=[8]", "train.batch_size=3", "train.num_workers=0", "model.pretrained=false",
            "model.encoders={rgb: i3d, depth: i3d, flow: i3d}", "data.options={frames: 8, crop: 32}"]
    if method == "mie":
        tiny.append("method.epochs_per_stage=1")
    code = main(["train", "--dataset", "nvgesture", "--config", str(CONFIG), "--root", str(prepared),
                 "--method", method, "--out", str(out), "--epochs", "1", *tiny])
    assert code == 0, capsys.readouterr().err
    checkpoint = torch.load(out / "checkpoints" / "best.pt", weights_only=False)
    spec = checkpoint["spec"]
    assert spec["input_shapes"] == {"rgb": (3, 8, 32, 32), "depth": (1, 8, 32, 32), "flow": (2, 8, 32, 32)}
    assert spec["num_classes"] == 25 and spec["encoders"] == {"rgb": "i3d", "depth": "i3d", "flow": "i3d"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["test"]["per_modality"]) == {"rgb", "depth", "flow"}
    assert metrics["split"]["sizes"] == {"train": 6, "val": 3, "test": 3}
