"""Tests of course_lib.checks.attention: a correct exercise passes, each typical mistake fails with
a message that names it; the reference helper agrees with torch's fused attention."""

import math

import pytest
import torch
import torch.nn.functional as F

from course_lib.checks.attention import (check_attention, check_causal_mask, check_split_merge_heads,
                                         library_attention)
from course_lib.checks.verdict import ExerciseError


def attention(q, k, v, key_mask=None, scale=True, softmax_dim=-1, use_mask=True):
    scores = q @ k.transpose(-2, -1)
    if scale:
        scores = scores / math.sqrt(q.shape[-1])
    if key_mask is not None and use_mask:
        scores = scores.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
    weights = scores.softmax(softmax_dim)
    return weights @ v, weights


def test_library_attention_matches_torch_sdpa():
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 3, 4, 8, generator=g), torch.randn(2, 3, 6, 8, generator=g), torch.randn(2, 3, 6, 8,
                                                                                                       generator=g)
    key_mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    out, weights = library_attention(q, k, v, key_mask)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)  # float32 round-off only
    assert weights[0, :, :, 3:].abs().max() == 0
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, 4))


def test_attention_accepts_a_correct_function(capsys):
    check_attention(attention)
    assert capsys.readouterr().out.startswith("PASS attention")


@pytest.mark.parametrize("kwargs, message", [
    (dict(scale=False), "sqrt"),
    (dict(softmax_dim=-2), "KEYS"),
    (dict(use_mask=False), "padding keys"),
])
def test_attention_names_the_mistake(kwargs, message):
    with pytest.raises(ExerciseError, match=message):
        check_attention(lambda q, k, v, key_mask=None: attention(q, k, v, key_mask, **kwargs))


def test_attention_shape_and_return_errors():
    with pytest.raises(ExerciseError, match="out has shape"):
        check_attention(lambda q, k, v, key_mask=None: (attention(q, k, v, key_mask)[0][:, 0],
                                                        attention(q, k, v, key_mask)[1]))
    with pytest.raises(ExerciseError, match="two tensors"):
        check_attention(lambda q, k, v, key_mask=None: attention(q, k, v, key_mask)[0])
    with pytest.raises(ExerciseError, match="weights"):  # right output, weights not normalised
        check_attention(lambda q, k, v, key_mask=None: (attention(q, k, v, key_mask)[0],
                                                        2 * attention(q, k, v, key_mask)[1]))
    with pytest.raises(ValueError, match="fn"):
        check_attention(None)


def test_causal_mask_accepts_tril(capsys):
    check_causal_mask(lambda n: torch.ones(n, n, dtype=torch.bool).tril())
    assert "PASS causal_mask" in capsys.readouterr().out


@pytest.mark.parametrize("wrong, message", [
    (lambda n: torch.ones(n, n, dtype=torch.bool).triu(), "lower triangle"),
    (lambda n: ~torch.ones(n, n, dtype=torch.bool).tril(), "True must mean"),
    (lambda n: torch.ones(n, n, dtype=torch.bool).tril(-1), "diagonal"),
    (lambda n: torch.ones(n, n).tril(), "bool"),
    (lambda n: torch.ones(n, n + 1, dtype=torch.bool).tril(), "shape"),
    (lambda n: torch.ones(n, n, dtype=torch.bool), "should be"),
])
def test_causal_mask_names_the_mistake(wrong, message):
    with pytest.raises(ExerciseError, match=message):
        check_causal_mask(wrong)


def split_heads(x, num_heads):
    B, N, D = x.shape
    return x.view(B, N, num_heads, D // num_heads).transpose(1, 2)


def merge_heads(x):
    B, H, N, hd = x.shape
    return x.transpose(1, 2).reshape(B, N, H * hd)


def test_split_merge_accepts_a_correct_pair(capsys):
    check_split_merge_heads(split_heads, merge_heads)
    assert "PASS split_merge_heads" in capsys.readouterr().out


def test_split_merge_names_the_mistake():
    with pytest.raises(ExerciseError, match="transpose"):  # view straight to (B, H, N, hd)
        check_split_merge_heads(lambda x, h: x.reshape(x.shape[0], h, x.shape[1], -1), merge_heads)
    with pytest.raises(ExerciseError, match="merge_fn"):  # reshape without transposing back
        check_split_merge_heads(split_heads, lambda y: y.reshape(y.shape[0], y.shape[2], -1))
    with pytest.raises(ExerciseError, match="NotImplementedError"):
        def stub(x, h):
            raise NotImplementedError
        check_split_merge_heads(stub, merge_heads)
    with pytest.raises(ValueError, match="merge_fn"):
        check_split_merge_heads(split_heads, 3)
