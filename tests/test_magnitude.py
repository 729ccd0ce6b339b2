"""Magnitude pruning, the baseline: its masks are torch.nn.utils.prune's, its schedule is
Zhu & Gupta's, and a run of it goes through the same sparsify() and results as SparseVD,
resumes exactly and compares with sparsevd-compare."""

import copy

import pytest
import torch
from torch.nn.utils import prune

import sparsevd
from sparsevd.experiments import checkpoints, cli, compare, loop, magnitude, models, plots, results

from test_train import _args, _idx_dir, _interrupt_after, _real_step


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_each_step_prunes_what_torch_nn_utils_prune_would(scope):
    """Along a schedule, the masks equal those of prune.global_unstructured (global) or
    prune.l1_unstructured per layer (layer) asked for the same further pruning, on the
    same weights, as they change in training."""
    torch.manual_seed(0)
    ours = magnitude.prepare(models.build("lenet5", "dense"))
    theirs = copy.deepcopy(models.build("lenet5", "dense"))
    theirs.load_state_dict({k.replace("_orig", ""): v for k, v in ours.state_dict().items() if "_mask" not in k})
    pruner = magnitude.Pruner(ours, 30, scope, 12, 3)
    pairs = [(m, t) for (_, m), (_, t) in zip(magnitude.layers(ours), magnitude.layers(theirs))]
    for step in range(13):
        if step and step % 4 == 0:  # the weights move between the pruning steps, as in training
            with torch.no_grad():
                for m, t in pairs:
                    noise = 0.01 * torch.randn_like(m.weight_orig)
                    m.weight_orig.add_(noise)
                    t.weight_orig.add_(noise)
            # torch's functions rank the masked weight of the last forward
            theirs(torch.rand(1, 1, 28, 28))
        if not pruner.due(step):
            continue
        before = [int(m.weight_mask.sum()) for m, _ in pairs]
        pruner.at(step)
        more = [b - int(m.weight_mask.sum()) for b, (m, _) in zip(before, pairs)]
        if scope == "global":
            prune.global_unstructured([(t, "weight") for _, t in pairs], pruning_method=prune.L1Unstructured,
                                      amount=sum(more))
        else:
            for (_, t), n in zip(pairs, more):
                prune.l1_unstructured(t, "weight", amount=n)
        for m, t in pairs:
            assert torch.equal(m.weight_mask, t.weight_mask), step
    kept, total = magnitude.kept(ours)
    if scope == "global":
        assert kept == total // 30
    else:
        assert [int(m.weight_mask.sum()) for m, _ in pairs] == [m.weight_mask.numel() // 30 for m, _ in pairs]


def test_the_schedule_is_zhu_and_gupta_cubic():
    assert magnitude.cubic(0, 0.9) == 0 and magnitude.cubic(1, 0.9) == pytest.approx(0.9)
    assert magnitude.cubic(0.5, 0.9) == pytest.approx(0.9 * (1 - 0.5 ** 3))
    model = magnitude.prepare(models.build("lenet300", "dense"))
    pruner = magnitude.Pruner(model, 10, "global", 100, 10)
    assert [s for s in range(120) if pruner.due(s)] == list(range(0, 101, 10))
    pruner.at(50)
    kept, total = magnitude.kept(model)
    assert kept == total - round(total * magnitude.cubic(0.5, 1 - (total // 10) / total))
    pruner.at(50)  # the same step again (a resumed run) prunes nothing more
    assert magnitude.kept(model) == (kept, total)
    one_shot = magnitude.prepare(models.build("lenet300", "dense"))
    magnitude.Pruner(one_shot, 10, "layer", 0, 10).at(0)
    assert magnitude.kept(one_shot)[0] == 235200 // 10 + 30000 // 10 + 1000 // 10


def test_the_pruned_network_becomes_sparsevd_layers_with_its_masks_fixed():
    torch.manual_seed(0)
    model = magnitude.prepare(models.build("lenet5", "dense"))
    magnitude.Pruner(model, 50, "global", 0, 1).at(0)
    model(torch.rand(2, 1, 28, 28))  # a forward, as training leaves it
    converted = magnitude.to_sparsevd(model)
    assert [type(m).__name__ for _, m in sparsevd.sparsevd_modules(converted)] == [
        "SparseVDConv2d", "SparseVDConv2d", "SparseVDLinear", "SparseVDLinear"]
    assert sparsevd.compression(converted) == magnitude.kept(model)
    x = torch.rand(6, 1, 28, 28)
    model.eval()
    torch.testing.assert_close(converted(x), model(x), rtol=0, atol=1e-6)
    fast = sparsevd.sparsify(converted, input_shape=(1, 28, 28))
    torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)
    assert any(isinstance(m, sparsevd.SparseLinear) for m in fast.modules())  # 50×: the fc layers go CSR
    assert "0.weight_orig" in dict(model.named_parameters())  # the training model is left as it was


def test_a_magnitude_run_prunes_on_schedule_fine_tunes_and_reports_like_sparsevd(tmp_path, monkeypatch):
    monkeypatch.setattr(plots, "weights", lambda *args: None)  # the slowest plot; drawn in test_train
    root = _idx_dir(tmp_path / "data", n_train=250, n_test=60)
    data = ["--data-dir", str(root), "--batch-size", "45"]
    dense = tmp_path / "dense"
    cli.run(_args(dense, *data, "--method", "dense", "--epochs", "1"))
    out = tmp_path / "magnitude"
    summary = cli.run(_args(out, *data, "--method", "magnitude", "--init-from", str(dense), "--epochs", "3",
                            "--target-compression", "20", "--prune-end", "2", "--prune-every", "2",
                            "--finetune-epochs", "1"))
    assert summary["kept"] == 266200 // 20 and summary["compression"] == pytest.approx(266200 / (266200 // 20))
    assert summary["pruning"] == {"target_compression": 20.0, "scope": "global", "end_epoch": 2.0, "every": 2}
    assert summary["threshold"] is None and summary["kl_weight"] is None and summary["uncertainty"] == []
    assert [t["batch"] for t in summary["timings"]] == [1, 64, 256]
    assert all(t["speedup"] > 0 for t in summary["timings"])
    history = torch.load(out / checkpoints.CHECKPOINT, weights_only=True)["history"]
    kept = [h["kept"] for h in history]
    # 5 steps per epoch, the schedule over the first 10: pruned at steps 2, 4, ..., 10
    assert kept[0] > kept[1] == kept[2] == kept[3] == 266200 // 20 and history[3]["phase"] == "finetune"
    end = torch.load(out / checkpoints.CHECKPOINT, weights_only=True)["model"]
    start = torch.load(out / checkpoints.BEFORE_FINETUNE, weights_only=True)["model"]
    for layer in ("1", "3", "5"):  # the fine-tuning trained the kept weights under the same mask
        assert torch.equal(end[f"{layer}.weight_mask"], start[f"{layer}.weight_mask"])
        kept = end[f"{layer}.weight_mask"].bool()
        assert not torch.equal(end[f"{layer}.weight_orig"][kept], start[f"{layer}.weight_orig"][kept])
    text, log = (out / "results.md").read_text(), (out / "train.log").read_text()
    assert "| LeNet-300-100 | magnitude pruning, fine-tuned 1 epoch |" in text and "largest magnitudes (global)" in text
    assert "magnitude pruning (global: the smallest |w| over all layers together) to 20× on Zhu & Gupta's" in text
    assert "sparsify()'d" in text and "No uncertainty summary: magnitude pruning" in text
    assert "compression   20.0× mask fixed at the largest |w| (global)" in log
    # sparsevd-compare reads the real summaries
    rows = compare.compare([str(dense), str(out)], str(tmp_path / "cmp"))
    assert [(r["method"], r["setting"], r["epochs"]) for r in rows] == [
        ("dense", "–", "1"), ("magnitude", "target 20× (global)", "3 + 1")]


def test_a_magnitude_run_resumes_like_an_uninterrupted_one(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "write_results", lambda *args, **kwargs: None)
    root = _idx_dir(tmp_path / "data", n_train=250)
    data = ["--data-dir", str(root), "--batch-size", "50"]
    cli.run(_args(tmp_path / "dense", *data, "--method", "dense", "--epochs", "1"))
    flags = [*data, "--method", "magnitude", "--init-from", str(tmp_path / "dense"), "--epochs", "3",
             "--target-compression", "10", "--prune-every", "3", "--prune-scope", "layer", "--finetune-epochs", "1"]
    cli.run(_args(tmp_path / "straight", *flags))
    _interrupt_after(monkeypatch, 5 + 2)  # 5 steps per epoch: dies in the second, mid-schedule
    with pytest.raises(KeyboardInterrupt):
        cli.run(_args(tmp_path / "broken", *flags))
    monkeypatch.setattr(loop, "step", _real_step)
    cli.run(_args(tmp_path / "broken", *flags, "--resume"))
    straight, resumed = (torch.load(tmp_path / run / checkpoints.CHECKPOINT, weights_only=True)
                         for run in ("straight", "broken"))
    assert resumed["epoch"] == 4
    for name, value in straight["model"].items():
        assert torch.equal(resumed["model"][name], value), name
    strip = lambda h: [{k: v for k, v in row.items() if "seconds" not in k} for row in h]  # noqa: E731
    assert strip(resumed["history"]) == strip(straight["history"])
    # the schedule is part of the run
    with pytest.raises(checkpoints.CheckpointError, match=r"\(target_compression: checkpoint 10.0, now 20.0"):
        cli.run(_args(tmp_path / "broken", *flags[:-6], "--target-compression", "20", "--prune-every", "3",
                      "--prune-scope", "layer", "--finetune-epochs", "1", "--resume"))
