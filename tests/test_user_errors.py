"""A user's mistakes get a clear error or warning, at the user's line (issue 20, items 3 and 5).

Every warning the package raises is attributed to the caller outside sparsevd and torch;
bad layer attributes, sizes, data-set sizes and plain models are refused with a message
naming the layer or function and what it expected; valid values of every accepted type
(Python, numpy, 0-d tensors) keep working as before.
"""

import copy
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import sparsevd
from sparsevd import _warnings
from sparsevd.backends import extension
from sparsevd.pruning_layers import require_pruning_layers

HERE = __file__


def _recorded(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        call()
    return caught


def _mlp(**options):
    return nn.Sequential(sparsevd.SparseVDLinear(4, 6, **options), nn.ReLU(), sparsevd.SparseVDLinear(6, 3, **options))


# --- warnings point at the user's line ---------------------------------------------------------------------------

def _deprecated_call(loss_fn, model):
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    return loss_fn(model(x), y, kl_weight=0.5)  # the user's line


@pytest.mark.parametrize("how", ["module_call", "forward", "user_function"])
def test_deprecation_warning_points_at_the_users_line(how):
    model = _mlp()
    loss_fn = sparsevd.SGVLBLoss(model, 100)
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    calls = {
        "module_call": lambda: loss_fn(model(x), y, kl_weight=0.5),  # through nn.Module.__call__
        "forward": lambda: loss_fn.forward(model(x), y, kl_weight=0.5),
        "user_function": lambda: _deprecated_call(loss_fn, model),
    }
    caught = _recorded(calls[how])
    assert [w.category for w in caught] == [DeprecationWarning]
    assert caught[0].filename == HERE
    if how == "user_function":  # the first frame outside the package: inside the user's helper
        assert caught[0].lineno == _deprecated_call.__code__.co_firstlineno + 2


def test_deprecation_warning_is_shown_by_pythons_default_filters():
    # DeprecationWarning is shown by default only when attributed to __main__: the user's script
    script = ("import torch, sparsevd\n"
              "model = torch.nn.Sequential(sparsevd.SparseVDLinear(4, 3))\n"
              "loss_fn = sparsevd.SGVLBLoss(model, 100)\n"
              "loss_fn(model(torch.randn(2, 4)), torch.tensor([0, 1]), kl_weight=0.5)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "<string>:4: DeprecationWarning: SGVLBLoss(...)(output, target, kl_weight=w) is now warmup=w" in done.stderr


def test_collapse_warning_points_at_the_users_line():
    torch.manual_seed(0)
    model = nn.Sequential(sparsevd.SparseVDLinear(20, 10, log_sigma2_init=5.0))  # every weight pruned
    loss_fn = sparsevd.SGVLBLoss(model, dataset_size=640, check_collapse_every=1)
    out, y = torch.randn(32, 10), torch.zeros(32, dtype=torch.long)
    out[:, 1] += 10  # always the wrong class: at chance
    caught = _recorded(lambda: loss_fn(out, y))
    assert [w.category for w in caught] == [sparsevd.CollapseWarning]
    assert caught[0].filename == HERE


def test_extension_version_warning_points_at_the_users_line(monkeypatch):
    import sparsevd._build_info as build

    # load() sets the module's state: restored after the test
    monkeypatch.setattr(extension, "ERROR", extension.ERROR)
    monkeypatch.setattr(extension, "WITH_CUDA", extension.WITH_CUDA)
    monkeypatch.setattr(build, "TORCH_VERSION", "0.0.0")
    caught = _recorded(lambda: extension.load())
    assert [w.category for w in caught] == [RuntimeWarning] and "built against torch 0.0.0" in str(caught[0].message)
    assert caught[0].filename == HERE


def test_plain_model_warning_points_at_the_users_line():
    caught = _recorded(lambda: require_pruning_layers(nn.Linear(2, 2), "sparsify", warn=True))
    assert [w.category for w in caught] == [UserWarning]
    assert caught[0].filename == HERE and str(caught[0].message).startswith("sparsify: Linear has no SparseVD")


def test_convert_warnings_point_at_the_users_line():
    pruned_at_once = _recorded(lambda: sparsevd.convert(nn.Sequential(nn.Linear(8, 8)), log_sigma2_init=-3.0))
    assert [w.filename for w in pruned_at_once] == [HERE] and "pruned at once" in str(pruned_at_once[0].message)
    lstm_model = nn.ModuleDict({"rnn": nn.LSTM(16, 16), "head": nn.Linear(16, 2)})
    unconvertible = _recorded(lambda: sparsevd.convert(lstm_model))
    assert [w.filename for w in unconvertible] == [HERE] and "cannot convert" in str(unconvertible[0].message)


def test_warn_outside_the_package_is_the_callers_line():
    caught = _recorded(lambda: _warnings.warn("here", FutureWarning))
    assert caught[0].filename == HERE and caught[0].category is FutureWarning


# --- layer attributes: checked when set --------------------------------------------------------------------------

LAYERS = {
    "linear": lambda: sparsevd.SparseVDLinear(4, 3),
    "linear_unit": lambda: sparsevd.SparseVDLinear(4, 3, alpha="unit"),
    "conv1d": lambda: sparsevd.SparseVDConv1d(4, 3, 3),
    "conv2d": lambda: sparsevd.SparseVDConv2d(4, 3, 3),
    "sbp": lambda: sparsevd.SBPDropout(4),
}
NAMES = {"linear": "SparseVDLinear", "linear_unit": "SparseVDLinear", "conv1d": "SparseVDConv1d",
         "conv2d": "SparseVDConv2d", "sbp": "SBPDropout"}
GOOD_NUMBERS = [(2, 2.0), (2.5, 2.5), (np.float32(1.5), 1.5), (np.int64(2), 2.0), (torch.tensor(0.5), 0.5),
                (torch.tensor(3), 3.0), (-1e3, -1e3)]
BAD_NUMBERS = [("abc", TypeError), (None, TypeError), (True, TypeError), (np.bool_(True), TypeError),
               (torch.tensor([1.0, 2.0]), TypeError), (torch.tensor(True), TypeError), (1j, TypeError),
               (float("nan"), ValueError), (float("inf"), ValueError), (-float("inf"), ValueError),
               (torch.tensor(float("nan")), ValueError), (np.float64("nan"), ValueError)]


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("value, expected", GOOD_NUMBERS)
def test_threshold_accepts_real_numbers_as_floats(kind, value, expected):
    layer = LAYERS[kind]()
    layer.threshold = value
    assert type(layer.threshold) is float and layer.threshold == expected
    assert f"threshold={expected}" in repr(layer)
    built = LAYERS[kind]().__class__(*(_args(kind)), threshold=value)
    assert built.threshold == expected


def _args(kind):
    return {"linear": (4, 3), "linear_unit": (4, 3), "conv1d": (4, 3, 3), "conv2d": (4, 3, 3), "sbp": (4,)}[kind]


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("value, error", BAD_NUMBERS)
def test_bad_threshold_is_refused_when_set(kind, value, error):
    layer = LAYERS[kind]()
    before = layer.threshold
    with pytest.raises(error, match=rf"^{NAMES[kind]}: threshold must be a finite real number"):
        layer.threshold = value
    assert layer.threshold == before  # the layer keeps working with its old value
    with pytest.raises(error, match=f"{NAMES[kind]}: threshold"):
        LAYERS[kind]().__class__(*_args(kind), threshold=value)


def test_nan_threshold_no_longer_prunes_silently():
    layer = sparsevd.SparseVDLinear(4, 3)
    with pytest.raises(ValueError, match="threshold"):
        layer.threshold = float("nan")
    assert layer.kept_weights() == layer.total_weights()  # log σ² = -10 at init: nothing pruned


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_log_alpha_range_is_checked_when_set(kind):
    layer = LAYERS[kind]()
    layer.log_alpha_range = (np.float32(-8), torch.tensor(8.0))
    assert layer.log_alpha_range == (-8.0, 8.0) and all(type(v) is float for v in layer.log_alpha_range)
    for bad, error in [((5, -5), ValueError), ((1, 1), ValueError), ((float("nan"), 1), ValueError),
                       (("a", 1), TypeError), ((True, 2), TypeError), (3.0, TypeError), ((1, 2, 3), TypeError),
                       (None, TypeError)]:
        with pytest.raises(error, match=f"{NAMES[kind]}: log_alpha_range must be two finite numbers"):
            layer.log_alpha_range = bad
    assert layer.log_alpha_range == (-8.0, 8.0)


def test_sbp_bounds_and_dim_are_checked_when_set():
    layer = sparsevd.SBPDropout(4)
    layer.bounds = (np.int64(-10), 0)
    assert layer.bounds == (-10.0, 0.0)
    for bad, error in [((0, 0), ValueError), ((1, -1), ValueError), ((-float("inf"), 0), ValueError),
                       ("ab", TypeError), (-20, TypeError)]:
        with pytest.raises(error, match="SBPDropout: bounds must be two finite numbers"):
            layer.bounds = bad
    layer.dim = np.int64(-1)
    assert layer.dim == -1 and type(layer.dim) is int
    for bad, error in [(1.0, TypeError), ("1", TypeError), (True, TypeError), (None, TypeError)]:
        with pytest.raises(error, match="SBPDropout: dim must be an int"):
            layer.dim = bad
    assert layer(torch.randn(2, 3, 4)).shape == (2, 3, 4)


def test_conv_geometry_is_checked_when_set():
    layer = sparsevd.SparseVDConv2d(4, 6, 3, groups=2)
    x = torch.randn(2, 4, 7, 7)
    layer.stride, layer.padding = np.int64(2), (1, 0)
    assert layer.stride == (2, 2) and layer.padding == (1, 0) and layer(x).shape == (2, 6, 4, 3)
    for name, bad, error, match in [
        ("stride", 0, ValueError, "stride must be an int ≥ 1"),
        ("stride", 1.5, TypeError, "stride must be an int ≥ 1"),
        ("padding", "same", ValueError, "padding='same' is not supported for strided"),
        ("padding", -1, ValueError, "padding must be an int ≥ 0"),
        ("dilation", (1, 1, 1), ValueError, "dilation must be an int ≥ 1 or a tuple of 2"),
        ("groups", 3, ValueError, "groups=3 must divide"),
        ("groups", 1, ValueError, r"groups=1 does not fit the weight of shape \(6, 2, 3, 3\)"),
        ("groups", 2.0, TypeError, "groups must be an int ≥ 1"),
        ("padding_mode", "mirror", ValueError, "padding_mode must be one of"),
        ("padding_mode", None, ValueError, "padding_mode must be one of"),
    ]:
        with pytest.raises(error, match=f"SparseVDConv2d: {match}"):
            setattr(layer, name, bad)
    assert layer.stride == (2, 2) and layer.padding == (1, 0) and layer.groups == 2  # unchanged
    layer.stride, layer.padding, layer.padding_mode = 1, "same", "reflect"
    assert layer(x).shape == (2, 6, 7, 7)


@pytest.mark.parametrize("kind", LAYERS)
def test_checked_attributes_survive_state_dict_deepcopy_and_pickle(kind):
    layer = LAYERS[kind]()
    layer.threshold = 1.25
    keys = list(layer.state_dict())
    assert not any("threshold" in k or "geometry" in k for k in keys)
    for copied in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert copied.threshold == 1.25 and repr(copied) == repr(layer)
        with pytest.raises(ValueError, match="threshold"):
            copied.threshold = float("nan")
    fresh = LAYERS[kind]()
    fresh.load_state_dict(layer.state_dict())
    assert list(fresh.state_dict()) == keys


@pytest.mark.parametrize("kind", LAYERS)
def test_layers_pickled_before_the_checked_properties_still_load(kind):
    layer = LAYERS[kind]()
    layer.threshold = 1.25
    state = dict(copy.deepcopy(layer).__dict__)
    for name in ("threshold", "log_alpha_range", "bounds", "dim"):  # the plain attributes of before
        if "_" + name in state:
            state[name] = state.pop("_" + name)
    if "_geometry" in state:
        state.update(state.pop("_geometry"))
    old = layer.__class__.__new__(layer.__class__)
    old.__setstate__(state)
    assert old.threshold == 1.25 and repr(old) == repr(layer)
    x = torch.randn(2, 4, 5) if kind.startswith("conv1d") else torch.randn(2, 4, 5, 5) if kind == "conv2d" \
        else torch.randn(2, 4)
    torch.testing.assert_close(old.eval()(x), layer.eval()(x))


# --- sizes ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, error, match", [
    (lambda: sparsevd.SparseVDLinear(0, 5), ValueError, "SparseVDLinear: in_features must be an int ≥ 1, got 0"),
    (lambda: sparsevd.SparseVDLinear(5, 0), ValueError, "SparseVDLinear: out_features must be an int ≥ 1, got 0"),
    (lambda: sparsevd.SparseVDLinear(-2, 5), ValueError, "in_features must be an int ≥ 1"),
    (lambda: sparsevd.SparseVDLinear(2.5, 5), TypeError, r"in_features must be an int ≥ 1, got 2.5 \(float\)"),
    (lambda: sparsevd.SparseVDLinear(4.0, 5), TypeError, "in_features must be an int"),
    (lambda: sparsevd.SparseVDLinear(True, 5), TypeError, "in_features must be an int"),
    (lambda: sparsevd.SparseVDLinear("4", 5), TypeError, "in_features must be an int"),
    (lambda: sparsevd.SparseVDLinear(4, 5, dtype=torch.int64), TypeError, "SparseVDLinear: dtype must be a float"),
    (lambda: sparsevd.SparseVDConv2d(0, 5, 3), ValueError, "SparseVDConv2d: in_channels must be an int ≥ 1"),
    (lambda: sparsevd.SparseVDConv2d(4, 0, 3), ValueError, "SparseVDConv2d: out_channels must be an int ≥ 1"),
    (lambda: sparsevd.SparseVDConv2d(4.0, 5, 3), TypeError, "SparseVDConv2d: in_channels must be an int"),
    (lambda: sparsevd.SparseVDConv1d(4, 5, 2.5), TypeError, "SparseVDConv1d: kernel_size must be an int ≥ 1"),
    (lambda: sparsevd.SparseVDConv1d(4, 5, None), TypeError, "SparseVDConv1d: kernel_size must be an int ≥ 1"),
    (lambda: sparsevd.SparseVDConv2d(4, 5, (3, 0)), ValueError, "kernel_size must be an int ≥ 1"),
    (lambda: sparsevd.SparseVDConv2d(4, 5, 3, groups=True), TypeError, "groups must be an int ≥ 1"),
    (lambda: sparsevd.SparseVDConv2d(4, 5, 3, dtype=torch.bool), TypeError, "SparseVDConv2d: dtype must be"),
    (lambda: sparsevd.SBPDropout(0), ValueError, "SBPDropout: num_features must be an int ≥ 1"),
    (lambda: sparsevd.SBPDropout(4.0), TypeError, "SBPDropout: num_features must be an int ≥ 1"),
    (lambda: sparsevd.SBPDropout(4, dtype=torch.int32), TypeError, "SBPDropout: dtype must be"),
    (lambda: sparsevd.SBPDropout(4, mu_init="0"), TypeError, "SBPDropout: mu_init must be a finite real"),
    (lambda: sparsevd.SparseVDLinear(4, 5, log_sigma2_init="-10"), TypeError, "log_sigma2_init must be a finite"),
    (lambda: sparsevd.SparseVDLinear(4, 5, log_alpha_range=5), TypeError, "log_alpha_range must be two finite"),
])
def test_bad_sizes_and_arguments_are_refused(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_integral_sizes_of_any_kind_are_accepted():
    linear = sparsevd.SparseVDLinear(np.int64(4), torch.tensor(3))
    assert (linear.in_features, linear.out_features) == (4, 3) and type(linear.in_features) is int
    conv = sparsevd.SparseVDConv2d(np.int32(4), 6, (np.int64(3), 1), stride=np.int64(2), groups=np.int64(2))
    assert conv.kernel_size == (3, 1) and conv.stride == (2, 2) and conv.groups == 2 and type(conv.groups) is int
    assert conv(torch.randn(1, 4, 5, 5)).shape == (1, 6, 2, 3)
    assert sparsevd.SBPDropout(np.int64(4)).num_features == 4


# --- dataset_size and the loss's numbers ------------------------------------------------------------------------

@pytest.mark.parametrize("size", [1000, np.int64(1000), np.int32(1000), np.uint16(1000), torch.tensor(1000),
                                  torch.tensor(1000, dtype=torch.int32)])
def test_dataset_size_of_any_integral_type(size):
    model = _mlp()
    out, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    expected = nn.functional.cross_entropy(out, y) + sparsevd.kl_divergence(model) / 1000
    loss_fn = sparsevd.SGVLBLoss(model, size)
    assert loss_fn.dataset_size == 1000 and type(loss_fn.dataset_size) is int
    torch.testing.assert_close(loss_fn(out, y), expected)
    torch.testing.assert_close(sparsevd.sgvlb(nn.functional.cross_entropy(out, y), model, size), expected)


@pytest.mark.parametrize("size, error", [(1000.0, TypeError), (np.float64(1000), TypeError), (True, TypeError),
                                         (torch.tensor(1000.0), TypeError), ("1000", TypeError), (None, TypeError),
                                         (torch.tensor([1000]), TypeError), (0, ValueError), (-5, ValueError),
                                         (np.int64(0), ValueError), (torch.tensor(0), ValueError)])
def test_bad_dataset_size_is_refused(size, error):
    model = _mlp()
    match = "dataset_size must be a positive int \\(the training-set size N\\)"
    with pytest.raises(error, match=f"SGVLBLoss: {match}"):
        sparsevd.SGVLBLoss(model, size)
    with pytest.raises(error, match=f"sgvlb: {match}"):
        sparsevd.sgvlb(torch.tensor(0.5), model, size)
    loss_fn = sparsevd.SGVLBLoss(model, 10)
    with pytest.raises(error, match=f"SGVLBLoss: {match}"):
        loss_fn.dataset_size = size
    assert loss_fn.dataset_size == 10


def test_loss_numbers_are_checked():
    model = _mlp()
    loss_fn = sparsevd.SGVLBLoss(model, 10, kl_weight=np.float32(0.5))
    assert loss_fn.kl_weight == 0.5 and type(loss_fn.kl_weight) is float
    out, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    torch.testing.assert_close(loss_fn(out, y, torch.tensor(0.5)), loss_fn(out, y, 0.5))
    for bad, error in [("abc", TypeError), (True, TypeError), (-1, ValueError), (float("nan"), ValueError)]:
        with pytest.raises(error, match="SGVLBLoss: kl_weight must be a finite number ≥ 0"):
            loss_fn.kl_weight = bad
        with pytest.raises(error, match="SGVLBLoss: warmup must be a finite number ≥ 0"):
            loss_fn(out, y, bad)
    with pytest.raises(TypeError, match="sgvlb: nll must be a tensor"):
        sparsevd.sgvlb(0.7, model, 10)
    with pytest.raises(TypeError, match="SGVLBLoss: criterion must be a callable"):
        sparsevd.SGVLBLoss(model, 10, criterion="mse")


def test_kl_warmup_numbers_are_checked():
    warmup = sparsevd.KLWarmup(np.int64(1), torch.tensor(3.0), max_weight=np.float32(0.5))
    assert (warmup.start, warmup.end, warmup.max_weight) == (1.0, 3.0, 0.5)
    assert warmup(np.float64(2.0)) == warmup(torch.tensor(2.0)) == warmup(2) == 0.25
    for kwargs, error, match in [({"start": "0"}, TypeError, "KLWarmup: start must be a finite real"),
                                 ({"end": True}, TypeError, "KLWarmup: end must be a finite real"),
                                 ({"end": float("inf")}, ValueError, "KLWarmup: end must be a finite real"),
                                 ({"max_weight": None}, TypeError, "KLWarmup: max_weight must be a finite real"),
                                 ({"start": -1}, ValueError, "KLWarmup: need 0 ≤ start ≤ end")]:
        with pytest.raises(error, match=match):
            sparsevd.KLWarmup(**kwargs)
    for bad, error in [(float("nan"), ValueError), ("1", TypeError), (None, TypeError)]:
        with pytest.raises(error, match="KLWarmup: epoch must be a finite real number"):
            warmup(bad)  # NaN used to give a NaN KL weight


def test_freeze_noise_must_be_a_bool():
    model = _mlp()
    for bad in ("yes", 1, None):
        with pytest.raises(TypeError, match="freeze_masks: noise must be True or False"):
            sparsevd.freeze_masks(model, noise=bad)
        with pytest.raises(TypeError, match=r"SparseVDLinear.freeze_mask: noise must be True or False"):
            model[0].freeze_mask(noise=bad)
        with pytest.raises(TypeError, match=r"SBPDropout.freeze_mask: noise must be True or False"):
            sparsevd.SBPDropout(3).freeze_mask(noise=bad)
    assert model[0].frozen_mask is None  # nothing frozen by a refused call
    assert all(layer.frozen_noise is True for layer in sparsevd.freeze_masks(model, noise=np.bool_(True)))


# --- plain models ---------------------------------------------------------------------------------------------------

PLAIN = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


@pytest.mark.parametrize("call, what", [
    (lambda m: sparsevd.SGVLBLoss(m, 100), "SGVLBLoss"),
    (sparsevd.compression, "compression"),
    (sparsevd.kl_divergence, "kl_divergence"),
    (lambda m: sparsevd.sgvlb(torch.tensor(0.5), m, 100), "kl_divergence"),
    (sparsevd.freeze_masks, "freeze_masks"),
    (sparsevd.unfreeze_masks, "unfreeze_masks"),
])
def test_plain_models_are_refused_with_what_to_do(call, what):
    with pytest.raises(ValueError, match=f"^{what}: Sequential has no SparseVD layers and no SBPDropout layers, "
                                         "so nothing in it is pruned; convert it first") as error:
        call(PLAIN)
    assert "sparsevd.convert(model)" in str(error.value)


def test_compression_of_a_plain_model_says_how_to_count_it():
    with pytest.raises(ValueError, match=r"sparsevd.report\(model\).total counts the kept weights of any model"):
        sparsevd.compression(PLAIN)
    assert sparsevd.report(PLAIN).total["kept"] == 4 * 3 + 3 * 2  # the way it points to works


def test_models_with_only_sbp_layers_are_not_plain():
    model = nn.Sequential(nn.Linear(4, 3), sparsevd.SBPDropout(3))
    sparsevd.SGVLBLoss(model, 100)
    assert sparsevd.compression(model)[1] == 12


def test_require_pruning_layers_lists_the_layers():
    model = nn.Sequential(sparsevd.SparseVDLinear(4, 3), sparsevd.SBPDropout(3))
    assert require_pruning_layers(model, "f") == [("0", model[0]), ("1", model[1])]
    assert require_pruning_layers(model, "f", warn=True) == [("0", model[0]), ("1", model[1])]
    with pytest.warns(UserWarning, match="^sparsify: Sequential has no SparseVD"):
        assert require_pruning_layers(PLAIN, "sparsify", warn=True) == []


@pytest.mark.parametrize("call, what", [
    (lambda m: sparsevd.SGVLBLoss(m, 100), "SGVLBLoss"), (sparsevd.compression, "compression"),
    (sparsevd.kl_divergence, "kl_divergence"), (sparsevd.freeze_masks, "freeze_masks"),
    (sparsevd.report, "report"), (sparsevd.sparsevd_modules, "sparsevd_modules"),
    (sparsevd.sbp_modules, "sbp_modules"), (lambda m: require_pruning_layers(m, "sparsify", warn=True), "sparsify"),
])
def test_a_model_that_is_no_module_is_a_type_error(call, what):
    for bad in (lambda x: x, [nn.Linear(2, 2)], None):
        with pytest.raises(TypeError, match=f"^{what} expects an nn.Module, got"):
            call(bad)


def test_report_of_a_model_without_layers_says_so():
    with pytest.raises(ValueError, match="ReLU has no linear layers or convolutions to report on"):
        sparsevd.report(nn.ReLU())


# --- input errors name the layer the user called, in every mode ---------------------------------------------------

def _mode(layer, mode):
    if mode.startswith("frozen"):
        layer.freeze_mask(noise=mode == "frozen_noise")
    return layer.train(mode != "eval")


MODES = ["train", "eval", "frozen", "frozen_noise"]
WRONG = {  # a layer, a wrong input and what the message says
    "linear": (lambda: sparsevd.SparseVDLinear(4, 3), torch.randn(2, 5),
               r"SparseVDLinear: expected input of shape \[\*, 4\] \(in_features = 4\), got \(2, 5\)"),
    "linear_layer": (lambda: sparsevd.SparseVDLinear(4, 3, alpha="layer"), torch.randn(5),
                     r"SparseVDLinear: expected input of shape \[\*, 4\]"),
    "linear_fixed": (lambda: sparsevd.SparseVDLinear(4, 3, alpha=0.5, bias=False), torch.randn(2, 3, 1),
                     r"SparseVDLinear: expected input of shape \[\*, 4\]"),
    "conv1d": (lambda: sparsevd.SparseVDConv1d(4, 3, 3), torch.randn(2, 5, 7),
               "SparseVDConv1d: expected input with 4 channels"),
    "conv2d": (lambda: sparsevd.SparseVDConv2d(4, 3, 3, padding_mode="reflect", padding=1), torch.randn(2, 5, 6, 6),
               "SparseVDConv2d: expected input with 4 channels"),
    "conv2d_small": (lambda: sparsevd.SparseVDConv2d(4, 3, 3), torch.randn(2, 4, 2, 6),
                     "SparseVDConv2d: input of spatial size .* is smaller than the dilated kernel"),
    "sbp": (lambda: sparsevd.SBPDropout(4), torch.randn(2, 5), "SBPDropout: expected 4 units along dim 1"),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", WRONG)
def test_a_wrong_input_names_the_layer_in_every_mode(kind, mode):
    make, x, match = WRONG[kind]
    layer = _mode(make(), mode)
    with pytest.raises(ValueError, match=f"^{match}"):
        layer(x)
    with pytest.raises(ValueError, match=f"^{match}"):
        nn.Sequential(layer)(x)  # inside a model, still the layer's name


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["linear", "conv2d", "sbp"])
def test_a_wrong_input_type_names_the_layer_in_every_mode(kind, mode):
    make, x, _ = WRONG[kind]
    name = NAMES[kind]
    layer = _mode(make(), mode)
    with pytest.raises(TypeError, match=f"^{name}: input must be a torch.Tensor, got list"):
        layer(x.tolist())
    with pytest.raises(TypeError, match=f"^{name}: input must be a floating-point tensor"):
        layer(torch.ones(2, 4, 6, 6, dtype=torch.long) if kind == "conv2d" else torch.ones(2, 4, dtype=torch.long))
    if kind != "sbp":  # SBPDropout multiplies in the input's dtype
        right = torch.randn(2, 4, 6, 6) if kind == "conv2d" else torch.randn(2, 4)
        match = f"^{name}: input has dtype torch.float64 but weight has dtype torch.float32"
        with pytest.raises(TypeError, match=match):
            layer(right.double())


@pytest.mark.parametrize("mode", MODES)
def test_right_input_still_runs_in_every_mode(mode):
    for kind, (make, x, _) in WRONG.items():
        layer = _mode(make(), mode)
        right = {"linear_layer": torch.randn(4), "linear_fixed": torch.randn(2, 3, 4),
                 "conv2d_small": torch.randn(2, 4, 3, 6)}.get(kind, None)
        if right is None:
            right = torch.randn(*x.shape[:1], 4, *x.shape[2:])
        assert torch.isfinite(layer(right)).all()


# --- the rest of the public API ---------------------------------------------------------------------------------

def test_gaussian_likelihood_arguments():
    assert sparsevd.GaussianLikelihood(np.float32(0.5)).extra_repr() == "variance=0.5"
    assert sparsevd.GaussianLikelihood(torch.tensor(0.5)).extra_repr() == "variance=0.5"
    assert sparsevd.GaussianLikelihood(num_outputs=np.int64(2)).log_variance.shape == (2,)
    for kwargs, error, match in [({"init_variance": True}, TypeError, "init_variance must be a finite number > 0"),
                                 ({"init_variance": "1"}, TypeError, "init_variance must be a finite number > 0"),
                                 ({"init_variance": 0}, ValueError, "init_variance must be a finite number > 0"),
                                 ({"num_outputs": 2.0}, TypeError, "num_outputs must be a positive int"),
                                 ({"variance": None}, TypeError, "variance must be a number > 0, 'learned' or"),
                                 ({"variance": np.float64(-1)}, ValueError, "a fixed variance must be a finite")]:
        with pytest.raises(error, match=f"GaussianLikelihood: {match}"):
            sparsevd.GaussianLikelihood(**kwargs)
    likelihood = sparsevd.GaussianLikelihood()
    with pytest.raises(TypeError, match="GaussianLikelihood: the output must be a tensor, got list"):
        likelihood([[1.0]], torch.zeros(1, 1))
    with pytest.raises(TypeError, match="GaussianLikelihood: the target must be a tensor, got float"):
        likelihood(torch.zeros(1, 1), 1.0)
    with pytest.raises(TypeError, match="GaussianLikelihood: the output must be a tensor, got tuple"):
        likelihood.split((torch.zeros(1, 1),))


def test_predict_accepts_numpy_sample_counts():
    model = nn.Sequential(sparsevd.SparseVDLinear(3, 2))
    out = sparsevd.predict(model, torch.randn(2, 3), samples=np.int64(4), batch_samples=np.int32(2),
                           return_samples=True)
    assert out.samples.shape == (4, 2, 2)


def test_functional_seeds_and_ranges_are_checked():
    layer = sparsevd.SparseVDLinear(4, 3)
    x, w, s = torch.randn(2, 4), layer.weight, layer.log_sigma2
    lrt = sparsevd.functional.lrt_linear
    torch.testing.assert_close(lrt(x, w, s, seed=np.int64(7)), lrt(x, w, s, seed=7))
    for bad, error in [(1.5, TypeError), ("7", TypeError), (True, TypeError)]:  # 1.5 used to run as seed 1
        with pytest.raises(error, match="lrt_linear: seed must be an int or a one-element int64 tensor"):
            lrt(x, w, s, seed=bad)
    with pytest.raises(TypeError, match="sbp_sample: seed must be an int"):
        sparsevd.sbp.sbp_sample(torch.zeros(3), torch.zeros(3), 2, seed=0.5)
    with pytest.raises(TypeError, match="lrt_sample_noise: seed must be an int"):
        sparsevd.functional.lrt_sample_noise(torch.zeros(3), 0.5)
    for bad, error in [((1, "a"), TypeError), ((1, 0), ValueError), (None, TypeError)]:
        with pytest.raises(error, match="kl_divergence: log_alpha_range must be two finite numbers"):
            sparsevd.functional.kl_divergence(w, s, bad)


def test_alpha_errors_name_the_layer():
    with pytest.raises(ValueError, match="^SparseVDConv2d: alpha must be 'weight', 'unit', 'layer'"):
        sparsevd.SparseVDConv2d(4, 3, 3, alpha="units")
    with pytest.raises(TypeError, match="^SparseVDLinear: alpha must be"):
        sparsevd.SparseVDLinear(4, 3, alpha=None)
    assert sparsevd.SparseVDLinear(4, 3, alpha=np.float32(0.5)).alpha == pytest.approx(0.5)
    with pytest.raises(TypeError, match="^SparseVDLinear.from_linear expects an nn.Linear, got Conv2d"):
        sparsevd.SparseVDLinear.from_linear(nn.Conv2d(1, 1, 1))


def test_sparsify_of_a_plain_model_warns_at_the_users_line():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = sparsevd.sparsify(PLAIN)
    ours = [w for w in caught if "sparsify: Sequential has no SparseVD layers" in str(w.message)]
    assert len(ours) == 1 and ours[0].filename == HERE, [(str(w.message), w.filename) for w in caught]
    assert "sparsify returns a copy" in str(ours[0].message)
    x = torch.randn(5, 4)
    torch.testing.assert_close(fast(x), PLAIN(x))
