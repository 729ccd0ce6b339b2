"""Deployment: every module sparsify() produces (SparseLinear, SparseConv1d/2d, FusedSequential,
SparseEmbedding), alone and inside class-style models (a LeNet-5, a small ResNet with BatchNorm and
residual adds, convolutions forced to CSR), exports through torch.export (strict and non-strict)
with a dynamic batch dimension, and the saved program run in a fresh process after
``import sparsevd`` gives the in-process output."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import run_python
from torch import nn

import sparsevd

#: Every layer CSR, whatever its size: the cost of a dense layer is infinite.
CSR = sparsevd.CostModel(cpu=dataclasses.replace(sparsevd.CostModel().cpu, dense_overhead_s=math.inf),
                         cuda=dataclasses.replace(sparsevd.CostModel().cuda, dense_overhead_s=math.inf))
BATCHES = (1, 6)  # exported with a batch of 3, run at others
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _prune(model, seed):
    """log σ² of every SparseVD layer drawn so that about half of its weights are pruned."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, sparsevd.SparseVDModule):
                m.log_sigma2.copy_(torch.randn(m.log_sigma2.shape, generator=g) * 6 - 4)
    return model.eval()


def _fill_batchnorms(model, seed):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


class LeNet5(nn.Module):
    """LeNet-5 written as a class, as most people write it (16×16 inputs, to stay small)."""

    def __init__(self):
        super().__init__()
        self.conv1 = sparsevd.SparseVDConv2d(1, 6, 5)
        self.conv2 = sparsevd.SparseVDConv2d(6, 16, 3)
        self.fc1 = sparsevd.SparseVDLinear(16 * 2 * 2, 30)
        self.fc2 = sparsevd.SparseVDLinear(30, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = sparsevd.SparseVDConv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = sparsevd.SparseVDConv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            sparsevd.SparseVDConv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(sparsevd.SparseVDConv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = Block(8, 8, 1)
        self.layer2 = Block(8, 16, 2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), sparsevd.SparseVDLinear(16, 10))

    def forward(self, x):
        return self.head(self.layer2(self.layer1(self.stem(x))))


def _sparse_linear(in_features=12, out_features=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g) * (torch.rand(out_features, in_features, generator=g) < 0.3)
    return sparsevd.SparseLinear.from_dense(w, torch.randn(out_features, generator=g))


def _sparsified_mlp():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), sparsevd.SparseVDLinear(48, 20), nn.ReLU(), sparsevd.SparseVDLinear(20, 16),
                          nn.GELU(), sparsevd.SparseVDLinear(16, 5))
    return sparsevd.sparsify(_prune(model, 1), cost_model=CSR)


def _sparsified_cnn():
    """A Sequential CNN: its convolutions run as themselves, its linear layers as one chain."""
    torch.manual_seed(2)
    model = nn.Sequential(sparsevd.SparseVDConv1d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool1d(2), nn.Flatten(),
                          sparsevd.SparseVDLinear(6 * 8, 10), nn.Tanh(), sparsevd.SparseVDLinear(10, 4))
    return sparsevd.sparsify(_prune(model, 2), cost_model=CSR, input_shape=(3, 16))


def _sparse_embedding():
    torch.manual_seed(3)
    layer = sparsevd.SparseVDEmbedding(20, 6)
    with torch.no_grad():
        layer.log_sigma2.copy_(torch.randn_like(layer.log_sigma2) * 6 - 2)
    return sparsevd.SparseEmbedding.from_sparsevd(layer.eval())


def _lenet5():
    torch.manual_seed(4)
    return sparsevd.sparsify(_prune(LeNet5(), 4), cost_model=CSR, input_shape=(1, 16, 16))


def _resnet():
    torch.manual_seed(5)
    return sparsevd.sparsify(_fill_batchnorms(_prune(ResNet(), 5), 5), cost_model=CSR, input_shape=(1, 12, 12))


#: name -> (the module, one example without the batch dimension, the layer types it must hold)
CASES = {
    "SparseLinear": (lambda: _sparse_linear(), lambda b: torch.randn(b, 12), [sparsevd.SparseLinear]),
    "SparseLinear-3d": (lambda: _sparse_linear(), lambda b: torch.randn(b, 4, 12), [sparsevd.SparseLinear]),
    "SparseConv2d": (lambda: sparsevd.SparseConv2d.from_dense(_masked(nn.Conv2d(3, 5, 3, padding=1, groups=1), 6)),
                     lambda b: torch.randn(b, 3, 7, 9), [sparsevd.SparseConv2d]),
    "SparseConv1d": (lambda: sparsevd.SparseConv1d.from_dense(_masked(nn.Conv1d(4, 6, 3, stride=2, groups=2), 7)),
                     lambda b: torch.randn(b, 4, 11), [sparsevd.SparseConv1d]),
    "SparseEmbedding": (_sparse_embedding, lambda b: torch.randint(0, 20, (b, 5)), [sparsevd.SparseEmbedding]),
    "FusedSequential-mlp": (_sparsified_mlp, lambda b: torch.randn(b, 3, 4, 4),
                            [sparsevd.FusedSequential, sparsevd.SparseLinear]),
    "FusedSequential-cnn": (_sparsified_cnn, lambda b: torch.randn(b, 3, 16),
                            [sparsevd.FusedSequential, sparsevd.SparseConv1d, sparsevd.SparseLinear]),
    "LeNet5": (_lenet5, lambda b: torch.randn(b, 1, 16, 16), [sparsevd.SparseConv2d, sparsevd.SparseLinear]),
    # its BatchNorms folded into the convolutions by sparsify's graph path
    "ResNet": (_resnet, lambda b: torch.randn(b, 1, 12, 12), [sparsevd.SparseConv2d, torch.fx.GraphModule]),
}


def _masked(conv, seed):
    torch.manual_seed(seed)
    conv.reset_parameters()
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) < 0.4)
    return conv


def _export(module, x, strict):
    batch = torch.export.Dim("batch", min=1, max=1024)
    return torch.export.export(module, (x,), dynamic_shapes=({0: batch},), strict=strict)


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    """Each case exported (strict and not) and saved, with inputs at BATCHES and the eager
    module's outputs for them: [(name, strict, module, program, path, inputs, outputs)]."""
    root = tmp_path_factory.mktemp("export")
    out = []
    for name, (build, example, types) in CASES.items():
        module = build()
        present = {type(m) for m in module.modules()}
        assert all(any(issubclass(p, t) for p in present) for t in types), (name, present)
        torch.manual_seed(0)
        inputs = [example(b) for b in BATCHES]
        with torch.no_grad():  # eager calls first: a FusedSequential then holds bound chains, which tracing must skip
            outputs = [module(x) for x in inputs]
        for strict in (False, True):
            program = _export(module, example(3), strict)
            path = root / f"{name}-{'strict' if strict else 'nonstrict'}.pt2"
            torch.export.save(program, path)
            out.append((name, strict, module, program, path, inputs, outputs))
    return out


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
@pytest.mark.parametrize("name", list(CASES))
def test_the_exported_program_matches_the_module(programs, name, strict):
    (_, _, _, program, _, inputs, outputs), = [p for p in programs if p[:2] == (name, strict)]
    run = program.module()
    for x, want in zip(inputs, outputs):
        torch.testing.assert_close(run(x), want, **TOL)


def test_the_saved_programs_run_in_a_fresh_process(programs, tmp_path):
    """One subprocess loads every saved program and compares it to the in-process output."""
    cases = []
    for name, strict, _, _, path, inputs, outputs in programs:
        data = tmp_path / f"{path.stem}.data.pt"
        torch.save({"inputs": inputs, "outputs": outputs}, data)
        cases.append((str(path), str(data)))
    out = run_python(f"""
import torch, sparsevd
for path, data in {cases!r}:
    run, data = torch.export.load(path).module(), torch.load(data)
    for x, want in zip(data["inputs"], data["outputs"]):
        torch.testing.assert_close(run(x), want, rtol=1e-5, atol=1e-5)
    print("ok", path)
""")
    assert out.count("ok ") == len(programs), out


def test_no_data_pointer_is_read_under_tracing():
    """The structure check of SparseLinear (data pointers, version counters) is not in the
    graph: the program holds the kernel call and nothing else of the layer."""
    program = _export(_sparse_linear(), torch.randn(3, 12), strict=False)
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets == ["sparsevd.csr_linear.default"], targets


def test_an_edit_after_export_is_still_checked_in_eager():
    """Skipping the check under tracing does not skip it in eager calls."""
    layer = _sparse_linear()
    _export(layer, torch.randn(3, 12), strict=True)
    with torch.no_grad():
        layer.col_indices[0] = 10_000
    with pytest.raises(ValueError, match="col"):
        layer(torch.randn(2, 12))
