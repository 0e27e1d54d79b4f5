"""`mie plot` and the plots at the end of train / compare: the drawn numbers are history.csv's and
results.csv's, stages are shaded over the epochs each modality trained, error bars are mean ± std."""
import csv
import json
import sys

import numpy as np
import pytest

from conftest import TINY
from mie import plots
from mie.io import csv_text, write_text
from mie.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def valid_png(path):
    import matplotlib.image
    assert path.read_bytes()[:8] == PNG
    height, width = matplotlib.image.imread(path).shape[:2]
    assert height > 100 and width > 100


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def floats(rows, key):
    return np.array([float(r[key]) if r[key] != "" else np.nan for r in rows])


def by_gid(ax):
    return {line.get_gid(): line for line in ax.get_lines()}


def x_range(patch):
    """(lowest x, highest x) of a span, in data coordinates."""
    x = patch.get_patch_transform().transform(patch.get_path().vertices)[:, 0]
    return x.min(), x.max()


def fake_run(folder, history, best_epoch, modalities=("a", "b")):
    """A run folder with the given history rows and metrics.json."""
    folder.mkdir(parents=True)
    write_text(folder / "history.csv", csv_text(history))
    (folder / "metrics.json").write_text(json.dumps({"method": "mie", "seed": 0, "data": "toy", "best_epoch": best_epoch,
                                                     "modalities": list(modalities), "select_on": "accuracy"}))
    return folder


def test_stage_spans_join_consecutive_epochs_of_one_modality():
    active = ["a", "a", "b", "a", "", "b", "b"]
    rows = [{"epoch": str(i + 1), "active": m} for i, m in enumerate(active)]
    assert plots.stage_spans(rows) == [("a", 1, 2), ("b", 3, 3), ("a", 4, 4), ("b", 6, 7)]
    assert plots.stage_spans([{"epoch": "1", "loss": "0.3"}]) == []


def test_train_draws_curves_of_the_history_with_stages_and_the_chosen_epoch(capsys, npz_file, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "train", "--data", npz_file, "--method", "mie", "--out", out,
                                "method.epochs_per_stage=2", *TINY)
    assert code == 0, err
    assert stdout.strip().splitlines()[-1] == f"plots: {out / 'curves.png'}"
    valid_png(out / "curves.png")
    history = read_csv(out / "history.csv")
    metrics = json.loads((out / "metrics.json").read_text())
    epochs = floats(history, "epoch")
    assert [r["active"] for r in history] == ["a", "a", "b", "b"]

    fig = plots.run_figure(out)
    acc_ax, loss_ax = fig.axes
    lines = by_gid(acc_ax)
    for key in ("val_accuracy", "val_acc_a", "val_acc_b"):
        np.testing.assert_array_equal(lines[key].get_xdata(), epochs)
        np.testing.assert_array_equal(lines[key].get_ydata(), floats(history, key))
    assert loss_ax.get_title() == "validation loss"
    for key in ("val_loss", "val_loss_a", "val_loss_b"):          # every epoch validates every modality
        line = by_gid(loss_ax)[key]
        np.testing.assert_array_equal(line.get_xdata(), epochs)
        np.testing.assert_array_equal(line.get_ydata(), floats(history, key))

    best = metrics["best_epoch"]
    for ax in (acc_ax, loss_ax):
        assert by_gid(ax)["best_epoch"].get_xdata()[0] == best
        for m in ("a", "b"):   # the shaded spans cover exactly the epochs in which m trained
            spans = [x_range(p) for p in ax.patches if p.get_gid() == f"stage:{m}"]
            covered = {int(e) for e in epochs if any(lo < e < hi for lo, hi in spans)}
            assert covered == {int(r["epoch"]) for r in history if r["active"] == m}
            assert sum(hi - lo for lo, hi in spans) == len(covered)
    star = lines["best_point"]
    assert star.get_xdata()[0] == best and star.get_ydata()[0] == float(history[best - 1]["val_accuracy"])
    plots.pyplot().close(fig)


def test_validation_losses_are_drawn_when_the_history_has_them(tmp_path):
    rng = np.random.default_rng(0)
    history = [{"epoch": e, "loss": rng.random(), "val_accuracy": rng.random(), "val_acc_a": rng.random(),
                "val_acc_b": rng.random(), "val_loss": rng.random(), "val_loss_a": rng.random(),
                "val_loss_b": rng.random()} for e in range(1, 6)]
    run = fake_run(tmp_path / "run", history, best_epoch=4)
    fig = plots.run_figure(run)
    acc_ax, loss_ax = fig.axes
    assert loss_ax.get_title() == "validation loss"
    lines = by_gid(loss_ax)
    assert {"val_loss", "val_loss_a", "val_loss_b"} <= set(lines) and "loss" not in lines
    for key in ("val_loss", "val_loss_a", "val_loss_b"):
        np.testing.assert_array_equal(lines[key].get_ydata(), [r[key] for r in history])
    assert not [p for p in acc_ax.patches if (p.get_gid() or "").startswith("stage:")]   # joint-like: no stages
    assert by_gid(acc_ax)["best_point"].get_ydata()[0] == history[3]["val_accuracy"]
    plots.pyplot().close(fig)


def test_comparison_bars_are_mean_and_std_over_seeds(capsys, tmp_path):
    rng = np.random.default_rng(1)
    rows = [{"method": m, "seed": s, "test_accuracy": rng.random(), "test_macro_f1": 0.5,
             "test_acc_a": rng.random(), "test_acc_b": rng.random() if m != "uni" else ""}
            for m in ("joint", "mie", "uni") for s in (0, 1, 2)]
    cmp = tmp_path / "cmp"
    cmp.mkdir()
    write_text(cmp / "results.csv", csv_text(rows))
    fake_run(cmp / "mie" / "seed_1", [{"epoch": 1, "active": "a", "val_accuracy": 0.5, "val_acc_a": 0.5}], 1)

    code, stdout, err = run_cli(capsys, "plot", cmp)
    assert code == 0, err
    assert stdout.strip() == f"plots: {cmp / 'results.png'} (numbers in results_plot.csv)"
    valid_png(cmp / "results.png")
    assert not (cmp / "mie" / "seed_1" / "curves.png").exists()      # a run's curves: `mie plot RUN`

    expected = {}
    for m in ("joint", "mie", "uni"):
        for label, key in (("fused", "test_accuracy"), ("a", "test_acc_a"), ("b", "test_acc_b")):
            values = [r[key] for r in rows if r["method"] == m and r[key] != ""]
            if values:
                expected[f"{m}:{label}"] = (np.mean(values), np.std(values, ddof=1), len(values))
    written = {f"{r['method']}:{r['accuracy']}": (float(r["mean"]), float(r["std"]), int(r["n"]))
               for r in read_csv(cmp / "results_plot.csv")}
    assert written.keys() == expected.keys() and "uni:b" not in written
    for k, (mean, std, n) in expected.items():
        assert written[k][2] == n and written[k][:2] == pytest.approx((mean, std), abs=1e-12)

    fig = plots.results_figure(plots.results_summary(plots.read_rows(cmp / "results.csv")))
    drawn = {}
    for bars in fig.axes[0].containers:
        if hasattr(bars, "errorbar"):
            segments = bars.errorbar.lines[2][0].get_segments()
            for patch, seg in zip(bars.patches, segments):
                drawn[patch.get_gid()] = (patch.get_height(), seg[0][1], seg[1][1])
    assert drawn.keys() == expected.keys()
    for k, (mean, std, _) in expected.items():
        assert drawn[k] == pytest.approx((mean, mean - std, mean + std), abs=1e-12)
    plots.pyplot().close(fig)


def test_compare_ends_with_its_plots(capsys, npz_file, tmp_path):
    out = tmp_path / "cmp"
    code, stdout, err = run_cli(capsys, "compare", "--data", npz_file, "--methods", "joint,mie", "--seeds", "0",
                                "--out", out, *TINY)
    assert code == 0, err
    assert stdout.strip().splitlines()[-1] == f"plots: {out / 'results.png'} (numbers in results_plot.csv)"
    valid_png(out / "results.png")
    results = read_csv(out / "results.csv")
    summary = {(r["method"], r["accuracy"]): float(r["mean"]) for r in read_csv(out / "results_plot.csv")}
    for r in results:
        assert summary[(r["method"], "fused")] == float(r["test_accuracy"])
        assert summary[(r["method"], "b")] == float(r["test_acc_b"])


@pytest.mark.parametrize("how", ["no module", "note"])
def test_without_matplotlib_train_notes_it_and_plot_fails_in_one_line(capsys, monkeypatch, npz_file, tmp_path, how):
    if how == "no module":
        monkeypatch.setitem(sys.modules, "matplotlib", None)      # `import matplotlib` raises ImportError
    else:
        monkeypatch.setattr(plots, "missing_extra", lambda: "no plot drawn: matplotlib is not installed (x)")
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "train", "--data", npz_file, "--method", "joint", "--out", out, *TINY)
    assert code == 0 and not (out / "curves.png").exists()
    note = [line for line in err.splitlines() if "matplotlib" in line]
    assert len(note) == 1 and note[0].startswith("mie: note: no plot drawn: matplotlib is not installed")
    if how == "no module":
        assert "pip install 'mie[plot]'" in note[0]
    code, _, err = run_cli(capsys, "plot", out)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "matplotlib is not installed" in lines[0]


def test_a_folder_that_is_neither_run_nor_comparison_is_one_line(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    damaged = fake_run(tmp_path / "damaged", [{"epoch": 1, "val_accuracy": 0.5}], 1)
    (damaged / "metrics.json").write_text("{not json")
    no_rows = tmp_path / "no_rows"
    no_rows.mkdir()
    (no_rows / "results.csv").write_text("method,seed,test_accuracy\n")
    cases = {tmp_path / "absent": "is not a folder", a_file: "is not a folder",
             empty: "holds neither a finished run (history.csv and metrics.json) nor a comparison (results.csv)",
             damaged: "is damaged or not a mie run's metrics", no_rows: "holds no rows"}
    for folder, message in cases.items():
        code, _, err = run_cli(capsys, "plot", folder)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("mie: error:") and message in lines[0], err
