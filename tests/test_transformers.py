"""Converted transformers end to end: nn.TransformerEncoder/Decoder/nn.Transformer models with
nn.Embedding fronts compute what the originals did, no mode skips a mask (torch's native
fast path never reads a converted weight), sparsify() runs them, predict() samples their
attention and embeddings, torch.compile trains and evaluates them, and FSDP2 trains one on
2 gloo processes."""

import copy
import dataclasses
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

import sparsevd
from sparsevd.convert import CONVERTERS
from sparsevd.sparsify import CPU_COST

MODES = [torch.enable_grad, torch.no_grad, torch.inference_mode]
#: Every layer CSR: these models are too small for the default cost model to choose it.
ALWAYS_CSR = sparsevd.CostModel(cpu=dataclasses.replace(CPU_COST, dense_overhead_s=math.inf))


class TextClassifier(nn.Module):
    """Token embeddings, a transformer encoder, mean pooling over the real tokens, a linear head."""

    def __init__(self, batch_first=True, vocab=1000, d_model=64, heads=4, layers=2, classes=3, dropout=0.0,
                 norm_first=False, activation="relu"):
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(vocab, d_model, padding_idx=0)
        layer = nn.TransformerEncoderLayer(d_model, heads, 2 * d_model, dropout=dropout, batch_first=batch_first,
                                           norm_first=norm_first, activation=activation)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=batch_first and not norm_first)
        self.head = nn.Linear(d_model, classes)

    def forward(self, tokens, mask=None):
        padding = tokens == 0
        h = self.emb(tokens)
        h = self.encoder(h if self.batch_first else h.transpose(0, 1), mask=mask, src_key_padding_mask=padding)
        h = h if self.batch_first else h.transpose(0, 1)
        # torch's nested-tensor path outputs zeros at padded positions, its other paths do not: pool the real ones
        h = h.masked_fill(padding.unsqueeze(-1), 0).sum(1) / (~padding).sum(1, keepdim=True)
        return self.head(h)


class Seq2Seq(nn.Module):
    """nn.Transformer between two embeddings, a linear head over the target vocabulary."""

    def __init__(self, batch_first=True, vocab=50, d_model=32, heads=4):
        super().__init__()
        self.batch_first = batch_first
        self.src_emb = nn.Embedding(vocab, d_model, padding_idx=0)
        self.tgt_emb = nn.Embedding(vocab, d_model)
        self.transformer = nn.Transformer(d_model, heads, 1, 2, 64, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, src, tgt):
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        s, t = self.src_emb(src), self.tgt_emb(tgt)
        if not self.batch_first:
            s, t = s.transpose(0, 1), t.transpose(0, 1)
        h = self.transformer(s, t, tgt_mask=causal, src_key_padding_mask=src == 0, memory_key_padding_mask=src == 0,
                             tgt_is_causal=True)
        return self.head(h if self.batch_first else h.transpose(0, 1))


class Decoder(nn.Module):
    """A decoder stack reading a memory, with its own norm_first layers and GELU."""

    def __init__(self, batch_first=True, d_model=32, heads=4):
        super().__init__()
        self.batch_first = batch_first
        layer = nn.TransformerDecoderLayer(d_model, heads, 48, dropout=0.0, batch_first=batch_first, norm_first=True,
                                           activation="gelu")
        self.decoder = nn.TransformerDecoder(layer, 2, norm=nn.LayerNorm(d_model))

    def forward(self, tgt, memory, memory_padding):
        if not self.batch_first:
            tgt, memory = tgt.transpose(0, 1), memory.transpose(0, 1)
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.shape[0 if not self.batch_first else 1])
        h = self.decoder(tgt, memory, tgt_mask=causal, memory_key_padding_mask=memory_padding)
        return h if self.batch_first else h.transpose(0, 1)


def _tokens(batch=3, length=9, vocab=1000, seed=1):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab, (batch, length), generator=generator)
    tokens[0, -3:] = 0  # padding, left-aligned content
    tokens[1, -1:] = 0
    return tokens


def _models(batch_first):
    """(name, model, inputs) of the three kinds of transformer, eval mode."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(2)
    memory_padding = torch.zeros(3, 6, dtype=torch.bool)
    memory_padding[2, -2:] = True
    return [
        ("encoder", TextClassifier(batch_first).eval(), (_tokens(),)),
        ("encoder norm_first gelu", TextClassifier(batch_first, norm_first=True, activation="gelu").eval(),
         (_tokens(), torch.ones(9, 9, dtype=torch.bool).triu(1))),
        ("decoder", Decoder(batch_first).eval(),
         (torch.randn(3, 5, 32, generator=generator), torch.randn(3, 6, 32, generator=generator), memory_padding)),
        ("transformer", Seq2Seq(batch_first).eval(), (_tokens(vocab=50), _tokens(length=7, vocab=50, seed=3))),
    ]


def _convert(model, **kwargs):
    # log σ² this low prunes nothing: the converted model is the original
    return sparsevd.convert(model, log_sigma2_init=-40.0, **kwargs).eval()


@pytest.mark.parametrize("batch_first", [True, False])
def test_converted_transformers_compute_what_the_originals_did_in_every_mode(batch_first):
    for name, model, inputs in _models(batch_first):
        converted = _convert(model)
        assert not any(type(m) in CONVERTERS for m in converted.modules()), name
        for mode in MODES:
            with mode():
                expected, got = model(*inputs), converted(*inputs)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=f"{name}, {mode.__name__}")


def test_the_encoder_model_is_fully_converted_and_declines_the_fast_path():
    converted = _convert(TextClassifier())
    report = converted.sparsevd_conversion
    assert report.weights["converted"] / report.weights["total"] > 0.99 and not report.unsupported
    assert isinstance(converted.emb, sparsevd.SparseVDEmbedding)
    for layer in converted.encoder.layers:
        assert type(layer) is sparsevd.SparseVDTransformerEncoderLayer
        assert isinstance(layer.self_attn, sparsevd.SparseVDMultiheadAttention)
    assert converted.encoder.use_nested_tensor is False
    assert len(sparsevd.sparsevd_modules(converted)) == 1 + 2 * 6 + 1


def _prune_some(model, share=0.3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in sparsevd.sparsevd_modules(model):
            pruned = torch.rand(layer.weight.shape, generator=generator) < share
            layer.log_sigma2.masked_fill_(pruned, 10.0)


def _masked_original(original, converted):
    """The original (plain torch) model holding the converted model's θ ⊙ mask."""
    plain, new = copy.deepcopy(original), dict(converted.named_modules())

    def masked(layer):
        return layer.weight * layer.mask()

    with torch.no_grad():
        for name, module in plain.named_modules():
            if isinstance(module, nn.MultiheadAttention):
                attention = new[name]
                module.in_proj_weight.copy_(torch.cat([masked(attention.q_proj), masked(attention.k_proj),
                                                       masked(attention.v_proj)]))
                module.out_proj.weight.copy_(masked(attention.out_proj))
            elif type(module) in (nn.Linear, nn.Embedding):
                module.weight.copy_(masked(new[name]))
    return plain


@pytest.mark.parametrize("batch_first", [True, False])
def test_no_mode_skips_a_mask(batch_first):
    """Partly pruned: every mode computes the masked model (torch's own fast path, in the
    plain reference, reads the masked weights it holds)."""
    for name, model, inputs in _models(batch_first):
        converted = _convert(model)
        _prune_some(converted)
        plain = _masked_original(model, converted)
        assert not torch.allclose(plain(*inputs), model(*inputs))
        for mode in MODES:
            with mode():
                torch.testing.assert_close(converted(*inputs), plain(*inputs), rtol=1e-5, atol=1e-5,
                                           msg=f"{name}, eval, {mode.__name__}")
        sparsevd.freeze_masks(converted)  # training without noise: the masked model, dropout is 0
        converted.train()
        plain.train()
        for mode in MODES:
            with mode():
                torch.testing.assert_close(converted(*inputs), plain(*inputs), rtol=1e-5, atol=1e-5,
                                           msg=f"{name}, training, {mode.__name__}")


@pytest.mark.parametrize("batch_first", [True, False])
def test_sparsify_runs_converted_transformers_in_every_mode(batch_first):
    for name, model, inputs in _models(batch_first):
        converted = _convert(model)
        _prune_some(converted, share=0.9)
        expected = converted(*inputs)
        fast = sparsevd.sparsify(converted, cost_model=ALWAYS_CSR)
        assert not any(isinstance(m, sparsevd.SparseVDLinear) for m in fast.modules()), name
        assert any(isinstance(m, sparsevd.SparseLinear) for m in fast.modules()), name
        for mode in MODES:
            with mode():
                torch.testing.assert_close(fast(*inputs), expected, rtol=1e-5, atol=1e-5,
                                           msg=f"{name}, {mode.__name__}")


@pytest.mark.parametrize("include", [None, nn.MultiheadAttention, nn.Embedding])
def test_predict_samples_attention_and_embeddings(include):
    torch.manual_seed(0)
    model = TextClassifier().eval()
    converted = sparsevd.convert(model, include=include)
    with torch.no_grad():  # a trained posterior has noise
        for _, layer in sparsevd.sparsevd_modules(converted):
            layer.log_sigma2.fill_(-3.0)
    prediction = sparsevd.predict(converted, _tokens(), samples=8)
    assert (prediction.mutual_information > 1e-4).all(), prediction.mutual_information
    assert not converted.training and not any(m.training for m in converted.modules())


def test_compiled_converted_transformer_trains_and_evaluates():
    torch.manual_seed(0)
    model = sparsevd.convert(TextClassifier(vocab=100, d_model=32, layers=1))
    tokens, labels = _tokens(batch=8, vocab=100), torch.arange(8) % 3
    loss_fn = sparsevd.SGVLBLoss(model, dataset_size=1000)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    step = torch.compile(lambda: loss_fn(model(tokens), labels), backend="aot_eager", fullgraph=True)
    losses = []
    for _ in range(6):
        loss = step()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    model.eval()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for mode in (torch.enable_grad, torch.no_grad):
        with mode():
            torch.testing.assert_close(compiled(tokens), model(tokens), rtol=1e-5, atol=1e-6)


def test_state_dict_and_pickle_round_trip(tmp_path):
    _, model, inputs = _models(True)[0]
    converted = _convert(model)
    _prune_some(converted)
    fresh = _convert(TextClassifier())
    fresh.load_state_dict(converted.state_dict())
    torch.testing.assert_close(fresh(*inputs), converted(*inputs), rtol=0, atol=0)
    torch.save(converted, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert type(loaded.encoder.layers[0]) is sparsevd.SparseVDTransformerEncoderLayer
    with torch.no_grad():
        torch.testing.assert_close(loaded(*inputs), converted(*inputs), rtol=0, atol=0)


EXPORTED = """
import sys, torch, sparsevd
program = torch.export.load(sys.argv[1])
torch.save(program.module()(*torch.load(sys.argv[2])), sys.argv[3])
"""


@pytest.mark.parametrize("index, batch_first, strict", [(0, True, False), (0, True, True), (3, False, False)])
def test_converted_transformer_exports_and_runs_in_a_fresh_process(tmp_path, index, batch_first, strict):
    """(A mask passed without its is_causal hint makes torch's own encoder and decoder
    stacks untraceable, converted or not: _detect_is_causal_mask reads the mask's values.)"""
    name, model, inputs = _models(batch_first)[index]
    converted = _convert(model)
    _prune_some(converted)
    batch = torch.export.Dim("batch", min=2)
    program = torch.export.export(converted, inputs, strict=strict, dynamic_shapes=tuple({0: batch} for _ in inputs))
    torch.export.save(program, tmp_path / "model.pt2")
    other = tuple(torch.cat([x, x[:1]]) for x in inputs)  # another batch size
    torch.save(other, tmp_path / "inputs.pt")
    subprocess.run([sys.executable, "-c", EXPORTED, str(tmp_path / "model.pt2"), str(tmp_path / "inputs.pt"),
                    str(tmp_path / "out.pt")], check=True, timeout=300)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), converted(*other), rtol=1e-5, atol=1e-6, msg=name)


# ------------------------------------------------------------------------- FSDP2


def _fsdp_model():
    torch.manual_seed(0)
    model = sparsevd.convert(TextClassifier(vocab=40, d_model=16, heads=2, layers=2), log_sigma2_init=-8.0)
    with torch.no_grad():
        for _, layer in sparsevd.sparsevd_modules(model):  # log α over [-4, 5]: a KL gradient everywhere
            layer.log_sigma2.copy_(torch.log(layer.weight ** 2 + 1e-8) + 9 * torch.rand_like(layer.weight) - 4)
    return model.train()


def _fsdp_batch():
    return _tokens(batch=6, length=5, vocab=40), torch.tensor([0, 1, 2, 0, 1, 2])


def _fsdp2_transformer(rank):
    """A converted transformer sharded per block by FSDP2: the KL, a step with the masks
    frozen (deterministic: the one-process gradients), then SparseVD training steps."""
    from torch.distributed.fsdp import fully_shard

    from test_distributed import WORLD
    from sparsevd.experiments.distributed import World

    model = _fsdp_model()
    for layer in model.encoder.layers:
        fully_shard(layer)
    fully_shard(model)
    tokens, labels = _fsdp_batch()
    part = torch.arange(6)[World(rank, WORLD).part(6)]
    out = {"sharded": type(model.emb.weight).__name__, "kl": sparsevd.kl_divergence(model).detach()}
    loss_fn = sparsevd.SGVLBLoss(model, dataset_size=60)
    sparsevd.freeze_masks(model)
    loss_fn(model(tokens[part]), labels[part]).backward()
    out["grads"] = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
    sparsevd.unfreeze_masks(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        loss = loss_fn(model(tokens[part]), labels[part])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    out["losses"] = losses
    return out


@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module")
def test_fsdp2_trains_a_converted_transformer_with_the_one_process_gradients(tmp_path):
    from test_distributed import spawn

    model = _fsdp_model()
    tokens, labels = _fsdp_batch()
    kl = sparsevd.kl_divergence(model).detach()
    sparsevd.freeze_masks(model)
    sparsevd.SGVLBLoss(model, dataset_size=60)(model(tokens), labels).backward()
    for result in spawn(_fsdp2_transformer, tmp_path):
        assert result["sharded"] == "DTensor"
        torch.testing.assert_close(result["kl"], kl)
        for name, p in model.named_parameters():
            torch.testing.assert_close(result["grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
        assert all(torch.isfinite(torch.tensor(result["losses"])))
