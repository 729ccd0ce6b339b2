"""--model vit in the training command: the network, a dense run and a SparseVD run from it
(tiny data, one epoch each: a smoke run; the lead runs the real one), its results giving
the sparsity of attention, MLP, embedding and head apart, and what it refuses."""

import pytest
import torch

import sparsevd
from sparsevd.experiments import cli, models
from test_train import _args, _idx_dir


def test_vit_shapes_and_its_sparsevd_form_loads_a_dense_state_dict():
    torch.manual_seed(0)
    dense, bayesian = models.vit(False).eval(), models.vit(True).eval()
    x = torch.rand(3, 1, 28, 28)
    assert dense(x).shape == (3, 10)
    state = sparsevd.convert(dense, log_sigma2_init=-40.0).state_dict()
    bayesian.load_state_dict(state)
    torch.testing.assert_close(bayesian(x), dense(x), rtol=1e-5, atol=1e-5)
    parts = {models.part(name) for name, _ in sparsevd.sparsevd_modules(bayesian)}
    assert parts == {"attention", "MLP", "embedding", "head"}
    assert models.part("1.layers.0.self_attn.in_proj") == "attention" and models.part("4") == "head"
    fast = sparsevd.sparsify(bayesian, batch_size=1, input_shape=(1, 28, 28))
    torch.testing.assert_close(fast(x), bayesian(x), rtol=1e-5, atol=1e-5)


def test_vit_dense_then_sparsevd_from_it_writes_the_split_results(tmp_path):
    root = _idx_dir(tmp_path / "data", n_train=120, n_test=20)
    data = ["--data-dir", str(root), "--model", "vit", "--batch-size", "30", "--epochs", "1"]
    dense_out, out = tmp_path / "dense", tmp_path / "sparsevd"
    dense = cli.run(_args(dense_out, *data, "--method", "dense"))
    assert dense["network"] == models.NETWORK_NAMES["vit"] and dense["parts"] is None
    summary = cli.run(_args(out, *data, "--init-from", str(dense_out), "--init-log-sigma2", "-4",
                            "--finetune-epochs", "1", "--compare-dense", str(dense_out)))
    parts = summary["parts"]
    assert set(parts) == {"attention", "MLP", "embedding", "head"}
    assert sum(p["kept"] for p in parts.values()) == summary["kept"]
    assert sum(p["total"] for p in parts.values()) == summary["total"]
    assert parts["attention"]["total"] == 3 * 4 * 64 * 64 and parts["MLP"]["total"] == 3 * 2 * 64 * 128
    text = (out / "results.md").read_text()
    assert "Sparsity by part: embedding " in text and f"MLP {100 * parts['MLP']['sparsity']:.1f}% " in text
    assert f"({parts['attention']['kept']:,} of 49,152 kept)" in text
    assert [t["batch"] for t in summary["timings"]] == [1, 64, 256]


@pytest.mark.parametrize("method", ["sbp", "sparsevd+sbp", "magnitude"])
def test_vit_refuses_the_methods_set_up_for_sequential_networks(tmp_path, capsys, method):
    with pytest.raises(SystemExit):
        cli.run(_args(tmp_path / "run", "--model", "vit", "--method", method))
    assert "--model vit trains with --method dense or sparsevd" in capsys.readouterr().err
