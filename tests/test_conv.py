"""SparseVDConv2d / SparseVDConv1d and lrt_conv*: against the reference (same noise),
against weight sampling (mean and variance), as drop-ins for nn.Conv*d, errors."""

import dataclasses
import io

import pytest
import torch
from torch import nn

import sparsevd
from sparsevd import functional as F
from sparsevd import reference as R
from sparsevd.conv import SparseVDConv1d, SparseVDConv2d, lrt_conv1d, lrt_conv2d

# (in, out, kernel, stride, padding, dilation, groups, input spatial size): odd sizes,
# non-square kernels, 'same'/'valid', dilation, groups and depthwise.
CASES_2D = [
    (3, 5, (3, 2), 1, 0, 1, 1, (7, 6)),
    (3, 4, 3, (2, 1), (1, 2), (1, 2), 1, (9, 7)),
    (2, 3, (1, 3), 1, "same", 2, 1, (5, 8)),
    (2, 3, (2, 4), 1, "same", 1, 1, (5, 6)),
    (3, 2, 3, 2, "valid", 1, 1, (7, 7)),
    (4, 6, 3, 1, 1, 1, 2, (5, 5)),
    (3, 3, 3, (1, 2), 1, 1, 3, (6, 5)),
]
CASES_1D = [
    (3, 5, 3, 1, 0, 1, 1, (11,)),
    (4, 2, 4, 2, 2, 2, 2, (13,)),
    (2, 3, 2, 1, "same", 3, 1, (9,)),
]


def _params(cin, cout, kernel, groups, dims, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    kernel = (kernel,) * dims if isinstance(kernel, int) else kernel
    w = torch.randn(cout, cin // groups, *kernel, generator=g, dtype=dtype) * 0.5
    ls = torch.randn(cout, cin // groups, *kernel, generator=g, dtype=dtype) - 3
    b = torch.randn(cout, generator=g, dtype=dtype) if bias else None
    return w, ls, b


def _leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", [(2, c) for c in CASES_2D] + [(1, c) for c in CASES_1D])
def test_lrt_conv_matches_reference_with_the_same_noise(case, bias, dtype):
    dims, (cin, cout, kernel, stride, padding, dilation, groups, size) = case
    fn = lrt_conv2d if dims == 2 else lrt_conv1d
    w, ls, b = _params(cin, cout, kernel, groups, dims, dtype, bias)
    x = torch.randn(3, cin, *size, dtype=dtype)
    args = (stride, padding, dilation, groups)
    xs, ws, lss, bs = _leaves(x, w, ls, b)
    y = fn(xs, ws, lss, bs, *args, seed=1234)
    noise = F.lrt_sample_noise(y, 1234)
    assert noise.dtype == torch.float32 and noise.shape == y.shape
    xr, wr, lsr, br = _leaves(x, w, ls, b)
    ref = R.lrt_conv(xr, wr, lsr, br, noise.to(dtype), *args)
    expected_shape = nn.functional.conv2d(x, w, None, *args).shape if dims == 2 else \
        nn.functional.conv1d(x, w, None, *args).shape
    assert y.shape == ref.shape == expected_shape and y.dtype == dtype
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(y, ref, **tol)
    assert not torch.equal(y, fn(x, w, ls, b, *args, seed=1235)), "the noise must depend on the seed"
    grad = torch.randn_like(y)
    y.backward(grad)
    ref.backward(grad)
    for name, got, want in (("x", xs, xr), ("weight", ws, wr), ("log_sigma2", lss, lsr), ("bias", bs, br)):
        if got is not None:
            torch.testing.assert_close(got.grad, want.grad, **tol, msg=lambda m: f"grad of {name}: {m}")


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(4, 1, 2, 2, dtype=torch.float64, generator=g, requires_grad=True)
    ls = (torch.randn(4, 1, 2, 2, dtype=torch.float64, generator=g) - 2).requires_grad_()
    b = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *t: lrt_conv2d(*t, stride=(2, 1), padding=(1, 0), dilation=1, groups=2, seed=7), (x, w, ls, b),
        fast_mode=True,
    )


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding", [(1, 2), "same"])
def test_module_padding_modes_train_and_eval(padding_mode, padding):
    torch.manual_seed(0)
    dense = nn.Conv2d(3, 4, (3, 4), padding=padding, padding_mode=padding_mode)
    layer = SparseVDConv2d.from_conv(dense, log_sigma2_init=-4.0)
    x = torch.randn(2, 3, 6, 7)
    torch.manual_seed(11)
    y = layer(x)
    torch.manual_seed(11)
    noise = F.lrt_sample_noise(y, sparsevd.noise.draw_seed())
    # the reference pads explicitly, as nn.Conv2d does for a padding_mode other than zeros
    pad = sparsevd.shapes.explicit_padding(layer.padding, layer.kernel_size, layer.dilation)
    mode = "constant" if padding_mode == "zeros" else padding_mode
    ref = R.lrt_conv(nn.functional.pad(x, pad, mode=mode), layer.weight, layer.log_sigma2, layer.bias, noise)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    layer.log_sigma2.data.fill_(-30)  # nothing pruned: eval is the dense layer
    torch.testing.assert_close(layer.eval()(x), dense(x), rtol=1e-5, atol=1e-6)


def test_mean_and_variance_match_weight_sampling():
    """Each output of the LRT is N(conv(x, θ) + b, conv(x², σ²)); so is one of a
    convolution with sampled weights. Compare both samplers' empirical moments with
    the formula, at tolerances that a variance off by 25% cannot meet."""
    torch.manual_seed(0)
    samples = 6000
    w = torch.randn(4, 2, 2, 3) * 0.5
    ls = torch.log(w * w) + torch.randn(4, 2, 2, 3) * 0.5  # α ≈ 1: noise as large as the signal
    b = torch.randn(4)
    x = torch.randn(1, 4, 5, 6)
    args = ((1, 2), 1, (2, 1), 2)
    mean = nn.functional.conv2d(x, w, b, *args)[0].double()
    var = nn.functional.conv2d(x * x, ls.exp(), None, *args)[0].double()
    lrt = lrt_conv2d(x.expand(samples, -1, -1, -1), w, ls, b, *args, seed=3).double()
    sampled = R.sample_conv(x.expand(samples, -1, -1, -1), w, ls, b, *args,
                            generator=torch.Generator().manual_seed(4)).double()
    # a standard error 5× the expected one can't happen by chance (6σ over 36 outputs);
    # the variance's relative standard error is sqrt(2 / samples) ≈ 1.8%
    var_tol = 6 * (2 / samples) ** 0.5
    assert var_tol < 0.25
    for y in (lrt, sampled):
        z = (y.mean(0) - mean) / (var / samples).sqrt()
        assert z.abs().max() < 6
        assert ((y.var(0) / var) - 1).abs().max() < var_tol


def test_eval_is_the_masked_conv_and_deterministic():
    torch.manual_seed(0)
    layer = SparseVDConv2d(4, 6, (3, 2), stride=(1, 2), padding=1, groups=2)
    with torch.no_grad():
        layer.log_sigma2.copy_(torch.randn(layer.weight.shape) * 4)
    mask = R.log_alpha(layer.weight, layer.log_sigma2) < 3.0
    assert 0 < mask.sum() < mask.numel(), "test needs a partly pruned layer"
    assert torch.equal(layer.mask(), mask) and layer.kept_weights() == int(mask.sum())
    assert layer.total_weights() == 6 * 2 * 3 * 2
    layer.eval()
    x = torch.randn(2, 4, 5, 7)
    expected = nn.functional.conv2d(x, layer.weight * mask, layer.bias, (1, 2), 1, 1, 2)
    assert torch.equal(layer(x), layer(x))
    torch.testing.assert_close(layer(x), expected)
    # unbatched input, like nn.Conv2d
    torch.testing.assert_close(layer(x[1]), expected[1])
    assert layer.train()(x[1]).shape == expected[1].shape


def test_train_mode_samples_near_the_mean():
    torch.manual_seed(0)
    layer = SparseVDConv1d(3, 4, 3, padding=1)
    x = torch.randn(5, 3, 8)
    a, b = layer(x), layer(x)
    assert not torch.equal(a, b)
    mean = nn.functional.conv1d(x, layer.weight, layer.bias, padding=1)
    std = (nn.functional.conv1d(x * x, layer.log_sigma2.exp(), padding=1) + R.EPS).sqrt()
    assert ((a - mean).abs() <= 6 * std).all()


@pytest.mark.parametrize("cls, dense", [(SparseVDConv2d, nn.Conv2d), (SparseVDConv1d, nn.Conv1d)])
def test_constructor_and_from_conv_match_nn_conv(cls, dense):
    kwargs = dict(kernel_size=3, stride=2, padding=1, dilation=1, groups=2, bias=True)
    torch.manual_seed(0)
    ref = dense(4, 6, **kwargs)
    torch.manual_seed(0)
    layer = cls(4, 6, **kwargs)
    assert torch.equal(layer.weight, ref.weight) and torch.equal(layer.bias, ref.bias)
    assert layer.log_sigma2.shape == ref.weight.shape and (layer.log_sigma2 == -10).all()
    assert cls(4, 6, 3, bias=False).bias is None
    assert cls(4, 6, 3, dtype=torch.float64).log_sigma2.dtype == torch.float64

    converted = cls.from_conv(ref, log_sigma2_init=-20.0, threshold=2.0)
    assert converted.threshold == 2.0 and converted.kept_weights() == converted.total_weights()
    x = torch.randn(3, 4, *(9,) * cls.dims)
    torch.testing.assert_close(converted.eval()(x), ref(x))
    other = nn.Conv1d(1, 1, 1) if cls is SparseVDConv2d else nn.Conv2d(1, 1, 1)
    with pytest.raises(TypeError, match=dense.__name__):
        cls.from_conv(other)
    with torch.no_grad():
        ref.weight[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="weight contains NaN"):
        cls.from_conv(ref)


def test_kl_counts_and_alpha_variants():
    layer = SparseVDConv2d(3, 4, (2, 3))
    kl = layer.kl()
    kl.backward()
    assert layer.weight.grad is not None and layer.log_sigma2.grad is not None
    torch.testing.assert_close(kl, R.kl_divergence(layer.weight, layer.log_sigma2))
    unit = SparseVDConv2d(3, 4, (2, 3), alpha="unit")
    assert unit.log_alpha_unit.shape == (4, 1, 1, 1) and unit.log_alpha.shape == unit.weight.shape
    unit(torch.randn(2, 3, 5, 5)).sum().backward()
    assert unit.log_alpha_unit.grad is not None and torch.isfinite(unit.kl())


def test_state_dict_round_trip():
    layer = SparseVDConv2d(3, 4, (2, 3), padding="same")
    with torch.no_grad():
        layer.log_sigma2.normal_()
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    other = SparseVDConv2d(3, 4, (2, 3), padding="same")
    other.load_state_dict(torch.load(buffer))
    assert set(layer.state_dict()) == {"weight", "bias", "log_sigma2"}
    x = torch.randn(2, 3, 5, 6)
    assert torch.equal(layer.eval()(x), other.eval()(x))


def test_empty_batch():
    layer = SparseVDConv2d(3, 4, 3)
    for training in (True, False):
        assert layer.train(training)(torch.randn(0, 3, 5, 5)).shape == (0, 4, 3, 3)


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: SparseVDConv2d(4, 6, 3, groups=4), ValueError, "groups=4 must divide"),
        (lambda: SparseVDConv2d(4, 6, 3, groups=0), ValueError, "groups"),
        (lambda: SparseVDConv2d(4, 6, 3, stride=2, padding="same"), ValueError, "'same'.*strided"),
        (lambda: SparseVDConv2d(4, 6, 3, padding="full"), ValueError, "padding"),
        (lambda: SparseVDConv2d(4, 6, 3, padding=-1), ValueError, "padding"),
        (lambda: SparseVDConv2d(4, 6, (3, 3, 3)), ValueError, "kernel_size"),
        (lambda: SparseVDConv2d(4, 6, 0), ValueError, "kernel_size"),
        (lambda: SparseVDConv2d(0, 6, 3), ValueError, "in_channels"),
        (lambda: SparseVDConv2d(4, 6, 3, padding_mode="mirror"), ValueError, "padding_mode"),
        (lambda: SparseVDConv2d(4, 6, 3, threshold=float("nan")), ValueError, "threshold"),
        (lambda: SparseVDConv1d(4, 6, 3, dilation=(1, 1)), ValueError, "dilation"),
    ],
)
def test_bad_construction_is_named(make, error, message):
    with pytest.raises(error, match=message):
        make()


@pytest.mark.parametrize("training", [True, False])
def test_bad_input_is_named(training):
    layer = SparseVDConv2d(4, 3, 3).train(training)
    with pytest.raises(ValueError, match="4 channels"):
        layer(torch.randn(2, 5, 6, 6))
    with pytest.raises(ValueError, match="4-D input"):
        layer(torch.randn(4, 6))
    with pytest.raises(ValueError, match="4-D input"):
        layer(torch.randn(1, 2, 4, 6, 6))
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        layer(torch.randn(2, 4, 2, 6))
    with pytest.raises(TypeError, match="floating"):
        layer(torch.ones(2, 4, 6, 6, dtype=torch.long))
    with pytest.raises(TypeError, match="dtype torch.float64 but weight has dtype torch.float32"):
        layer(torch.randn(2, 4, 6, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="input is on meta but weight is on cpu"):
        layer(torch.randn(2, 4, 6, 6, device="meta"))


def test_bad_functional_arguments_are_named():
    x, w, ls = torch.randn(2, 4, 6, 6), torch.randn(6, 2, 3, 3), torch.randn(6, 2, 3, 3)
    with pytest.raises(ValueError, match="log_sigma2 must have the shape"):
        lrt_conv2d(x, w, ls[:3])
    with pytest.raises(ValueError, match="weight must be 4-D"):
        lrt_conv2d(x, w[0], ls[0])
    with pytest.raises(ValueError, match="bias must have shape"):
        lrt_conv2d(x, w, ls, torch.randn(5), groups=2)
    with pytest.raises(ValueError, match="groups=4 must divide out_channels=6"):
        lrt_conv2d(torch.randn(2, 8, 6, 6), w, ls, groups=4)
    with pytest.raises(ValueError, match="'same'"):
        lrt_conv2d(x, w, ls, stride=2, padding="same", groups=2)
    with pytest.raises(TypeError, match="log_sigma2 has dtype"):
        lrt_conv2d(x, w, ls.double(), groups=2)
    with pytest.raises(ValueError, match="seed"):
        lrt_conv2d(x, w, ls, groups=2, seed=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="3-D input"):
        lrt_conv1d(x, w[..., 0], ls[..., 0], groups=2)


# --- inference: SparseConv*d, sparsify() and report() on convolutions -------------------


def _pruned(conv, keep=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        conv.weight.mul_(torch.rand(conv.weight.shape, generator=g) < keep)
    return conv


@pytest.mark.parametrize(
    "dense, shape",
    [
        (nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2), (3, 4, 9, 8)),
        (nn.Conv2d(3, 5, (2, 3), padding="same", dilation=2, padding_mode="reflect", bias=False), (2, 3, 7, 6)),
        (nn.Conv2d(3, 3, 3, padding=1, groups=3, padding_mode="circular"), (2, 3, 5, 5)),
        (nn.Conv2d(2, 4, 3, padding="valid", padding_mode="replicate"), (1, 2, 6, 7)),
        (nn.Conv1d(4, 2, 3, stride=2, padding=2, groups=2, padding_mode="circular"), (3, 4, 11)),
        (nn.Conv1d(3, 5, 4, padding="same", dilation=3), (2, 3, 10)),
    ],
)
def test_sparse_conv_matches_dense_conv(dense, shape):
    torch.manual_seed(0)
    dense = _pruned(dense)
    sparse = (sparsevd.SparseConv2d if isinstance(dense, nn.Conv2d) else sparsevd.SparseConv1d).from_dense(dense)
    assert sparse.nnz == int((dense.weight != 0).sum())
    x = torch.randn(*shape)
    torch.testing.assert_close(sparse(x), dense(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse(x[0]), dense(x[0]), rtol=1e-5, atol=1e-5)  # unbatched
    with pytest.raises(ValueError, match=f"expected input \\[batch, {dense.in_channels},"):
        sparse(torch.randn(2, dense.in_channels + 1, *shape[2:]))
    small = sparsevd.SparseConv2d.from_dense(_pruned(nn.Conv2d(2, 3, 3)))
    with pytest.raises(ValueError, match=r"spatial size \(2, 5\) is smaller than the kernel"):
        small(torch.randn(2, 2, 5))


def test_sparse_conv_state_dict_round_trip_and_corruption():
    layer = sparsevd.SparseConv2d.from_dense(_pruned(nn.Conv2d(3, 4, 3, padding=1)))
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)
    other = sparsevd.SparseConv2d.from_dense(_pruned(nn.Conv2d(3, 4, 3, padding=1), keep=0.9, seed=1))
    assert other.nnz != layer.nnz
    other.load_state_dict(state)
    x = torch.randn(2, 3, 6, 5)
    torch.testing.assert_close(other(x), layer(x))
    bad = dict(state, **{"gemm.col_indices": state["gemm.col_indices"].clone().fill_(99)})
    with pytest.raises(RuntimeError, match="corrupt CSR weight: .*out of range"):
        other.load_state_dict(bad)
    with pytest.raises(RuntimeError, match="format version 0"):
        other.load_state_dict(dict(state, **{"gemm.format_version": torch.tensor(0, dtype=torch.int32)}))
    torch.testing.assert_close(other(x), layer(x))  # nothing half-loaded
    with pytest.raises(TypeError, match="nn.Conv2d"):
        sparsevd.SparseConv2d.from_dense(nn.Conv1d(1, 1, 1))


def _cnn():
    """LeNet-5-like: conv-relu-pool-conv-relu-pool-flatten-linear-relu-linear, partly pruned."""
    torch.manual_seed(0)
    model = nn.Sequential(
        SparseVDConv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        SparseVDConv2d(6, 10, (5, 3)), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        sparsevd.SparseVDLinear(10 * 4 * 5, 24), nn.ReLU(), sparsevd.SparseVDLinear(24, 7),
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in sparsevd.sparsevd_modules(model):
            layer.log_sigma2.copy_(torch.randn(layer.weight.shape, generator=g) * 3 - 2)
        model[0].bias[1] = 0.7  # a dead filter with a positive constant output (folded)
        model[0].log_sigma2[[1, 4]] = 10  # two dead filters: constants through ReLU and max-pool
        model[3].log_sigma2[:, 2] = 10  # channel 2 of the first conv is read by nobody
        model[3].log_sigma2[[0, 6]] = 10  # two dead filters, folded into the linear layer's bias
        model[7].log_sigma2[:, 3 * 20:4 * 20] = 10  # channel 3 of the second conv is unused
    return model.eval()


@pytest.mark.parametrize("batch_size", [1, 256])
@pytest.mark.parametrize("form", ["dense", "csr"])
def test_sparsify_cnn_matches_eval_model(batch_size, form):
    from sparsevd.sparsify import CPU_COST

    model = _cnn()
    x = torch.randn(5, 1, 24, 26)
    # a cost model under which CSR always wins, to run every layer in CSR
    csr_wins = sparsevd.CostModel(cpu=dataclasses.replace(
        CPU_COST, csr_overhead_s=0.0, csr_bandwidth=1e18, csr_rate=1e18, im2col_bandwidth=1e18))
    options = dict(input_shape=(1, 24, 26), cost_model=csr_wins) if form == "csr" else {}
    fast = sparsevd.sparsify(model, batch_size=batch_size, **options)
    torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)
    kinds = (sparsevd.SparseConv2d, sparsevd.SparseLinear) if form == "csr" else (nn.Conv2d, nn.Linear)
    assert all(isinstance(fast[k], kinds) for k in (0, 3, 7, 9))
    convs = [m for m in fast if isinstance(m, (nn.Conv2d, sparsevd.SparseConv2d))]
    assert [c.out_channels for c in convs] == [6 - 3, 10 - 3]  # dead and unused filters cut
    assert convs[1].in_channels == 3 and fast[7].in_features == 7 * 20
    assert model[0].weight.shape == (6, 1, 5, 5), "sparsify must not change the model it was given"
    assert not any(isinstance(m, sparsevd.SparseVDModule) for m in fast.modules())


@pytest.mark.parametrize(
    "between, after, folded",
    [
        # zero padding: a constant channel is not constant at the borders, keep it
        ([nn.ReLU()], dict(padding=1), False),
        ([nn.ReLU()], dict(padding="same"), False),
        ([nn.Tanh(), nn.MaxPool2d(2, padding=1)], dict(padding=0), True),
        # a padding that repeats the input keeps a constant constant
        ([nn.ReLU()], dict(padding=1, padding_mode="replicate"), True),
        # average pooling over zero padding makes the borders non-constant
        ([nn.AvgPool2d(2, padding=1)], dict(padding=0), False),
        ([nn.AvgPool2d(2, padding=1, count_include_pad=False)], dict(padding=0), True),
    ],
)
def test_sparsify_folds_dead_filters_only_where_exact(between, after, folded):
    torch.manual_seed(0)
    model = nn.Sequential(SparseVDConv2d(2, 4, 3), *between, SparseVDConv2d(4, 3, 3, **after)).eval()
    with torch.no_grad():
        model[0].log_sigma2[1] = 10  # filter 1 dead: its output is its bias everywhere
        model[0].bias[1] = 1.5
    x = torch.randn(2, 2, 9, 8)
    fast = sparsevd.sparsify(model)
    torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)
    assert fast[0].out_channels == (3 if folded else 4)


def test_sparsify_leaves_grouped_convs_whole_and_chooses_csr_for_sparse_convs():
    torch.manual_seed(0)
    model = nn.Sequential(SparseVDConv2d(4, 8, 3, groups=2), nn.ReLU(), SparseVDConv2d(8, 64, 3, padding=1)).eval()
    with torch.no_grad():
        model[0].log_sigma2[0] = 10
        model[2].log_sigma2.fill_(10)
        model[2].log_sigma2.view(-1)[::97] = -20  # ~1% kept
    x = torch.randn(1, 4, 12, 12)
    fast = sparsevd.sparsify(model, batch_size=1, input_shape=(4, 12, 12), cost_model=_free_im2col())
    torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)
    assert fast[0].out_channels == 8, "a grouped conv's filters are not cut"
    assert isinstance(fast[2], sparsevd.SparseConv2d)
    no_shape = sparsevd.sparsify(model, batch_size=1, cost_model=_free_im2col())
    assert isinstance(no_shape[2], nn.Conv2d), "no input_shape: dense"
    with pytest.raises(ValueError, match="input_shape"):
        sparsevd.sparsify(model, input_shape=(3, 12, 12))
    with pytest.raises(ValueError, match="input_shape"):
        sparsevd.sparsify(model, input_shape=(0, 12))


def test_sparsify_conv1d_chain():
    torch.manual_seed(0)
    model = nn.Sequential(SparseVDConv1d(3, 5, 3), nn.ReLU(), nn.MaxPool1d(2), SparseVDConv1d(5, 4, 2),
                          nn.Flatten(), sparsevd.SparseVDLinear(4 * 6, 3)).eval()
    with torch.no_grad():
        model[0].log_sigma2[2] = 10
        model[3].log_sigma2[:, 4] = 10
    x = torch.randn(3, 3, 16)
    fast = sparsevd.sparsify(model)
    torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)
    assert fast[0].out_channels == 3


def _free_im2col():
    from sparsevd.sparsify import CPU_COST

    return sparsevd.CostModel(cpu=dataclasses.replace(CPU_COST, im2col_bandwidth=1e18))


def test_cost_model_for_convolutions():
    shape, positions = (64, 64, 3, 3), 28 * 28
    total = 64 * 64 * 9
    # on CPU, building the im2col patches costs more than a dense convolution (measured)
    assert sparsevd.CostModel().choose_conv(shape, 1, total // 100, 1, positions, "cpu") == "dense"
    free = _free_im2col()
    assert free.choose_conv(shape, 1, total // 100, 1, positions, "cpu") == "csr"
    assert free.choose_conv(shape, 1, total * 9 // 10, 1, positions, "cpu") == "dense"
    cost = sparsevd.CostModel()
    gemm_only = cost.time("csr", 64, 576, 1000, 8 * positions, "cpu")
    assert cost.conv_time("csr", shape, 1, 1000, 8, positions, "cpu") > gemm_only
    assert cost.conv_time("dense", shape, 1, 1000, 8, positions, "cpu") == cost.time("dense", 64, 576, 1000,
                                                                                      8 * positions, "cpu")


def test_report_conv_rows():
    model = _cnn().train()
    rep = sparsevd.report(model, input_shape=(1, 24, 26))
    assert all(m.training for m in model.modules()), "report() restores the train/eval flags"
    model.eval()
    assert [r["layer"] for r in rep.rows] == ["0", "3", "7", "9"]
    first, second = rep.rows[0], rep.rows[1]
    assert first["type"] == "SparseVDConv2d" and first["shape"] == (6, 1, 5, 5)
    assert first["total"] == 150 and first["kept"] == model[0].kept_weights()
    assert first["flops_dense"] == 2 * 150 * 24 * 26 and first["flops_sparse"] == 2 * first["kept"] * 24 * 26
    assert second["flops_dense"] == 2 * 10 * 6 * 15 * (12 - 4) * (13 - 2)
    assert first["bytes_dense"] == 4 * 150 and first["bytes_sparse"] == first["kept"] * 8 + 7 * 4
    assert rep.rows[2]["flops_dense"] == 2 * 24 * 200
    blind = sparsevd.report(model)
    assert blind.rows[0]["flops_dense"] is None and blind.total["flops_dense"] is None
    assert blind.rows[2]["flops_dense"] == rep.rows[2]["flops_dense"] and "n/a" in str(blind)
    after = sparsevd.report(sparsevd.sparsify(model, input_shape=(1, 24, 26)), input_shape=(1, 24, 26))
    assert len(after.rows) == 4 and after.total["kept"] <= rep.total["kept"]
    # a CSR convolution is one row (its inner SparseLinear is not counted again)
    csr = nn.Sequential(sparsevd.SparseConv2d.from_dense(_pruned(nn.Conv2d(3, 4, 3))))
    rows = sparsevd.report(csr, input_shape=(3, 5, 5)).rows
    assert len(rows) == 1 and rows[0]["type"] == "SparseConv2d" and rows[0]["total"] == 4 * 3 * 9
    assert rows[0]["kept"] == csr[0].nnz and rows[0]["flops_sparse"] == 2 * csr[0].nnz * 9


def test_compile_fullgraph_cnn():
    torch.manual_seed(0)
    model = nn.Sequential(SparseVDConv2d(2, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU(), nn.Flatten(),
                          sparsevd.SparseVDLinear(4 * 5 * 5, 3))
    x, target = torch.randn(2, 2, 5, 5), torch.tensor([0, 2])
    loss_fn = sparsevd.SGVLBLoss(model, dataset_size=100)
    step = torch.compile(lambda x, t: loss_fn(model(x), t, kl_weight=0.5), fullgraph=True, backend="aot_eager")
    loss = step(x, target)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())
    model.eval()
    torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="aot_eager")(x), model(x))


def test_report_text_keeps_long_layer_names_apart_from_their_type():
    model = nn.Sequential()
    model.add_module("a_rather_long_block_name", nn.Sequential(sparsevd.SparseVDConv2d(3, 4, 3)))
    lines = str(sparsevd.report(model)).splitlines()
    row = next(line for line in lines if line.startswith("a_rather_long_block_name.0"))
    assert row.split()[:2] == ["a_rather_long_block_name.0", "SparseVDConv2d"]
    assert lines[0].index("type") == row.index("SparseVDConv2d")  # the columns line up under the header
