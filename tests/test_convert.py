"""convert(): trained nn.Linear / nn.Conv1d / nn.Conv2d / nn.MultiheadAttention / nn.Embedding
layers become SparseVD layers that compute the same thing in eval mode (with SBP too), tied
weights stay tied, and the report says what was converted and what was not."""

import warnings

import pytest
import torch
from torch import nn

import sparsevd
from sparsevd.conv import SparseVDConv1d, SparseVDConv2d


def _mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 7), nn.Tanh(),
                         nn.Linear(7, 3, bias=False)).to(dtype)


class _CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 8, (3, 2), stride=2, padding="valid", groups=2, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 4, 3, padding="same", dilation=2, padding_mode="reflect"),
        )
        self.head = nn.Conv1d(4, 5, 2)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(5 * 8, 10), nn.ReLU(), nn.Linear(10, 4))

    def forward(self, x):
        h = self.features(x)  # [N, 4, 3, 3]
        return self.classifier(self.head(h.flatten(2)))


def _cnn():
    torch.manual_seed(0)
    model = _CNN()
    model.features[4].running_mean.uniform_(-0.5, 0.5)  # BatchNorm statistics a trained net would have
    model.features[4].running_var.uniform_(0.5, 2.0)
    return model.eval()


def _convert_quietly(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no material pruning at once at these settings
        return sparsevd.convert(model, **kwargs)


def _pruned(model):
    return sum(layer.total_weights() - layer.kept_weights() for _, layer in sparsevd.sparsevd_modules(model))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mlp_round_trip(dtype):
    model = _mlp(dtype).eval()
    x = torch.randn(4, 5, dtype=dtype)
    converted = _convert_quietly(model).eval()
    assert _pruned(converted) == 0
    kinds = [type(m) for m in converted]
    assert kinds == [sparsevd.SparseVDLinear, nn.ReLU, nn.Dropout, sparsevd.SparseVDLinear, nn.Tanh,
                     sparsevd.SparseVDLinear]
    assert converted[0].weight.dtype == dtype and converted[5].bias is None
    assert type(model[0]) is nn.Linear and type(model[5]) is nn.Linear, "the original is unchanged"
    torch.testing.assert_close(converted(x), model(x), rtol=0, atol=0)


def test_cnn_round_trip():
    model = _cnn()
    x = torch.randn(2, 3, 16, 15)
    converted = _convert_quietly(model, log_sigma2_init=-20.0).eval()
    assert _pruned(converted) == 0
    assert isinstance(converted.features[0], SparseVDConv2d)
    assert isinstance(converted.features[3], SparseVDConv2d) and converted.features[3].groups == 2
    assert isinstance(converted.features[6], SparseVDConv2d)
    assert converted.features[6].padding_mode == "reflect"
    assert isinstance(converted.head, SparseVDConv1d)
    assert isinstance(converted.classifier[1], sparsevd.SparseVDLinear)
    assert isinstance(converted.features[4], nn.BatchNorm2d)
    torch.testing.assert_close(converted(x), model(x), rtol=1e-6, atol=1e-6)
    assert len(sparsevd.sparsevd_modules(converted)) == 6


def test_cnn_at_the_recommended_init_prunes_only_negligible_weights():
    model = _cnn()
    x = torch.randn(2, 3, 16, 15)
    converted = _convert_quietly(model).eval()  # log σ² = −10 prunes |θ| < 1.5e-3 at once
    assert _pruned(converted) > 0, "the test needs some tiny weights"
    torch.testing.assert_close(converted(x), model(x), rtol=0, atol=1e-3 * model(x).abs().max().item())


def test_converted_model_trains_with_the_kl_term():
    converted = _convert_quietly(_cnn()).train()
    loss_fn = sparsevd.SGVLBLoss(converted, dataset_size=100)
    loss = loss_fn(converted(torch.randn(3, 3, 16, 15)), torch.tensor([0, 1, 3]))
    loss.backward()
    for _, layer in sparsevd.sparsevd_modules(converted):
        assert layer.log_sigma2.grad is not None and torch.isfinite(layer.log_sigma2.grad).all()


def test_inplace_and_copy():
    model = _mlp()
    copy = _convert_quietly(model)
    assert copy is not model and isinstance(model[0], nn.Linear)
    same = _convert_quietly(model, inplace=True)
    assert same is model and isinstance(model[0], sparsevd.SparseVDLinear)


def test_options_reach_the_layers():
    converted = _convert_quietly(_mlp(), log_sigma2_init=-9.0, threshold=2.5, alpha="unit")
    layer = converted[0]
    assert layer.threshold == 2.5 and layer.variant == "unit" and layer.log_sigma2_init == -9.0
    fixed = _convert_quietly(_mlp(), alpha=0.1)
    assert fixed[3].alpha == pytest.approx(0.1)
    x = torch.randn(2, 5)
    torch.testing.assert_close(converted.eval()(x), _mlp().eval()(x))


def test_include_and_exclude_by_name_and_type():
    model = _cnn()
    kept_last = _convert_quietly(model, exclude="classifier.3")
    assert type(kept_last.classifier[3]) is nn.Linear and isinstance(kept_last.classifier[1], sparsevd.SparseVDLinear)
    convs = _convert_quietly(model, include=nn.Conv2d)
    assert isinstance(convs.features[0], SparseVDConv2d)
    assert type(convs.head) is nn.Conv1d and type(convs.classifier[1]) is nn.Linear
    features = _convert_quietly(model, include=["features.*"], exclude=["features.0", nn.Conv1d])
    assert type(features.features[0]) is nn.Conv2d and isinstance(features.features[3], SparseVDConv2d)
    assert type(features.head) is nn.Conv1d and type(features.classifier[1]) is nn.Linear


def test_the_model_itself_and_shared_layers():
    torch.manual_seed(0)
    linear = nn.Linear(4, 4)
    assert isinstance(_convert_quietly(linear), sparsevd.SparseVDLinear)
    shared = nn.Sequential(linear, nn.ReLU(), linear)
    converted = _convert_quietly(shared)
    assert converted[0] is converted[2] and isinstance(converted[0], sparsevd.SparseVDLinear)


def test_modes_and_frozen_parameters_are_kept():
    model = _mlp()
    model[0].eval()
    model[3].weight.requires_grad_(False)
    converted = _convert_quietly(model)
    assert converted.training and not converted[0].training and converted[3].training
    assert not converted[3].weight.requires_grad and converted[3].bias.requires_grad


class _Doubled(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def test_subclasses_are_left_alone_and_reported():
    torch.manual_seed(0)
    model = nn.ModuleDict({"custom": _Doubled(8, 8), "out": nn.Linear(8, 2)})
    with pytest.warns(UserWarning, match=r"80% of ModuleDict's weights are in modules it cannot convert \(_Doubled"):
        converted = sparsevd.convert(model)
    assert type(converted["custom"]) is _Doubled and isinstance(converted["out"], sparsevd.SparseVDLinear)
    assert converted.sparsevd_conversion.unsupported == {"_Doubled (custom parameters)": ["custom"]}


def test_attention_is_converted_whole_with_its_output_projection():
    torch.manual_seed(0)
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2), "out": nn.Linear(8, 2)})
    model["attn"].in_proj_weight.requires_grad_(False)
    converted = _convert_quietly(model)
    attention = converted["attn"]
    assert isinstance(attention, sparsevd.SparseVDMultiheadAttention)
    assert all(isinstance(getattr(attention, p), sparsevd.SparseVDLinear) for p in ("q_proj", "k_proj", "v_proj",
                                                                                   "out_proj"))
    assert not attention.q_proj.weight.requires_grad and attention.q_proj.bias.requires_grad
    assert attention.out_proj.weight.requires_grad
    assert converted.sparsevd_conversion.converted == {
        "attn": "nn.MultiheadAttention → SparseVDMultiheadAttention", "out": "nn.Linear → SparseVDLinear"}


def test_high_log_sigma2_init_warns_and_names_the_layers():
    model = _mlp().eval()
    x = torch.randn(8, 5)
    with pytest.warns(UserWarning, match=r"log_sigma2_init=-3.0 .*pruned at once \(0: \d+ of 80 weights, \d+\.\d% of "
                                         r"the weight norm; 3: \d+ of 112 weights"):
        converted = sparsevd.convert(model, log_sigma2_init=-3.0)
    assert not torch.allclose(converted.eval()(x), model(x))


def test_zero_weights_pruned_at_once_do_not_warn():
    model = _mlp().eval()
    with torch.no_grad():
        model[0].weight[:, :2] = 0  # pruned at any log_sigma2_init, but the output does not change
    converted = _convert_quietly(model)
    assert converted[0].kept_weights() == 48
    x = torch.randn(3, 5)
    torch.testing.assert_close(converted.eval()(x), model(x), rtol=0, atol=0)


def test_bad_arguments():
    with pytest.raises(TypeError, match="convert expects an nn.Module"):
        sparsevd.convert(torch.randn(3))
    with pytest.raises(ValueError, match="include pattern.*'classifier.9'"):
        sparsevd.convert(_cnn(), include=["features.0", "classifier.9"])
    with pytest.raises(ValueError, match="exclude pattern.*'fc'"):
        sparsevd.convert(_mlp(), exclude="fc")
    with pytest.raises(TypeError, match="include entries must be module name patterns"):
        sparsevd.convert(_mlp(), include=[0])
    with pytest.raises(TypeError, match="exclude must be a module name pattern"):
        sparsevd.convert(_mlp(), exclude=3)
    with pytest.raises(ValueError, match="Sequential has no layer to convert"):
        sparsevd.convert(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match=r"no layer to convert .*; include=None, exclude=nn.Linear\)$"):
        sparsevd.convert(_mlp(), exclude=nn.Linear)
    for name, value in (("log_sigma2_init", float("nan")), ("threshold", float("inf")), ("threshold", "3")):
        with pytest.raises(ValueError, match=f"{name} must be a finite number"):
            sparsevd.convert(_mlp(), **{name: value})
    with pytest.raises(ValueError, match="alpha must be"):
        sparsevd.convert(_mlp(), alpha="per-weight")
    model = _mlp()
    with pytest.raises(ValueError):
        sparsevd.convert(model, inplace=True, exclude="nope")
    assert isinstance(model[0], nn.Linear), "a failed conversion leaves the model untouched"


class _Block(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class _ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 6, 3, padding=1)
        self.blocks = nn.Sequential(_Block(6), _Block(6))
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        return self.fc(self.blocks(torch.relu(self.stem(x))).mean((2, 3)))


def _resnet():
    torch.manual_seed(0)
    model = _ResNet()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


SBP_MODELS = {
    "mlp": (lambda: _mlp().eval(), (4, 5), "5", ["0", "3"]),
    "cnn": (_cnn, (2, 3, 16, 15), "classifier.3", ["features.0", "features.3", "features.6", "head", "classifier.1"]),
    "resnet": (_resnet, (2, 1, 8, 8), "fc", ["stem", "blocks.0.conv1", "blocks.0.conv2", "blocks.1.conv1",
                                             "blocks.1.conv2"]),
}


@pytest.mark.parametrize("kind", list(SBP_MODELS))
@pytest.mark.parametrize("sparsevd_too", [True, False])
def test_sbp_converted_model_computes_what_the_original_did(kind, sparsevd_too):
    make, shape, output, with_sbp = SBP_MODELS[kind]
    model = make()
    x = torch.randn(*shape)
    converted = _convert_quietly(model, sbp=True, sparsevd=sparsevd_too, log_sigma2_init=-20.0).eval()
    report = converted.sparsevd_conversion
    assert report.output_layers == [output] and report.output_found_by == "torch.fx"
    assert report.sbp == with_sbp
    assert not isinstance(converted.get_submodule(output), nn.Sequential), "no SBP on the output layer"
    assert all(isinstance(converted.get_submodule(f"{name}.1"), sparsevd.SBPDropout) for name in with_sbp)
    expected = model(x)
    torch.testing.assert_close(converted(x), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    # and sparsify folds the pairs back into layers that compute the same
    torch.testing.assert_close(sparsevd.sparsify(converted)(x), expected, rtol=1e-5,
                               atol=1e-5 * expected.abs().max().item())


def test_sbp_on_the_output_layer_when_asked():
    model = _mlp().eval()
    converted = _convert_quietly(model, sbp=True, sbp_output=True)
    assert converted.sparsevd_conversion.sbp == ["0", "3", "5"] and converted.sparsevd_conversion.output_layers == []
    assert isinstance(converted[5][1], sparsevd.SBPDropout)
    x = torch.randn(3, 5)
    torch.testing.assert_close(converted.eval()(x), model(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="sbp_output must be True or False"):
        sparsevd.convert(model, sbp=True, sbp_output="yes")


class _Untraceable(nn.Module):
    """The head is registered before the body, and fx cannot trace the forward."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.body = nn.Linear(4, 8)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            x = x * 2
        return self.head(torch.relu(self.body(x)))


def test_output_layer_of_a_model_fx_cannot_trace():
    model = _Untraceable().eval()
    x = torch.randn(2, 4)
    hooked = _convert_quietly(model, sbp=True, example_inputs=x)
    assert hooked.sparsevd_conversion.output_found_by == "forward hooks"
    assert hooked.sparsevd_conversion.output_layers == ["head"] and hooked.sparsevd_conversion.sbp == ["body"]
    # without an example input: the last registered layer, which here is not the output layer
    guessed = _convert_quietly(model, sbp=True)
    assert guessed.sparsevd_conversion.output_found_by == "last registered"
    assert guessed.sparsevd_conversion.output_layers == ["body"] and guessed.sparsevd_conversion.sbp == ["head"]
    with pytest.raises(ValueError, match="example_inputs do not fit _Untraceable"):
        sparsevd.convert(model, sbp=True, example_inputs=torch.randn(2, 5))


def test_example_inputs_run_in_eval_mode_and_modes_are_restored():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).train()
    model.forward = lambda x: model[2](model[1](model[0](x))) if bool(x.sum() > -1e9) else x  # untraceable
    before = model[1].running_mean.clone()
    converted = _convert_quietly(model, sbp=True, example_inputs=torch.randn(3, 4), inplace=True)
    assert converted.sparsevd_conversion.output_layers == ["2"]
    assert torch.equal(model[1].running_mean, before), "the example ran in eval mode"
    assert all(m.training for m in model.modules())


class _LSTMClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.cls = nn.Parameter(torch.zeros(8))
        self.lstm = nn.LSTM(8, 32, batch_first=True)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 4)

    def forward(self, tokens):
        h, _ = self.lstm(self.emb(tokens) + self.cls)
        return self.head(self.norm(h[:, -1]))


def test_report_says_what_was_converted_left_dense_and_not_convertible(caplog):
    model = _LSTMClassifier()
    with caplog.at_level("INFO", logger="sparsevd.convert"), pytest.warns(
            UserWarning, match=r"convert: \d+% of _LSTMClassifier's weights are in modules it cannot convert "
                               r"\(nn.LSTM: lstm; _LSTMClassifier \(custom parameters\): \(the model\)\): they "
                               r"stay dense"):
        converted = sparsevd.convert(model, exclude="head")
    report = converted.sparsevd_conversion
    assert isinstance(report, sparsevd.ConversionReport)
    assert report.converted == {"emb": "nn.Embedding → SparseVDEmbedding"} and report.excluded == ["head"]
    assert report.unsupported == {"_LSTMClassifier (custom parameters)": ["(the model)"], "nn.LSTM": ["lstm"]}
    lstm = sum(p.numel() for p in model.lstm.parameters())
    assert report.weights == {"converted": 400, "excluded": 132, "unsupported": lstm + 8, "normalization": 64,
                              "sparsevd": 0, "total": sum(p.numel() for p in model.parameters())}
    assert report.unsupported_share > 0.5
    text = str(report)
    assert "emb: nn.Embedding → SparseVDEmbedding" in text and "left dense by include/exclude: head" in text
    assert "not convertible (stay dense, not pruned): nn.LSTM: lstm" in text
    assert text in caplog.text


def test_no_warning_when_most_weights_convert():
    converted = _convert_quietly(_cnn())
    assert converted.sparsevd_conversion.unsupported == {} and converted.sparsevd_conversion.unsupported_share == 0
    assert converted.sparsevd_conversion.weights["normalization"] == 16


def test_include_of_a_type_convert_cannot_convert_is_a_plain_error():
    with pytest.raises(ValueError) as error:
        sparsevd.convert(_LSTMClassifier(), include=nn.LSTM)
    message = str(error.value)
    assert message == ("convert: include=nn.LSTM: nn.LSTM is not a type convert can convert; it converts nn.Linear, "
                       "nn.Conv1d, nn.Conv2d, nn.MultiheadAttention, nn.Embedding (select other modules by name "
                       "pattern)")
    with pytest.raises(ValueError, match=r"exclude=\[nn.GRU, 'x'\]: nn.GRU is not a type"):
        sparsevd.convert(_mlp(), exclude=[nn.GRU, "x"])
    with pytest.raises(ValueError) as error:
        sparsevd.convert(_LSTMClassifier(), include=["lstm*"])
    assert "<class" not in str(error.value) and "([]" not in str(error.value)


class _TiedLM(nn.Module):
    def __init__(self, vocab=13, width=6, padding_idx=0):
        super().__init__()
        self.emb = nn.Embedding(vocab, width, padding_idx=padding_idx)
        self.body = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.body(self.emb(tokens))))


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_tied_embedding_and_head_stay_tied_and_count_once(padding_idx):
    torch.manual_seed(0)
    model = _TiedLM(padding_idx=padding_idx).eval()
    converted = _convert_quietly(model, log_sigma2_init=-20.0)
    emb, head = converted.emb, converted.head
    assert isinstance(emb, sparsevd.SparseVDEmbedding) and isinstance(head, sparsevd.SparseVDLinear)
    assert head.weight is emb.weight and head.log_sigma2 is emb.log_sigma2
    tokens = torch.randint(0, 13, (2, 5))
    torch.testing.assert_close(converted.eval()(tokens), model(tokens), rtol=1e-5, atol=1e-6)
    # one posterior: the KL counts it once (the head's, which reads the padding row too)
    torch.testing.assert_close(sparsevd.kl_divergence(converted), head.kl() + converted.body.kl())
    assert len(list(converted.parameters())) == 5  # θ, log σ² of the table; body's θ, log σ², bias
    assert sparsevd.compression(converted)[1] == 13 * 6 + 6 * 6
    converted.train()
    optimizer = torch.optim.Adam(converted.parameters(), lr=0.1)
    before = emb.weight.detach().clone()
    loss = sparsevd.SGVLBLoss(converted, dataset_size=10)(converted(tokens).flatten(0, 1), tokens.flatten())
    loss.backward()
    optimizer.step()
    assert head.weight is emb.weight and not torch.equal(emb.weight, before)


def test_embedding_options_convert_cannot_keep_are_refused_before_anything_changes():
    model = _TiedLM()
    model.emb.max_norm = 1.0
    with pytest.raises(ValueError, match=r"convert: embedding 'emb' has max_norm=1.0, which SparseVDEmbedding does not "
                                         r"support .*exclude it \(exclude='emb'\)"):
        sparsevd.convert(model, inplace=True)
    assert type(model.body) is nn.Linear and type(model.emb) is nn.Embedding
    model.emb.max_norm, model.emb.sparse = None, True
    with pytest.raises(ValueError, match="sparse=True"):
        sparsevd.convert(model)
    kept = _convert_quietly(model, exclude="emb")
    assert type(kept.emb) is nn.Embedding and kept.head.weight is not kept.emb.weight


@pytest.mark.parametrize("sparsevd_too", [True, False])
def test_no_sbp_on_a_layer_whose_weight_is_shared(sparsevd_too):
    torch.manual_seed(0)
    model = _TiedLM().eval()
    if sparsevd_too:
        converted = _convert_quietly(model, sbp=True, sbp_output=True, log_sigma2_init=-20.0)
    else:  # SBP alone leaves the embedding, most of the weights, as it is
        with pytest.warns(UserWarning, match=r"in modules it cannot convert \(nn.Embedding: emb\).*it converts "
                                             r"nn.Linear, nn.Conv1d, nn.Conv2d \(SBP alone\)"):
            converted = sparsevd.convert(model, sbp=True, sbp_output=True, sparsevd=False)
    assert converted.sparsevd_conversion.sbp == ["body"]
    assert converted.head.weight is converted.emb.weight
    tokens = torch.randint(0, 13, (2, 5))
    torch.testing.assert_close(converted.eval()(tokens), model(tokens), rtol=1e-5, atol=1e-6)
