"""`mie landscape`: filter-normalised 2-D loss surfaces, checked against losses computed by hand."""
import csv

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, make_arrays
from mie.cli import main
from mie.evaluate import evaluate_checkpoint, load_for_evaluation
from mie.landscape import CIRCLE, gaussian_directions, landscape_directions, loss_landscape, surface

SEED = 3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny MIE run on a 1-D CNN modality (Conv1d + BatchNorm) and a vector modality (MLP)."""
    tmp = tmp_path_factory.mktemp("landscape")
    x, y = make_arrays(n=90, shapes={"a": (2, 16), "b": (6,)})
    data = tmp / "toy.npz"
    np.savez(data, y=y, **{f"x_{m}": v for m, v in x.items()})
    assert main(["train", "--data", str(data), "--method", "mie", "--seed", "0", "--out", str(tmp / "run"),
                 *TINY]) == 0
    return tmp / "run" / "checkpoints" / "best.pt"


def hand_directions(model, seed):
    """Li et al.'s directions written out: Gaussian per parameter (d1 whole, then d2), each filter
    (slice along dim 0) rescaled to the weight filter's norm, 1-D parameters zero."""
    gen = torch.Generator().manual_seed(seed)
    weights = [p.detach().numpy().astype(np.float64) for p in model.parameters()]
    raw = [[torch.randn(w.shape, generator=gen).numpy().astype(np.float64) for w in weights] for _ in range(2)]
    out = []
    for direction in raw:
        normed = []
        for d, w in zip(direction, weights):
            if d.ndim <= 1:
                normed.append(np.zeros_like(d))
                continue
            dn = np.linalg.norm(d.reshape(len(d), -1), axis=1)
            wn = np.linalg.norm(w.reshape(len(w), -1), axis=1)
            normed.append(d * (wn / (dn + 1e-10)).reshape(-1, *[1] * (d.ndim - 1)))
        out.append(normed)
    return out


def hand_losses(model, data_loader):
    """(loss of a, loss of b, fused loss): mean cross-entropy of each head on its encoder's features,
    and −log of the average of the two softmaxes at the label, over every sample, in eval mode."""
    xs = {m: [] for m in model.modalities}
    ys = []
    for batch in data_loader:
        for m in model.modalities:
            xs[m].append(batch[0][m])
        ys.append(batch[1])
    y = torch.cat(ys)
    model.eval()
    with torch.no_grad():
        logits = {m: model.heads[m](model.encoders[m](torch.cat(v))) for m, v in xs.items()}
    per = [F.cross_entropy(z.double(), y).item() for z in logits.values()]
    probs = torch.stack([F.softmax(z.double(), dim=1) for z in logits.values()]).mean(dim=0)
    return per + [-probs[torch.arange(len(y)), y].log().mean().item()]


def test_directions_are_filter_normalised_and_the_same_for_one_architecture(checkpoint):
    method, _, _, _ = load_for_evaluation(checkpoint, split="train", device="cpu")
    model = method.model
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"Conv1d", "BatchNorm1d", "Linear"} <= kinds
    params = list(model.parameters())
    d1, d2 = landscape_directions(model, SEED)
    for p, u, v in zip(params, d1, d2):
        w = p.detach().numpy()
        for d in (u.numpy(), v.numpy()):
            assert d.shape == w.shape
            if w.ndim <= 1:                                  # biases, BatchNorm scales and shifts
                assert not d.any()
            else:                                            # rows of Linear, output channels of Conv1d
                np.testing.assert_allclose(np.linalg.norm(d.reshape(len(d), -1), axis=1),
                                           np.linalg.norm(w.reshape(len(w), -1), axis=1), rtol=1e-5)
    for got, want in zip((d1, d2), hand_directions(model, SEED)):
        for g, h in zip(got, want):
            np.testing.assert_allclose(g.numpy(), h, rtol=1e-5, atol=1e-7)
    assert not torch.equal(d1[0], d2[0])

    other, _, _, _ = load_for_evaluation(checkpoint, split="train", device="cpu")
    with torch.no_grad():                                    # another model of the same architecture
        for p in other.model.parameters():
            p.mul_(2.0).add_(1.0)
    raw_a, raw_b = gaussian_directions(model, SEED), gaussian_directions(other.model, SEED)
    assert all(torch.equal(x, y) for x, y in zip(raw_a[0] + raw_a[1], raw_b[0] + raw_b[1]))
    assert not all(torch.equal(x, y) for x, y in zip(raw_a[0], gaussian_directions(model, SEED + 1)[0]))


def test_landscape_at_the_origin_and_at_grid_points_matches_hand_built_models(checkpoint, tmp_path):
    result, text, _ = loss_landscape(checkpoint, split="train", grid="-1:1:5", seed=SEED, device="cpu",
                                     out_dir=tmp_path / "ls")
    assert result["names"] == ["a", "b", "fused"] and result["loss"].shape == (3, 5, 5)
    np.testing.assert_allclose(result["a"], [-1, -0.5, 0, 0.5, 1])

    direct = evaluate_checkpoint(checkpoint, split="train", device="cpu")      # mie eval's own numbers
    want = [direct["per_modality"]["a"]["loss"], direct["per_modality"]["b"]["loss"], direct["loss"]]
    np.testing.assert_allclose(result["origin_loss"], want, rtol=1e-6)
    np.testing.assert_allclose(result["loss"][:, 2, 2], want, rtol=1e-6)
    assert result["origin_accuracy"][-1] == direct["accuracy"]
    assert result["origin_accuracy"][0] == direct["per_modality"]["a"]["accuracy"]

    method, data_loader, _, ckpt = load_for_evaluation(checkpoint, split="train", device="cpu")
    assert ckpt["config"]["method"]["fusion"] == "average"
    model = method.model
    d1, d2 = hand_directions(model, SEED)
    names = [n for n, _ in model.named_parameters()]
    theta = {n: p.detach().numpy().astype(np.float64) for n, p in model.named_parameters()}
    for i, j in [(2, 2), (0, 4), (3, 1), (4, 4)]:
        a, b = result["a"][i], result["b"][j]
        state = {k: v.clone() for k, v in ckpt["model"].items()}
        for n, u, v in zip(names, d1, d2):
            state[n] = torch.from_numpy(theta[n] + a * u + b * v).float()
        model.load_state_dict(state)
        np.testing.assert_allclose(result["loss"][:, i, j], hand_losses(model, data_loader), rtol=2e-5)

    circle = result["circle"]
    np.testing.assert_allclose(np.hypot(circle[:, 0], circle[:, 1]), 0.5)
    assert circle.shape == (CIRCLE, 2)
    rows = list(csv.DictReader((tmp_path / "ls" / "landscape.csv").open()))
    assert [r["loss"] for r in rows] == ["a", "b", "fused"]
    for l, row in enumerate(rows):
        increase = result["circle_loss"][l] - result["origin_loss"][l]
        assert float(row["mean_increase"]) == pytest.approx(increase.mean(), rel=1e-9)
        assert float(row["max_increase"]) == pytest.approx(increase.max(), rel=1e-9)
    assert "train split" in text and "test split" not in text


def test_weights_and_buffers_are_bit_identical_afterwards_even_after_a_failure(checkpoint):
    method, data_loader, dev, ckpt = load_for_evaluation(checkpoint, split="train", device="cpu")
    model = method.model
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert any("running_mean" in k for k in before)
    surface(method, data_loader, dev, np.linspace(-1, 1, 3), seed=SEED)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
        assert torch.equal(v, ckpt["model"][k]), k

    calls = {"n": 0}
    logits = method.logits

    def failing(xs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("boom")
        return logits(xs)
    method.logits = failing
    with pytest.raises(RuntimeError):
        surface(method, data_loader, dev, np.linspace(-1, 1, 3), seed=SEED)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_cli_writes_the_picture_and_the_grid_and_refuses_bad_input(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["landscape", "--checkpoint", str(checkpoint), "--grid=-0.5:0.5:4", "--samples", "40",
            "--seed", "1", "--out", str(out), "--device", "cpu", "--split", "val"]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "| fused |" in stdout and "val split" in stdout
    assert (out / "landscape.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    grid = np.load(out / "landscape.npz")
    assert grid["loss"].shape == grid["accuracy"].shape == (3, 4, 4)
    val_size = evaluate_checkpoint(checkpoint, split="val", device="cpu")["n"]
    assert list(grid["names"]) == ["a", "b", "fused"] and int(grid["samples"]) == val_size < 40
    assert int(grid["direction_seed"]) == 1 and str(grid["split"]) == "val"
    assert (out / "landscape.md").read_text().startswith("Loss landscape of mie")
    assert not list(out.rglob("*.tmp"))

    again = tmp_path / "again"
    assert main(argv[:8] + ["--out", str(again), "--device", "cpu", "--split", "train"]) == 0
    first = np.load(again / "landscape.npz")
    assert int(first["samples"]) == 40
    assert main(argv[:8] + ["--out", str(tmp_path / "third"), "--device", "cpu", "--split", "train"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "third" / "landscape.npz")["loss"], first["loss"])
    assert main(argv[:8] + ["--out", str(tmp_path / "test"), "--split", "test"]) == 0
    assert "reads the test split" in capsys.readouterr().out

    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    bad = {"--grid=1:-1:5": "MIN < MAX", "--grid=abc": "MIN:MAX:NUM", "--grid=-1:1:1": "NUM",
           "--samples=0": "at least 1", "--radius=0": "positive", f"--out={a_file}": "is a file"}
    base = ["landscape", "--checkpoint", str(checkpoint), "--device", "cpu"]
    for arg, words in bad.items():
        assert main(base + [arg]) == 2, arg
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1 and err.startswith("mie: error:"), (arg, err)
    assert main(["landscape", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "no such file" in capsys.readouterr().err
