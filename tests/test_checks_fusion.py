"""The grading functions of notebook 04 accept right answers and reject wrong ones with a message
that says what to fix."""

import math

import pytest
import torch

from course_lib.checks import ExerciseError
from course_lib.checks.fusion import check_co_attention_step, check_merged_input

torch.set_num_threads(1)


# ------------------------------------------------------------------------------ merged input


def merged_right(text, text_mask, image, image_mask, types):
    x = torch.cat([text + types[0], image + types[1]], dim=1)
    return x, torch.cat([text_mask, image_mask], dim=1).bool()


def test_merged_input_accepts_right_answer(capsys):
    check_merged_input(merged_right)
    assert "PASS check_merged_input" in capsys.readouterr().out


def test_merged_input_hand_computed_case():
    # D = 2, one text token and one image token: [t + type0; v + type1], mask [1, 0], by hand.
    types = torch.tensor([[1.0, 0.0], [0.0, 10.0]])
    x, mask = merged_right(torch.tensor([[[1.0, 2.0]]]), torch.tensor([[True]]), torch.tensor([[[3.0, 4.0]]]),
                           torch.tensor([[False]]), types)
    torch.testing.assert_close(x, torch.tensor([[[2.0, 2.0], [3.0, 14.0]]]))
    assert mask.tolist() == [[True, False]]


@pytest.mark.parametrize("wrong, message", [
    (lambda t, tm, v, vm, ty: (torch.cat([v + ty[1], t + ty[0]], 1), torch.cat([vm, tm], 1)), "text tokens first"),
    (lambda t, tm, v, vm, ty: (torch.cat([t, v], 1), torch.cat([tm, vm], 1)), "add the type embedding"),
    (lambda t, tm, v, vm, ty: (torch.cat([t + ty[1], v + ty[0]], 1), torch.cat([tm, vm], 1)), "type 0 is text"),
    (lambda t, tm, v, vm, ty: (torch.cat([t + ty[0], v + ty[0]], 1), torch.cat([tm, vm], 1)), "need type 1"),
    (lambda t, tm, v, vm, ty: (merged_right(t, tm, v, vm, ty)[0], torch.ones(t.shape[0], t.shape[1] + v.shape[1])),
     "should be bool"),
    (lambda t, tm, v, vm, ty: (merged_right(t, tm, v, vm, ty)[0],
                               torch.ones(t.shape[0], t.shape[1] + v.shape[1], dtype=torch.bool)), "padding stays False"),
    (lambda t, tm, v, vm, ty: merged_right(t, tm, v, vm, ty)[0], "return a pair"),
])
def test_merged_input_rejects_wrong_answers(wrong, message):
    with pytest.raises(ExerciseError, match=message):
        check_merged_input(wrong)


def test_merged_input_stub():
    def stub(*args):
        raise NotImplementedError

    with pytest.raises(ExerciseError, match="NotImplementedError"):
        check_merged_input(stub)


# ------------------------------------------------------------------------------ co-attention


def co_attention_right(layer, text, image, image_mask):
    mha = layer.attn
    B, Lt, D = text.shape
    H = mha.num_heads
    d = D // H

    def heads(x):  # (B, N, D) -> (B, H, N, d)
        return x.view(B, x.shape[1], H, d).transpose(1, 2)

    q, k, v = heads(mha.query(text)), heads(mha.key(image)), heads(mha.value(image))
    scores = q @ k.transpose(-2, -1) / math.sqrt(d)  # (B, H, Lt, Li)
    scores = scores.masked_fill(~image_mask[:, None, None, :], float("-inf"))
    attn = scores.softmax(-1)
    out = (attn @ v).transpose(1, 2).reshape(B, Lt, D)
    return layer.norm(text + mha.out(out)), attn


def test_co_attention_accepts_right_answer(capsys):
    check_co_attention_step(co_attention_right)
    assert "PASS check_co_attention_step" in capsys.readouterr().out


def test_co_attention_hand_computed_case():
    # One head, D = 1, identity projections, no LayerNorm scale change: text 0 attends to image [0, 1]
    # with scores [0, 0] -> weights [1/2, 1/2] -> out = (a + b) / 2, by hand.
    from course_lib.fusion.base import CrossAttentionSublayer

    layer = CrossAttentionSublayer(1, 1)
    with torch.no_grad():
        for linear in (layer.attn.query, layer.attn.key, layer.attn.value, layer.attn.out):
            linear.weight.fill_(1.0)
            linear.bias.zero_()
    text = torch.zeros(1, 1, 1)
    image = torch.tensor([[[2.0], [4.0]]])
    _, attn = co_attention_right(layer, text, image, torch.ones(1, 2, dtype=torch.bool))
    torch.testing.assert_close(attn, torch.tensor([[[[0.5, 0.5]]]]))


def _variant(no_scale=False, no_mask=False, softmax_dim=-1, no_residual=False, one_head=False):
    def fn(layer, text, image, image_mask):
        mha = layer.attn
        B, Lt, D = text.shape
        H = 1 if one_head else mha.num_heads
        d = D // H

        def heads(x):
            return x.view(B, x.shape[1], H, d).transpose(1, 2)

        q, k, v = heads(mha.query(text)), heads(mha.key(image)), heads(mha.value(image))
        scores = q @ k.transpose(-2, -1) / (1.0 if no_scale else math.sqrt(d))
        if not no_mask:
            scores = scores.masked_fill(~image_mask[:, None, None, :], float("-inf"))
        attn = scores.softmax(softmax_dim)
        out = mha.out((attn.nan_to_num() @ v).transpose(1, 2).reshape(B, Lt, D))
        return (layer.norm(out) if no_residual else layer.norm(text + out)), attn

    return fn


@pytest.mark.parametrize("kwargs, message", [
    (dict(no_scale=True), "sqrt"),
    (dict(no_mask=True), "zero attention"),
    (dict(softmax_dim=-2), "sum to 1"),
    (dict(no_residual=True), "residual"),
    (dict(one_head=True), r"\(B, heads, Lt, Li\)"),
])
def test_co_attention_rejects_wrong_answers(kwargs, message):
    with pytest.raises(ExerciseError, match=message):
        check_co_attention_step(_variant(**kwargs))


def test_co_attention_crash_is_a_verdict():
    with pytest.raises(ExerciseError, match="raised"):
        check_co_attention_step(lambda layer, text, image, mask: text @ image)
