"""`mie benchmark`: one generated report over the offline settings."""
from mie.cli import main


def test_benchmark_report_has_unimodal_rows_and_unsupported_methods(tmp_path, capsys):
    report = tmp_path / "results.md"
    code = main(["benchmark", "--seeds", "0", "--methods", "joint,unimodal,pmr", "--settings", "mfeat_all_views",
                 "--out", str(tmp_path / "runs"), "--report", str(report), "train.epochs=1", "model.dim=32"])
    assert code == 0, capsys.readouterr().err
    text = report.read_text()
    assert "## UCI Multiple Features, all six views" in text and "Machine:" in text and "mie benchmark" in text
    assert "| joint |" in text and "| unimodal (mor) |" in text and "acc fou" in text
    assert "- `pmr`: PMR is defined for exactly 2 modalities" in text and "| pmr |" not in text
    assert (tmp_path / "runs" / "results.csv").read_text().count("mfeat_all_views") == 7   # joint + 6 unimodal


def test_benchmark_refuses_unknown_names(tmp_path, capsys):
    assert main(["benchmark", "--settings", "imagenet", "--out", str(tmp_path)]) == 2
    assert "unknown setting or method imagenet" in capsys.readouterr().err
