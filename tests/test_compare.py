"""sparsevd-compare: finished runs grouped, their seeds averaged, SparseVD set against
magnitude pruning at matching compression, one table and one plot."""

import json
import math
import os

import pytest

from sparsevd.experiments import compare

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(root, name, method, test_error, compression, seed=0, network="LeNet-300-100", **extra):
    """A run directory holding the summary.json fields the comparison reads."""
    summary = {"network": network, "model": "lenet300", "method": method, "dataset": "Fashion-MNIST",
               "sizes": {"train": 54000, "val": 6000, "test": 10000},
               "test_error": test_error, "compression": compression, "seed": seed, "epochs": 30 if method == "dense"
               else 60, "recipe": {"init_from": None if method == "dense" else "runs/dense"}, "threshold": None,
               "threshold_chosen": False, "sbp_threshold": None, "target_compression": None,
               "finetune": None if method == "dense" else {"epochs": 15}, "command": "python -m sparsevd.train"}
    if method == "sparsevd":
        summary.update(threshold=1.0, threshold_chosen=True)
    summary.update(extra)
    path = root / name
    path.mkdir()
    (path / "summary.json").write_text(json.dumps(summary))
    return str(path)


@pytest.fixture
def runs(tmp_path):
    r = []
    for seed, (dense, svd, svd_c, mag30, mag100) in enumerate([(10.0, 10.4, 40.0, 11.0, 13.0),
                                                                 (10.2, 10.6, 44.0, 11.2, 14.0),
                                                                 (9.8, 10.5, 36.0, 11.1, 13.5)]):
        r.append(_run(tmp_path, f"dense-{seed}", "dense", dense, 1.0, seed))
        r.append(_run(tmp_path, f"svd-{seed}", "sparsevd", svd, svd_c, seed))
        r.append(_run(tmp_path, f"mag30-{seed}", "magnitude", mag30, 40.0, seed,
                      pruning={"target_compression": 40, "scope": "global", "end_epoch": 40, "every": 100}))
        r.append(_run(tmp_path, f"mag100-{seed}", "magnitude", mag100, 100.0, seed,
                      pruning={"target_compression": 100, "scope": "global", "end_epoch": 40, "every": 100}))
    r.append(_run(tmp_path, "svd-100", "sparsevd", 11.6, 98.0, target_compression=100.0))
    r.append(_run(tmp_path, "l5-dense", "dense", 8.3, 1.0, network="LeNet-5-Caffe"))
    return r


def test_runs_are_grouped_and_their_seeds_averaged(runs, tmp_path):
    rows = compare.compare(runs, str(tmp_path / "out"))
    assert [(r["network"], r["method"], r["setting"], r["seeds"]) for r in rows] == [
        ("LeNet-300-100", "dense", "–", [0, 1, 2]),
        ("LeNet-300-100", "sparsevd", "auto", [0, 1, 2]),
        ("LeNet-300-100", "sparsevd", "target 100×", [0]),
        ("LeNet-300-100", "magnitude", "target 40× (global)", [0, 1, 2]),
        ("LeNet-300-100", "magnitude", "target 100× (global)", [0, 1, 2]),
        ("LeNet-5-Caffe", "dense", "–", [0]),
    ]
    svd = rows[1]
    assert svd["test_error"] == pytest.approx(10.5) and svd["test_error_sd"] == pytest.approx(0.1)
    assert svd["compression"] == pytest.approx((40 * 44 * 36) ** (1 / 3)) and svd["compression_range"] == [36, 44]
    assert (svd["start"], svd["epochs"]) == ("from dense", "60 + 15") and rows[0]["epochs"] == "30"
    pairs = [(a["setting"], b["setting"]) for a, b in compare.matches(rows)]
    assert pairs == [("auto", "target 40× (global)"), ("target 100×", "target 100× (global)")]

    text = (tmp_path / "out" / "comparison.md").read_text()
    assert "| LeNet-300-100 | Fashion-MNIST, 54,000 train | SparseVD | from dense | 60 + 15 | auto | 0, 1, 2 | " \
           "39.9 (36.0–44.0) | 10.50 ± 0.10 | +0.50 |" in text
    assert "| LeNet-300-100 | Fashion-MNIST, 54,000 train | 60 + 15 | SparseVD (auto, from dense) | " \
           "39.9 (36.0–44.0) | 10.50 ± 0.10 | 40.0 (40.0–40.0) | 11.10 ± 0.10 | +0.60 |" in text
    assert "| 98.0 | 11.60 | 100.0 (100.0–100.0) | 13.50 ± 0.50 | +1.90 |" in text
    with open(tmp_path / "out" / "comparison.png", "rb") as f:
        assert f.read(8) == PNG_MAGIC
    assert json.loads((tmp_path / "out" / "comparison.json").read_text())[1]["runs"] == [
        os.path.normpath(p) for p in runs[1:12:4]]


def test_no_match_beyond_the_factor_and_old_summaries_read_from_their_command(tmp_path):
    rows = compare.group([
        dict(json.load(open(os.path.join(_run(tmp_path, "a", "sparsevd", 10.0, 30.0), "summary.json"))), run="a"),
        dict(json.load(open(os.path.join(_run(tmp_path, "b", "magnitude", 12.0, 40.0,
                                              pruning={"target_compression": 40, "scope": "layer", "end_epoch": 4,
                                                       "every": 1}),
                                         "summary.json"))), run="b"),
        {"network": "LeNet-300-100", "dataset": "Fashion-MNIST", "method": "sparsevd", "test_error": 11.0,
         "compression": math.inf, "epochs": 200, "threshold": 3.0, "threshold_chosen": False, "run": "c",
         "command": "python -m sparsevd.train --seed 4 --threshold 3"},
    ])
    assert compare.matches(rows) == []  # 40× against 30×: more than 1.25× apart
    old = next(r for r in rows if r["runs"] == ["c"])
    assert old["seeds"] == [4] and old["setting"] == "log α < 3" and old["start"] == "from scratch"
    assert math.isinf(old["compression"])


def test_mistakes_are_one_line_errors(tmp_path, capsys, runs):
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "a-file").write_text("")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "summary.json").write_text("{not json")
    for argv, message in [([str(tmp_path / "unfinished"), "--out", str(tmp_path / "o")], "no summary.json"),
                          ([str(tmp_path / "broken"), "--out", str(tmp_path / "o")], "cannot read it"),
                          ([runs[0], "--out", str(tmp_path / "a-file")], "is a file"),
                          ([str(tmp_path / "a-file"), "--out", str(tmp_path / "o")], "is not a directory"),
                          ([runs[0]], "the following arguments are required: --out")]:
        with pytest.raises(SystemExit) as exit_info:
            compare.main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "Traceback" not in err
        assert err.splitlines()[-1].startswith("sparsevd-compare: error: ") and message in err.splitlines()[-1]
    assert not (tmp_path / "o").exists()
