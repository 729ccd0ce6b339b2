"""sparsify() on models that are not nn.Sequential: the torch.fx graph path."""

import copy
import dataclasses
import io
import math
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import sparsevd
from sparsevd.sparsify import CPU_COST


def _prune(model, seed=0, dead_rows=None, dead_cols=None):
    """A random, partly pruned posterior for each SparseVD layer; ``dead_rows``/``dead_cols``:
    {layer: units} pruned whole (its output units, its input units)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in sparsevd.sparsevd_modules(model):
            layer.log_sigma2.copy_(torch.randn(layer.weight.shape, generator=g) * 3 - 2)
            if layer.bias is not None:
                layer.bias.copy_(torch.randn(layer.bias.shape, generator=g))
        for layer, units in (dead_rows or {}).items():
            layer.log_sigma2[units] = 10
        for layer, units in (dead_cols or {}).items():
            layer.log_sigma2[:, units] = 10
    return model


def _randomize(model, seed=0, pruned=None):
    """Random SBP posteriors (``pruned``: {sbp: units} pruned for sure) and BatchNorm statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, sparsevd.SBPDropout):
                m.mu.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
                m.log_sigma.copy_(torch.rand(m.num_features, generator=g) * 2 - 4)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1, generator=g)
                m.running_var.uniform_(0.5, 2, generator=g)
                m.weight.uniform_(0.5, 2, generator=g)
                m.bias.uniform_(-1, 1, generator=g)
        for sbp, units in (pruned or {}).items():
            sbp.mu[units], sbp.log_sigma[units] = -15.0, 3.0
    return model


def _params(model):
    """Weights and biases of the layers (θ of a SparseVD layer; CSR: its stored values)."""
    total = 0
    for m in model.modules():
        if isinstance(m, sparsevd.SparseLinear):
            total += m.values.numel()
        elif isinstance(m, (sparsevd.SparseVDModule, nn.Linear, nn.Conv2d, nn.modules.batchnorm._BatchNorm)):
            total += m.weight.numel()
        else:
            continue
        total += m.bias.numel() if getattr(m, "bias", None) is not None else 0
    return total


def _units(model, types=(nn.Linear, nn.Conv2d)):
    """Output units of the dense layers and CSR layers of a sparsified model."""
    total = 0
    for m in model.modules():
        if isinstance(m, types):
            total += m.weight.shape[0]
        elif isinstance(m, sparsevd.SparseLinear):
            total += m.out_features
    return total


def _check(model, x, tol=1e-4, **kwargs):
    model.eval()
    fast = sparsevd.sparsify(model, **kwargs)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(fast(x), expected, rtol=tol, atol=tol)
    assert not any(isinstance(m, (sparsevd.SparseVDModule, sparsevd.SBPDropout)) for m in fast.modules())
    assert not any(p.requires_grad for p in fast.parameters())
    return fast


class LeNet300100(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = sparsevd.SparseVDLinear(784, 300)
        self.fc2 = sparsevd.SparseVDLinear(300, 100)
        self.fc3 = sparsevd.SparseVDLinear(100, 10)

    def forward(self, x):
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.fc2(x).relu()
        return self.fc3(x)


class LeNet5(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = sparsevd.SparseVDConv2d(1, 20, 5)
        self.conv2 = sparsevd.SparseVDConv2d(20, 50, 5)
        self.fc1 = sparsevd.SparseVDLinear(800, 500)
        self.fc2 = sparsevd.SparseVDLinear(500, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.view(x.size(0), -1)
        return self.fc2(F.relu(self.fc1(x)))


class Block(nn.Module):
    """A ResNet BasicBlock, SBP after each BatchNorm; a 1x1 convolution shortcut where the
    shape changes."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = sparsevd.SparseVDConv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.sbp1 = sparsevd.SBPDropout(cout)
        self.conv2 = sparsevd.SparseVDConv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(sparsevd.SparseVDConv2d(cin, cout, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.sbp1(self.bn1(self.conv1(x))))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = sparsevd.SparseVDConv2d(1, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.sbp = sparsevd.SBPDropout(8)
        self.layer1 = Block(8, 8)
        self.layer2 = Block(8, 16, stride=2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.sbp(self.bn(self.conv(x))))
        x = self.layer2(self.layer1(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def test_class_style_lenet300100_is_cut_and_fused():
    torch.manual_seed(0)
    model = _prune(LeNet300100())
    with torch.no_grad():
        model.fc1.log_sigma2[:40] = 10  # 40 dead neurons: their constant bias folds into fc2, then they go
        model.fc2.log_sigma2[:, 250:] = 10  # 50 neurons fc2 does not read
    x = torch.randn(7, 1, 28, 28)
    fast = _check(model, x)
    assert isinstance(fast, sparsevd.FusedSequential), "a graph that is one chain op is returned as that module"
    chains = [m for m in fast.modules() if isinstance(m, sparsevd.FusedSequential)]
    assert len(chains) == 1 and len(chains[0]) == 6, "flatten, three layers and two ReLUs in one chain op"
    layers = [m for m in chains[0] if isinstance(m, (nn.Linear, sparsevd.SparseLinear))]
    read_by_fc3 = int((model.fc3.mask() != 0).any(0).sum())
    assert [m.out_features for m in layers] == [300 - 40 - 50, read_by_fc3, 10]
    assert model.fc1.weight.shape == (300, 784), "the model given is unchanged"
    _check(model.double(), x.double(), tol=1e-10)


def test_class_style_lenet5_cuts_filters_across_view():
    torch.manual_seed(0)
    model = _prune(LeNet5())
    with torch.no_grad():
        model.conv2.log_sigma2[:12] = 10  # 12 dead filters: relu(bias), max-pooled, is a constant per channel
        model.fc1.log_sigma2[:100] = 10
    x = torch.randn(3, 1, 28, 28)
    fast = _check(model, x, input_shape=(1, 28, 28))
    convs = [m for m in fast.modules() if isinstance(m, (nn.Conv2d, sparsevd.SparseConv2d))]
    assert [m.out_channels for m in convs] == [20, 50 - 12]
    linears = [m for m in fast.modules() if isinstance(m, (nn.Linear, sparsevd.SparseLinear))]
    read_by_fc2 = int((model.fc2.mask() != 0).any(0)[100:].sum())
    assert [(m.in_features, m.out_features) for m in linears] == [((50 - 12) * 16, read_by_fc2), (read_by_fc2, 10)]
    # without input_shape the view is not known to keep the batch: nothing is cut across it
    fast = _check(model, x)
    convs = [m for m in fast.modules() if isinstance(m, (nn.Conv2d, sparsevd.SparseConv2d))]
    assert convs[1].out_channels == 50
    _check(model.double(), x.double(), tol=1e-10, input_shape=(1, 28, 28))


def test_resnet_with_batchnorm_residual_adds_and_sbp():
    torch.manual_seed(0)
    model = ResNet()
    _prune(model)
    _randomize(model, pruned={model.sbp: [0, 3], model.layer1.sbp1: [1, 2, 5], model.layer2.sbp1: list(range(7))})
    x = torch.randn(5, 1, 12, 12)
    fast = _check(model, x, input_shape=(1, 12, 12))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules()), "every BatchNorm folded"
    convs = {name: m.weight.shape for name, m in fast.named_modules() if isinstance(m, nn.Conv2d)}
    # the stem's SBP units are pruned but the residual add of layer1 reads them: kept
    assert convs["conv"][0] == 8
    assert convs["layer1.conv1"][0] == 8 - 3 and convs["layer1.conv2"][1] == 8 - 3
    assert convs["layer2.conv1"][0] == 16 - 7 and convs["layer2.conv2"][1] == 16 - 7
    assert _params(fast) < _params(model) - 3 * 9 * 8 - 7 * 9 * 16
    _check(model.double(), x.double(), tol=1e-10, input_shape=tuple(x.shape[1:]))


def test_residual_add_keeps_a_unit_either_side_reads():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = sparsevd.SparseVDLinear(6, 8)
            self.b = sparsevd.SparseVDLinear(8, 8)
            self.c = sparsevd.SparseVDLinear(8, 3)

        def forward(self, x):
            h = self.a(x)
            return self.c(torch.tanh(h + self.b(torch.relu(h))))

    torch.manual_seed(0)
    model = _prune(Residual())
    with torch.no_grad():
        model.b.log_sigma2[:, :3] = 10  # b reads none of units 0-2 of h, but the add passes them on to c
        model.b.log_sigma2[:, 6:] = 10  # and neither b
        model.c.log_sigma2[:, 6:] = 10  # nor c reads units 6, 7 of h, or of the sum
    x = torch.randn(5, 6)
    fast = _check(model, x)
    _check(model.double(), x.double(), tol=1e-10)
    shapes = [m.weight.shape if isinstance(m, nn.Linear) else (m.out_features, m.in_features)
              for m in fast.modules() if isinstance(m, (nn.Linear, sparsevd.SparseLinear))]
    assert sorted(shapes) == sorted([(6, 6), (6, 6), (3, 6)])


def test_cat_and_functional_calls():
    class Branches(nn.Module):
        def __init__(self):
            super().__init__()
            self.left = sparsevd.SparseVDConv2d(3, 4, 3)
            self.right = sparsevd.SparseVDConv2d(3, 5, 3, dilation=2, padding=1)
            self.head = sparsevd.SparseVDConv2d(9, 6, 1)
            self.fc = sparsevd.SparseVDLinear(6 * 3 * 3, 2)

        def forward(self, x):
            y = torch.cat([torch.sigmoid(self.left(x)), F.leaky_relu(self.right(x), 0.1) * 2.0], dim=1)
            y = F.avg_pool2d(F.relu(self.head(y)), 2)
            return self.fc(torch.flatten(y, 1))

    torch.manual_seed(0)
    model = _prune(Branches())
    with torch.no_grad():
        model.head.log_sigma2[:2] = 10
        model.head.log_sigma2[:, [1, 6]] = 10  # head reads neither left's unit 1 nor right's unit 2
        model.right.log_sigma2[0] = 10  # a constant unit of right: folded into head's bias, then cut
    x = torch.randn(2, 3, 9, 9)
    fast = _check(model, x, input_shape=(3, 9, 9))
    _check(model.double(), x.double(), tol=1e-10, input_shape=(3, 9, 9))
    layers = dict(fast.named_modules())
    assert layers["head"].weight.shape == (4, 9 - 3, 1, 1), "head's dead filters and unread inputs are cut"
    assert layers["left"].weight.shape[0] == 4 - 1 and layers["right"].weight.shape[0] == 5 - 2


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_padding_and_constant_channels(padding_mode):
    class Padded(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = sparsevd.SparseVDConv2d(2, 6, 3)
            self.b = sparsevd.SparseVDConv2d(6, 4, 3, padding=1, padding_mode=padding_mode)
            self.c = sparsevd.SparseVDConv2d(4, 3, 3)

        def forward(self, x):
            return self.c(F.pad(torch.relu(self.b(torch.relu(self.a(x)))), (1, 1, 2, 0)))

    torch.manual_seed(0)
    model = _prune(Padded())
    with torch.no_grad():
        model.a.log_sigma2[:2] = 10  # constant relu(bias) channels, read by b's padding
        model.a.bias[0] = -1.0  # relu(-1) = 0: zero everywhere, padding included
        model.a.bias[1] = 0.5
        model.b.log_sigma2[:2] = 10  # constant channels reach c through zero F.pad
        model.b.bias[0] = -1.0
        model.b.bias[1] = 0.5
    x = torch.randn(3, 2, 9, 9)
    fast = _check(model, x, input_shape=(2, 9, 9))
    convs = {n: m.weight.shape for n, m in fast.named_modules() if isinstance(m, nn.Conv2d)}
    # a's zero channel goes; its constant 0.5 channel goes only where b's padding repeats it
    assert convs["a"][0] == (5 if padding_mode == "zeros" else 4)
    assert convs["b"][1] == convs["a"][0]
    # b's zero channel goes (zero-padded by F.pad it is still zero); its 0.5 channel stays
    assert convs["b"][0] == 3 and convs["c"][1] == 3
    _check(model.double(), x.double(), tol=1e-10, input_shape=tuple(x.shape[1:]))


class Wrapped(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def _sbp_structures():
    from test_sbp import STRUCTURES, _randomize_sbp
    return STRUCTURES, _randomize_sbp


@pytest.mark.parametrize("name", ["linear-sbp-relu", "linear-relu-sbp", "sbp-on-inputs", "conv-bn-sbp", "conv-sbp-bn",
                                  "pool-sbp-flatten", "convert-sparsevd+sbp", "convert-sbp-only"])
def test_a_sequential_inside_a_class_is_cut_as_much_as_alone(name):
    structures, randomize = _sbp_structures()
    torch.manual_seed(0)
    model = randomize(structures[name]()).eval()
    conv = name.startswith(("conv-", "pool-")) or name == "convert-sparsevd+sbp"
    x = torch.randn(4, 2, 8, 8) if conv else torch.randn(4, 6)
    shape = tuple(x.shape[1:])  # a linear layer's units are dimension 1 (SBP's dim=1) only for 2-D inputs
    alone = sparsevd.sparsify(model, input_shape=shape)
    inside = _check(Wrapped(model), x, tol=1e-5, input_shape=shape)
    assert isinstance(alone, sparsevd.FusedSequential) and isinstance(inside, (fx.GraphModule, sparsevd.FusedSequential))
    assert _units(inside) <= _units(alone) and _params(inside) <= _params(alone)


def test_hooked_and_subclassed_layers_are_left_as_they_are():
    class MyLinear(nn.Linear):
        pass

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = sparsevd.SparseVDLinear(5, 7)
            self.b = MyLinear(7, 4)
            self.bn = nn.BatchNorm1d(7)
            self.c = sparsevd.SparseVDLinear(7, 3)

        def forward(self, x):
            return self.b(torch.relu(self.a(x))) + self.c(self.bn(self.a(x))).sum(1, keepdim=True)

    torch.manual_seed(0)
    model = _randomize(_prune(Net(), dead_rows=None))
    with torch.no_grad():
        model.a.log_sigma2[:3] = 10
    fast = _check(model, torch.randn(6, 5), input_shape=(5,))
    # a is called twice: not a rewritable layer; the subclass keeps its input width, BN is not folded
    assert dict(fast.named_modules())["b"].in_features == 7 and type(dict(fast.named_modules())["b"]) is MyLinear
    assert any(isinstance(m, nn.BatchNorm1d) for m in fast.modules())


def test_a_hook_keeps_its_layer():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = sparsevd.SparseVDLinear(6, 9)
            self.b = nn.Linear(9, 4)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    model = _prune(Net())
    with torch.no_grad():
        model.a.log_sigma2[:3] = 10  # dead, but the hooked layer reads them
        model.b.weight[:, :3] = 0
    seen = []
    model.b.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    fast = _check(model, torch.randn(2, 6))
    seen.clear()
    fast(torch.randn(2, 6))
    assert seen == [(2, 9)], "the hooked layer runs as itself, on all its inputs"


def test_untraceable_forward_falls_back_with_a_warning():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(sparsevd.SparseVDLinear(6, 9), nn.ReLU(), sparsevd.SparseVDLinear(9, 4))

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                return self.body(x)
            return -self.body(x)

    torch.manual_seed(0)
    model = _prune(Branchy())
    with torch.no_grad():
        model.body[0].log_sigma2[:3] = 10
    with pytest.warns(UserWarning, match=r"cannot trace Branchy.forward .*per-module path") as record:
        fast = _check(model, torch.randn(3, 6))
    assert record[0].filename == __file__, "the warning points at the user's call"
    assert isinstance(fast, Branchy) and isinstance(fast.body, sparsevd.FusedSequential)
    assert fast.body[0].out_features == 6, "the Sequential inside is still cut"


def test_untraceable_submodule_is_kept_and_named():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = sparsevd.SparseVDLinear(9, 9)

        def forward(self, x):
            return self.fc(x) if bool(x.mean() > 0) else x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = sparsevd.SparseVDLinear(6, 9)
            self.gate = Gate()
            self.b = sparsevd.SparseVDLinear(9, 9)
            self.c = sparsevd.SparseVDLinear(9, 4)

        def forward(self, x):
            return self.c(torch.relu(self.b(self.gate(torch.relu(self.a(x))))))

    torch.manual_seed(0)
    model = _prune(Net())
    with torch.no_grad():
        model.a.log_sigma2[:3] = 10
        model.b.log_sigma2[:2] = 10
    with pytest.warns(UserWarning, match=r"cannot trace gate \(Gate: .*nothing is cut across it"):
        fast = _check(model, torch.randn(3, 6))
    layers = dict(fast.named_modules())
    assert isinstance(layers["gate"], Gate) and layers["gate"].fc.weight.shape == (9, 9)
    first, second = (m for m in fast.modules() if isinstance(m, sparsevd.FusedSequential))
    assert len(first) == 2 and first[0].out_features == 9, "a feeds the opaque gate: nothing of it is cut"
    assert len(second) == 3 and second[0].out_features == 7, "b's dead units are cut from c"


def test_an_sbp_that_cannot_be_folded_stays():
    model = _randomize(Wrapped(nn.Sequential(sparsevd.SparseVDLinear(6, 9), nn.Tanh(), sparsevd.SBPDropout(9),
                                             nn.Sigmoid()))).eval()
    _prune(model)
    x = torch.randn(3, 6)
    fast = sparsevd.sparsify(model)
    assert [type(m) for m in fast.modules() if isinstance(m, sparsevd.SBPDropout)] == [sparsevd.SBPDropout]
    torch.testing.assert_close(fast(x), model(x))


def test_bad_input_shape_is_refused():
    with pytest.raises(ValueError, match="input_shape"):
        sparsevd.sparsify(_prune(LeNet5()), input_shape=(3, 28, 28))
    with pytest.raises(ValueError, match="input_shape"):
        sparsevd.sparsify(_prune(LeNet5()), input_shape="28x28")


def test_a_plain_model_warns_that_nothing_is_pruned():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="sparsify: .* no SparseVD layers"):
        fast = sparsevd.sparsify(Wrapped(model))
    x = torch.randn(2, 3)
    torch.testing.assert_close(fast(x), model(x))


ALWAYS_CSR = sparsevd.CostModel(cpu=dataclasses.replace(CPU_COST, dense_overhead_s=math.inf))


def _export_models():
    torch.manual_seed(0)
    lenet = _prune(LeNet300100())
    with torch.no_grad():
        lenet.fc1.log_sigma2[:40] = 10
    resnet = ResNet()
    _prune(resnet)
    _randomize(resnet, pruned={resnet.layer1.sbp1: [1, 2, 5]})
    return [("lenet-300-100", lenet, (1, 28, 28), ALWAYS_CSR), ("resnet", resnet, (1, 12, 12), None)]


EXPORTED = """
import sys, torch, sparsevd
torch.save(torch.export.load(sys.argv[1]).module()(torch.load(sys.argv[2])), sys.argv[3])
"""


@pytest.mark.parametrize("strict", [False, True])
def test_the_graph_module_exports_with_a_dynamic_batch(strict, tmp_path):
    for name, model, shape, cost_model in _export_models():
        fast = sparsevd.sparsify(model.eval(), cost_model=cost_model, input_shape=shape)
        assert isinstance(fast, fx.GraphModule if name == "resnet" else sparsevd.FusedSequential)
        if cost_model is ALWAYS_CSR:
            assert any(isinstance(m, sparsevd.SparseLinear) for m in fast.modules()), name
        batch = torch.export.Dim("batch", min=1, max=1024)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # dynamo's note that FusedSequential caches its plan
            program = torch.export.export(fast, (torch.randn(3, *shape),), dynamic_shapes=({0: batch},), strict=strict)
        path = tmp_path / f"{name}.pt2"
        torch.export.save(program, path)
        loaded = torch.export.load(path).module()
        for n in (1, 5):
            x = torch.randn(n, *shape)
            with torch.no_grad():
                expected = model(x)
            torch.testing.assert_close(loaded(x), expected, rtol=1e-4, atol=1e-4, msg=name)
        if not strict:  # and in a process that has only imported sparsevd
            torch.save(x, tmp_path / "x.pt")
            subprocess.run([sys.executable, "-c", EXPORTED, str(path), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                           check=True, timeout=300)
            torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, rtol=1e-4, atol=1e-4, msg=name)


def test_sparsify_and_calls_under_inference_mode():
    for name, model, shape, _ in _export_models():
        x = torch.randn(4, *shape)
        with torch.no_grad():
            expected = model.eval()(x)
        with torch.inference_mode():
            fast = sparsevd.sparsify(model, cost_model=ALWAYS_CSR, input_shape=shape)
            torch.testing.assert_close(fast(x), expected, rtol=1e-4, atol=1e-4, msg=name)
        assert any(isinstance(m, sparsevd.SparseLinear) for m in fast.modules()), name
        assert not any(p.is_inference() for p in fast.parameters()), "the result is usable outside inference mode"
        torch.testing.assert_close(fast(x), expected, rtol=1e-4, atol=1e-4, msg=name)


class PlainBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
        return F.relu(y + self.shortcut(x))


class SqueezeExcite(nn.Module):
    """A ResNet with a squeeze-excitation gate (x * sigmoid(fc(mean x))), written as a user would."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.block = PlainBlock(8, 12, 2)
        self.gate = nn.Linear(12, 12)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = self.block(F.relu(self.bn(self.stem(x))))
        x = x * torch.sigmoid(self.gate(x.mean((2, 3))))[:, :, None, None]
        if self.training:
            x = F.dropout(x, 0.5)
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(x.view(x.size(0), -1))


def test_a_converted_class_style_resnet_with_sbp():
    torch.manual_seed(0)
    model = sparsevd.convert(_randomize(SqueezeExcite()), sbp=True)
    _prune(model)
    _randomize(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, sparsevd.SBPDropout):  # half the units of each layer pruned
                m.mu[: m.num_features // 2], m.log_sigma[: m.num_features // 2] = -15.0, 3.0
        # after c1's pruned units, relu(BatchNorm shift): 0 for five, a constant 0.5 for one,
        # which c2's zero padding reads as 0.5 inside and 0 at the borders: kept
        model.block.b1.bias[:6] = torch.tensor([-5.0] * 5 + [0.0]) + model.block.b1.running_mean[:6] * torch.rsqrt(
            model.block.b1.running_var[:6] + model.block.b1.eps) * model.block.b1.weight[:6]
        model.block.b1.bias[5] += 0.5
    x = torch.randn(3, 1, 10, 10)
    fast = _check(model, x, input_shape=(1, 10, 10))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    shapes = {n: m.weight.shape for n, m in fast.named_modules() if isinstance(m, nn.Conv2d)}
    assert shapes["block.c1.0"][0] == 12 - 5, "c1's pruned units reach only c2: cut where zero"
    assert shapes["block.c2.0"][0] == 12, "the gate reads every unit of the block's output"
    _check(model.double(), x.double(), tol=1e-10, input_shape=(1, 10, 10))


def test_the_graph_module_pickles_and_copies():
    torch.manual_seed(0)
    model = sparsevd.convert(_randomize(SqueezeExcite()), sbp=True)
    _prune(model)
    fast = sparsevd.sparsify(model.eval(), cost_model=ALWAYS_CSR, input_shape=(1, 10, 10))
    assert isinstance(fast, fx.GraphModule)
    x = torch.randn(2, 1, 10, 10)
    buffer = io.BytesIO()
    torch.save(fast, buffer)
    buffer.seek(0)
    for again in (torch.load(buffer, weights_only=False), copy.deepcopy(fast)):
        torch.testing.assert_close(again(x), fast(x), rtol=0, atol=0)
    fresh = sparsevd.sparsify(model, cost_model=ALWAYS_CSR, input_shape=(1, 10, 10))
    fresh.load_state_dict(fast.state_dict())
    torch.testing.assert_close(fresh(x), fast(x), rtol=0, atol=0)


def test_conv1d_batchnorm1d_and_a_tensor_concatenated_with_itself():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = sparsevd.SparseVDConv1d(3, 6, 3), nn.BatchNorm1d(6)
            self.mix = sparsevd.SparseVDConv1d(12, 5, 1)
            self.fc, self.bn_fc = sparsevd.SparseVDLinear(5 * 7, 8), nn.BatchNorm1d(8)
            self.out = sparsevd.SparseVDLinear(8, 2)

        def forward(self, x):
            h = F.relu(self.bn(self.conv(x)))
            h = self.mix(torch.cat([h, h], 1))
            return self.out(F.relu(self.bn_fc(self.fc(h.flatten(1)))))

    torch.manual_seed(0)
    model = _randomize(_prune(Net()))
    with torch.no_grad():
        model.mix.log_sigma2[:, [0, 6]] = 10  # unit 0 of h, in both places: unread
        model.mix.log_sigma2[:, 1] = 10  # unit 1 of h: read only in its second place
        model.out.log_sigma2[:, 3] = 10
    x = torch.randn(4, 3, 9)
    fast = _check(model, x, input_shape=(3, 9))
    assert not any(isinstance(m, nn.BatchNorm1d) for m in fast.modules()), "both BatchNorms folded"
    shapes = {n: m.weight.shape for n, m in fast.named_modules() if isinstance(m, nn.Conv1d)}
    assert shapes["conv"][0] == 5 and shapes["mix"][1] == 10
    linears = [m for m in fast.modules() if isinstance(m, (nn.Linear, sparsevd.SparseLinear))]
    read_by_out = int((model.out.mask() != 0).any(0).sum())
    assert read_by_out <= 7 and [m.out_features for m in linears] == [read_by_out, 2], "fc's units out does not read"
    _check(model.double(), x.double(), tol=1e-10, input_shape=(3, 9))
