"""Tests of course_lib.nn: parity with transformers' BertLayer and torch's TransformerEncoderLayer,
fused (SDPA) vs explicit attention, masking semantics, gradients and input errors."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import math

import pytest
import torch
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertLayer

from course_lib.nn import (
    FeedForward,
    MultiHeadAttention,
    TransformerDecoder,
    TransformerEncoder,
    TransformerLayer,
    init_weights,
)

torch.set_num_threads(1)
DIM, HEADS, HIDDEN = 32, 4, 128

# HF BertLayer parameter names -> ours (TransformerLayer).
BERT_TO_OURS = [
    ("crossattention.self.", "cross_attn."),
    ("crossattention.output.dense.", "cross_attn.out."),
    ("crossattention.output.LayerNorm.", "cross_norm."),
    ("attention.self.", "attn."),
    ("attention.output.dense.", "attn.out."),
    ("attention.output.LayerNorm.", "attn_norm."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
    ("output.LayerNorm.", "mlp_norm."),
]


def _rename(name: str) -> str:
    for theirs, ours in BERT_TO_OURS:
        if name.startswith(theirs):
            return ours + name[len(theirs):]
    raise KeyError(name)


def _bert_layer(decoder: bool) -> BertLayer:
    config = BertConfig(
        hidden_size=DIM, num_attention_heads=HEADS, intermediate_size=HIDDEN, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, attn_implementation="eager",
        is_decoder=decoder, add_cross_attention=decoder,
    )
    torch.manual_seed(0)
    layer = BertLayer(config).eval()
    with torch.no_grad():  # random LayerNorm affine too, so a misplaced norm cannot pass
        for name, p in layer.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith("LayerNorm.weight") else 0.0))
    return layer


def _additive(allowed: torch.Tensor) -> torch.Tensor:
    """HF's 4-d additive mask from a boolean 'may attend' mask."""
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


def _padding_mask():
    return torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])  # (B=3, N=6)


def test_post_ln_layer_matches_hf_bert_layer():
    hf = _bert_layer(decoder=False)
    ours = TransformerLayer(DIM, HEADS, mlp_ratio=HIDDEN / DIM).eval()
    ours.load_state_dict({_rename(k): v for k, v in hf.state_dict().items()})
    torch.manual_seed(1)
    x, key_mask = torch.randn(3, 6, DIM), _padding_mask()
    expected = hf(x, attention_mask=_additive(key_mask.bool()[:, None, None, :]))
    got, maps = ours(x, key_mask=key_mask)
    # Same float32 operations in a slightly different order: equal within atol 1e-5.
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert maps == {"self": None}


def test_causal_cross_attention_layer_matches_hf_bert_decoder_layer():
    hf = _bert_layer(decoder=True)
    ours = TransformerLayer(DIM, HEADS, mlp_ratio=HIDDEN / DIM, cross_attention=True, causal=True).eval()
    ours.load_state_dict({_rename(k): v for k, v in hf.state_dict().items()})
    torch.manual_seed(2)
    x, key_mask = torch.randn(3, 6, DIM), _padding_mask()
    context, context_mask = torch.randn(3, 4, DIM), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0]])
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    self_allowed = key_mask.bool()[:, None, None, :] & causal  # (B, 1, N, N)
    expected = hf(x, attention_mask=_additive(self_allowed), encoder_hidden_states=context,
                  encoder_attention_mask=_additive(context_mask.bool()[:, None, None, :]))
    got, maps = ours(x, key_mask=key_mask, context=context, context_mask=context_mask, return_attention=True)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)  # atol 1e-5, as above
    assert maps["self"].shape == (3, HEADS, 6, 6) and maps["cross"].shape == (3, HEADS, 6, 4)


@pytest.mark.parametrize("norm_first", [False, True])
def test_layer_matches_torch_transformer_encoder_layer(norm_first):
    torch.manual_seed(3)
    ref = nn.TransformerEncoderLayer(DIM, HEADS, HIDDEN, dropout=0.0, activation="gelu", layer_norm_eps=1e-5,
                                     batch_first=True, norm_first=norm_first).eval()
    ours = TransformerLayer(DIM, HEADS, mlp_ratio=HIDDEN / DIM, norm_first=norm_first, layer_norm_eps=1e-5).eval()
    wq, wk, wv = ref.self_attn.in_proj_weight.chunk(3)
    bq, bk, bv = ref.self_attn.in_proj_bias.chunk(3)
    ours.load_state_dict({
        "attn.query.weight": wq, "attn.query.bias": bq, "attn.key.weight": wk, "attn.key.bias": bk,
        "attn.value.weight": wv, "attn.value.bias": bv,
        "attn.out.weight": ref.self_attn.out_proj.weight, "attn.out.bias": ref.self_attn.out_proj.bias,
        "attn_norm.weight": ref.norm1.weight, "attn_norm.bias": ref.norm1.bias,
        "mlp.fc1.weight": ref.linear1.weight, "mlp.fc1.bias": ref.linear1.bias,
        "mlp.fc2.weight": ref.linear2.weight, "mlp.fc2.bias": ref.linear2.bias,
        "mlp_norm.weight": ref.norm2.weight, "mlp_norm.bias": ref.norm2.bias,
    })
    x, key_mask = torch.randn(3, 6, DIM), _padding_mask()
    # grad stays enabled, so torch takes its plain (not the fused "fast path") code: atol 1e-5.
    expected = ref(x, src_key_padding_mask=~key_mask.bool())
    got, _ = ours(x, key_mask=key_mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_cross_attention_matches_naive_loop():
    torch.manual_seed(4)
    mha = MultiHeadAttention(DIM, HEADS, context_dim=12).eval()
    x, context = torch.randn(2, 3, DIM), torch.randn(2, 5, 12)
    context_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 1, 0]])
    got, _ = mha(x, context, key_mask=context_mask)
    with torch.no_grad():
        q, k, v = mha.query(x), mha.key(context), mha.value(context)
    hd, heads = DIM // HEADS, torch.zeros(2, 3, DIM)
    for b in range(2):
        for h in range(HEADS):
            cols = slice(h * hd, (h + 1) * hd)
            for i in range(3):
                scores = [float(q[b, i, cols] @ k[b, j, cols]) / math.sqrt(hd) if context_mask[b, j] else -math.inf
                          for j in range(5)]
                weights = torch.tensor(scores).softmax(0)
                heads[b, i, cols] = sum(weights[j] * v[b, j, cols] for j in range(5))
    torch.testing.assert_close(got, mha.out(heads), atol=1e-5, rtol=0)  # float32 loop vs batched: 1e-5


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_path_equals_explicit_path(causal):
    torch.manual_seed(5)
    mha = MultiHeadAttention(DIM, HEADS).eval()
    x = torch.randn(3, 6, DIM)
    for key_mask in (None, _padding_mask()):
        fast, none = mha(x, key_mask=key_mask, causal=causal)
        slow, attn = mha(x, key_mask=key_mask, causal=causal, return_attention=True)
        assert none is None and attn.shape == (3, HEADS, 6, 6)
        torch.testing.assert_close(fast, slow, atol=1e-6, rtol=0)  # same math, fused kernel: 1e-6


def test_causal_output_ignores_future_tokens():
    torch.manual_seed(6)
    model = TransformerEncoder(2, DIM, HEADS, causal=True).eval()
    x = torch.randn(2, 7, DIM)
    t = 3
    changed = x.clone()
    changed[:, t + 1:] = torch.randn(2, 7 - t - 1, DIM) * 5
    out, _ = model(x)
    out_changed, _ = model(changed)
    torch.testing.assert_close(out[:, : t + 1], out_changed[:, : t + 1], atol=1e-6, rtol=0)
    assert (out[:, t + 1:] - out_changed[:, t + 1:]).abs().max() > 1e-2  # the future itself did change


def test_attention_rows_sum_to_one_and_ignore_padding():
    torch.manual_seed(7)
    mha = MultiHeadAttention(DIM, HEADS).eval()
    key_mask = _padding_mask()
    _, attn = mha(torch.randn(3, 6, DIM), key_mask=key_mask, return_attention=True)
    torch.testing.assert_close(attn.sum(-1), torch.ones(3, HEADS, 6), atol=1e-6, rtol=0)
    padded_keys = ~key_mask.bool()[:, None, None, :].expand_as(attn)
    assert attn[padded_keys].abs().max() == 0.0
    _, causal_attn = mha(torch.randn(3, 6, DIM), causal=True, return_attention=True)
    assert causal_attn.triu(diagonal=1).abs().max() == 0.0


@pytest.mark.parametrize("return_attention", [False, True])
def test_fully_masked_row_is_finite_with_finite_gradients(return_attention):
    torch.manual_seed(8)
    mha = MultiHeadAttention(DIM, HEADS)
    x = torch.randn(2, 4, DIM, requires_grad=True)
    key_mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])  # sample 1 has no real key at all
    out, attn = mha(x, key_mask=key_mask, return_attention=return_attention)
    assert torch.isfinite(out).all()
    # No information reaches a query without keys: its output is the output projection's bias.
    torch.testing.assert_close(out[1], mha.out.bias.expand(4, DIM), atol=0, rtol=0)
    if return_attention:
        assert attn[1].abs().max() == 0.0
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in mha.parameters())


def test_gradient_reaches_every_parameter():
    torch.manual_seed(9)
    model = TransformerDecoder(2, DIM, HEADS, context_dim=16, norm_first=True)
    x, context = torch.randn(2, 5, DIM), torch.randn(2, 3, 16)
    context_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    hidden, maps = model(x, key_mask=torch.ones(2, 5), context=context, context_mask=context_mask)
    hidden.pow(2).mean().backward()
    assert len(maps) == 2 and set(maps[0]) == {"self", "cross"}
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_encoder_stack_equals_layers_applied_in_turn():
    torch.manual_seed(10)
    model = TransformerEncoder(3, DIM, HEADS, norm_first=True).eval()
    x, key_mask = torch.randn(3, 6, DIM), _padding_mask()
    h = x
    for layer in model.layers:
        h, _ = layer(h, key_mask)
    expected = nn.functional.layer_norm(h, (DIM,), model.final_norm.weight, model.final_norm.bias, 1e-12)
    hidden, maps = model(x, key_mask)
    torch.testing.assert_close(hidden, expected, atol=0, rtol=0)  # the very same operations
    assert [m["self"] for m in maps] == [None] * 3
    _, maps = model(x, key_mask, return_attention=True)
    assert [m["self"].shape for m in maps] == [(3, HEADS, 6, 6)] * 3


def test_feed_forward_activations_by_hand():
    torch.manual_seed(11)
    x = torch.randn(2, 3, 8)
    for activation, fn in [("gelu", lambda z: 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))),
                           ("relu", lambda z: z.clamp(min=0)),
                           ("quick_gelu", lambda z: z * torch.sigmoid(1.702 * z)),
                           ("gelu_tanh",
                            lambda z: 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3))))]:
        ff = FeedForward(8, 16, activation=activation)
        expected = fn(x @ ff.fc1.weight.T + ff.fc1.bias) @ ff.fc2.weight.T + ff.fc2.bias
        torch.testing.assert_close(ff(x), expected, atol=1e-6, rtol=0)


def test_init_weights_follows_bert():
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(256, 256), nn.Embedding(300, 64, padding_idx=0), nn.LayerNorm(64))
    with torch.no_grad():
        model[2].weight.fill_(3.0)
    init_weights(model, std=0.02)
    assert abs(model[0].weight.std().item() - 0.02) < 0.001 and model[0].bias.abs().max() == 0
    assert abs(model[1].weight[1:].std().item() - 0.02) < 0.002 and model[1].weight[0].abs().max() == 0
    assert (model[2].weight == 1).all() and (model[2].bias == 0).all()
    with pytest.raises(ValueError, match="std"):
        init_weights(model, std=0.0)


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="num_heads"):
        MultiHeadAttention(30, 4)
    mha = MultiHeadAttention(DIM, HEADS, context_dim=12)
    with pytest.raises(ValueError, match="x must have shape"):
        mha(torch.randn(2, 5, 31), torch.randn(2, 3, 12))
    with pytest.raises(ValueError, match="context must have shape"):
        mha(torch.randn(2, 5, DIM), torch.randn(2, 3, DIM))
    with pytest.raises(ValueError, match="context is required"):
        mha(torch.randn(2, 5, DIM))
    with pytest.raises(ValueError, match="key_mask must have shape"):
        mha(torch.randn(2, 5, DIM), torch.randn(2, 3, 12), key_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="causal"):
        mha(torch.randn(2, 5, DIM), torch.randn(2, 3, 12), causal=True)
    with pytest.raises(ValueError, match="activation"):
        FeedForward(DIM, 64, activation="swish")
    layer = TransformerLayer(DIM, HEADS, cross_attention=True)
    with pytest.raises(ValueError, match="context is required"):
        layer(torch.randn(2, 5, DIM))
    with pytest.raises(ValueError, match="cross_attention=False"):
        TransformerLayer(DIM, HEADS)(torch.randn(2, 5, DIM), context=torch.randn(2, 3, DIM))
    with pytest.raises(ValueError, match="num_layers"):
        TransformerEncoder(0, DIM, HEADS)
