"""Tests of course_lib.fusion: output shapes of every style, padding masks, what attends to what
(co-attention, LXMERT's shared cross-attention, multiway experts, causal decoding), parameter and
FLOP counts checked by hand, and bad-input errors. HF parity lives in test_fusion_parity.py."""

import math

import pytest
import torch
from torch import nn

from course_lib.fusion.flops import compare_fusion_styles, count_flops, format_fusion_table
from course_lib.fusion.registry import FUSION_STYLES, build_fusion
from course_lib.nn import MultiHeadAttention, init_weights

torch.set_num_threads(1)
B, LT, LI, D, H = 2, 5, 7, 32, 2
SIZES = dict(dim=D, num_heads=H, num_layers=2)
TOL = dict(atol=1e-5, rtol=1e-5)  # float32; outputs that must not move at all move by ~1e-7 at most


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    text, image = torch.randn(B, LT, D, generator=gen), torch.randn(B, LI, D, generator=gen)
    text_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    image_mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0], [1] * 7], dtype=torch.bool)
    return text, text_mask, image, image_mask


def _style(name, **options):
    """A style with weights ~ N(0, 0.2): larger than BERT's 0.02, so that attention is far from uniform
    and every token's influence on the others is well above float32 noise."""
    torch.manual_seed(0)
    return init_weights(build_fusion(name, **{**SIZES, **options}), std=0.2).eval()


def _pooled(out):
    return torch.cat(out.pooled, -1) if isinstance(out.pooled, tuple) else out.pooled


# ------------------------------------------------------------------ shapes and masks


EXPECTED_KEYS = {
    "single_stream": [{"self"}] * 2,
    "dual_stream": [{"text_to_image", "image_to_text", "text_self", "image_self"}] * 2,
    "cross_modality": [{"text_self"}] * 2 + [{"image_self"}] * 2 + [{"text_to_image", "image_to_text", "text_self",
                                                                     "image_self"}] * 2,
    "two_tower": [{"text_self"}] * 2 + [{"image_self"}] * 2,
    "fusion_encoder": [{"image_self"}] * 2 + [{"text_self", "text_to_image"}] * 2,
    "multiway": [{"self"}] * 2,
    "encoder_decoder": [{"image_self"}] * 2 + [{"text_self", "text_to_image"}] * 2,
    "three_stream": [{"joint", "text_self", "image_self"}] * 2,
}
MAP_SHAPES = {"self": (B, H, LT + LI, LT + LI), "joint": (B, H, LI + LT, LI + LT), "text_self": (B, H, LT, LT),
              "image_self": (B, H, LI, LI), "text_to_image": (B, H, LT, LI), "image_to_text": (B, H, LI, LT)}


def test_registry_lists_every_style():
    assert set(FUSION_STYLES) == set(EXPECTED_KEYS)


@pytest.mark.parametrize("name", list(FUSION_STYLES))
def test_output_shapes_and_attention_maps(name):
    style = _style(name)
    text, text_mask, image, image_mask = _inputs()
    out = style(text, text_mask, image, image_mask)
    assert out.text.shape == (B, LT, D) and out.image.shape == (B, LI, D)
    if name == "two_tower":
        assert [p.shape for p in out.pooled] == [(B, D), (B, D)]
    else:
        assert out.pooled.shape == (B, D)
    assert [set(m) for m in out.attentions] == EXPECTED_KEYS[name]
    assert all(v is None for m in out.attentions for v in m.values())

    maps = style(text, text_mask, image, image_mask, return_attention=True).attentions
    for m in maps:
        for key, attn in m.items():
            assert attn.shape == MAP_SHAPES[key], (key, attn.shape)
            torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[:-1]), **TOL)  # rows are softmaxes


@pytest.mark.parametrize("name", list(FUSION_STYLES))
def test_padding_never_changes_real_outputs(name):
    style = _style(name)
    text, text_mask, image, image_mask = _inputs()
    before = style(text, text_mask, image, image_mask)
    gen = torch.Generator().manual_seed(5)
    text2 = torch.where(text_mask[..., None], text, 100 * torch.randn(B, LT, D, generator=gen))
    image2 = torch.where(image_mask[..., None], image, 100 * torch.randn(B, LI, D, generator=gen))
    after = style(text2, text_mask, image2, image_mask)
    torch.testing.assert_close(after.text[text_mask], before.text[text_mask], **TOL)
    torch.testing.assert_close(after.image[image_mask], before.image[image_mask], **TOL)
    torch.testing.assert_close(_pooled(after), _pooled(before), **TOL)
    for key, mask in [("text_only", text_mask), ("image_only", image_mask)]:
        if key in before.extras:
            torch.testing.assert_close(after.extras[key][mask], before.extras[key][mask], **TOL)
    # ... while a real token does change them (the comparison can fail).
    text3 = text.clone()
    text3[0, 1] += torch.randn(D, generator=gen)  # not a constant shift, which a LayerNorm would erase
    assert not torch.allclose(style(text3, text_mask, image, image_mask).text[0, 1], before.text[0, 1])


def test_masks_may_be_none_or_0_1_integers():
    style = _style("single_stream")
    text, text_mask, image, image_mask = _inputs()
    as_bool = style(text, text_mask, image, image_mask).text
    torch.testing.assert_close(style(text, text_mask.long(), image, image_mask.long()).text, as_bool)
    full = style(text, None, image, None).text
    torch.testing.assert_close(full, style(text, torch.ones(B, LT), image, torch.ones(B, LI)).text)


@pytest.mark.parametrize("name", list(FUSION_STYLES))
def test_training_mode_gradient_reaches_every_parameter(name):
    style = _style(name, dropout=0.1).train()
    out = style(*_inputs())
    loss = out.text.square().mean() + out.image.square().mean() + _pooled(out).square().mean()
    loss = loss + sum(v.square().mean() for v in out.extras.values())
    loss.backward()
    unused = [n for n, p in style.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert unused == []


# ------------------------------------------------------------------ what attends to what


def _softmax_scores(attn: MultiHeadAttention, queries, keys, key_mask):
    """Naive ``softmax(Q K^T / sqrt(d))`` per head from the module's own weights: ``(B, H, Nq, Nk)``."""
    q = attn.query(queries).view(B, queries.shape[1], H, D // H).transpose(1, 2)
    k = attn.key(keys).view(B, keys.shape[1], H, D // H).transpose(1, 2)
    scores = q @ k.transpose(-2, -1) / math.sqrt(D // H)
    return scores.masked_fill(~key_mask[:, None, None, :], float("-inf")).softmax(-1)


def test_co_attention_text_queries_attend_to_image_keys():
    style = _style("dual_stream")
    text, text_mask, image, image_mask = _inputs()
    first = style(text, text_mask, image, image_mask, return_attention=True).attentions[0]
    assert first["text_to_image"].shape == (B, H, LT, LI)  # text queries over image keys
    assert first["image_to_text"].shape == (B, H, LI, LT)
    co = style.co_attention[0]
    expected_t2i = _softmax_scores(co.text_to_image.attn, text, image, image_mask)
    expected_i2t = _softmax_scores(co.image_to_text.attn, image, text, text_mask)
    torch.testing.assert_close(first["text_to_image"], expected_t2i, **TOL)
    torch.testing.assert_close(first["image_to_text"], expected_i2t, **TOL)
    assert (first["text_to_image"][0, :, :, 4:] == 0).all()  # padded image keys get no weight


def test_lxmert_cross_attention_is_one_module_for_both_directions():
    style = _style("cross_modality", text_layers=0, image_layers=0)
    text, text_mask, image, image_mask = _inputs()
    first = style(text, text_mask, image, image_mask, return_attention=True).attentions[0]
    shared = style.cross_encoder[0].cross.attn
    torch.testing.assert_close(first["text_to_image"], _softmax_scores(shared, text, image, image_mask), **TOL)
    torch.testing.assert_close(first["image_to_text"], _softmax_scores(shared, image, text, text_mask), **TOL)
    # The dual-stream block has two cross-attentions per layer, LXMERT's one; both have 2 self-attention layers.
    cross_params = sum(p.numel() for p in style.cross_encoder[0].cross.parameters())
    assert cross_params == 4 * (D * D + D) + 2 * D


def _zero_(module: nn.Module):
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()


def test_multiway_routes_each_modality_to_its_expert():
    text, text_mask, image, image_mask = _inputs()
    base = _style("multiway")(text, text_mask, image, image_mask)
    for expert, changed, unchanged in [("image_expert", "image", "text"), ("text_expert", "text", "image")]:
        style = _style("multiway")
        _zero_(getattr(style.layers[-1], expert))  # the last layer: nothing downstream mixes the tokens
        out = style(text, text_mask, image, image_mask)
        torch.testing.assert_close(getattr(out, unchanged), getattr(base, unchanged), **TOL)
        assert not torch.allclose(getattr(out, changed), getattr(base, changed), atol=1e-3)
    # In an earlier layer, the shared attention carries the image expert's change into the text tokens.
    style = _style("multiway")
    _zero_(style.layers[0].image_expert)
    assert not torch.allclose(style(text, text_mask, image, image_mask).text, base.text, atol=1e-3)


def test_multiway_vision_language_expert_in_top_layers():
    text, text_mask, image, image_mask = _inputs()
    style = _style("multiway", vl_layers=1)
    assert style.layers[0].vl_expert is None and style.layers[1].vl_expert is not None
    base = style(text, text_mask, image, image_mask)
    image_alone, _ = style.encode(image, image_mask, "image")
    _zero_(style.layers[1].image_expert)  # unused by pairs in the top layer, used by images alone
    torch.testing.assert_close(style(text, text_mask, image, image_mask).image, base.image, **TOL)
    assert not torch.allclose(style.encode(image, image_mask, "image")[0], image_alone, atol=1e-3)
    _zero_(style.layers[1].vl_expert)  # takes text and image tokens of a pair
    out = style(text, text_mask, image, image_mask)
    assert not torch.allclose(out.text, base.text, atol=1e-3) and not torch.allclose(out.image, base.image, atol=1e-3)


def test_encoder_decoder_is_causal_over_text_and_sees_all_of_the_image():
    style = _style("encoder_decoder")
    text, text_mask, image, image_mask = _inputs()
    base = style(text, text_mask, image, image_mask, return_attention=True)
    bump = torch.randn(D, generator=torch.Generator().manual_seed(3))
    text2 = text.clone()
    text2[:, 2] += bump
    out = style(text2, text_mask, image, image_mask)
    torch.testing.assert_close(out.text[:, :2], base.text[:, :2], **TOL)  # the past ignores the future
    assert not torch.allclose(out.text[:, 2:], base.text[:, 2:], atol=1e-3)
    causal = base.attentions[-1]["text_self"]
    assert (causal.triu(diagonal=1) == 0).all()
    image2 = image.clone()
    image2[:, 0] += bump  # the first text token already sees the image
    assert not torch.allclose(style(text, text_mask, image2, image_mask).text[:, 0], base.text[:, 0], atol=1e-3)
    # pooled = the last real text token's state
    torch.testing.assert_close(base.pooled, torch.stack([base.text[0, 4], base.text[1, 2]]))


def test_three_stream_unimodal_streams_share_the_joint_weights():
    style = _style("three_stream")
    text, text_mask, image, image_mask = _inputs()
    out = style(text, text_mask, image, image_mask)
    text_alone, _ = style.encoder(style.text_norm(text), text_mask)
    torch.testing.assert_close(out.extras["text_only"], text_alone)
    assert out.extras["text_pooled"].shape == out.extras["image_pooled"].shape == (B, D)
    assert not torch.allclose(out.text[text_mask], out.extras["text_only"][text_mask], atol=1e-3)  # pairing matters


# ------------------------------------------------------------------ parameters and FLOPs


def test_flops_of_linear_and_attention_by_hand():
    assert count_flops(nn.Linear(3, 5), torch.randn(2, 4, 3)) == 2 * (2 * 4) * 3 * 5  # 2 per multiply-add
    attn = MultiHeadAttention(D, H)
    x, ctx = torch.randn(B, LT, D), torch.randn(B, LI, D)
    projections = 2 * B * LT * D * D * 2 + 2 * B * LI * D * D * 2  # Q and out on LT tokens, K and V on LI
    products = 2 * 2 * B * H * LT * LI * (D // H)  # Q K^T and attn @ V
    for return_attention in (False, True):  # fused kernel and explicit matmuls count the same
        assert count_flops(attn, x, ctx, return_attention=return_attention) == projections + products


def _bert_layer_flops(n, hidden=4 * D):
    return 2 * n * (4 * D * D + 2 * D * hidden) + 4 * n * n * D


def test_single_and_three_stream_flops_and_params_by_hand():
    single, three = _style("single_stream"), _style("three_stream")
    pooler = 2 * D * D
    assert single.flops(1, LT, LI) == 2 * _bert_layer_flops(LT + LI) + pooler
    # UNIMO runs the same encoder three times (pair, text alone, image alone) and four poolers.
    assert three.flops(1, LT, LI) == 2 * sum(_bert_layer_flops(n) for n in (LT + LI, LT, LI)) + 4 * pooler
    layer = 4 * (D * D + D) + (D * 4 * D + 4 * D) + (4 * D * D + D) + 2 * 2 * D  # attention, FFN, 2 LayerNorms
    assert single.num_parameters() == 2 * layer + 2 * D + 64 * D + 2 * D + (D * D + D)  # + types, positions, LN, pooler
    assert three.num_parameters() == 2 * layer + 2 * 2 * D + 2 * (D * D + D)


def test_compare_fusion_styles_table():
    rows = compare_fusion_styles(dim=D, num_heads=H, num_layers=1, text_len=LT, image_len=LI)
    assert [r["name"] for r in rows] == list(FUSION_STYLES)
    by_name = {r["name"]: r for r in rows}
    assert by_name["single_stream"]["flops"] == _bert_layer_flops(LT + LI) + 2 * D * D
    assert by_name["multiway"]["flops"] == by_name["single_stream"]["flops"]  # experts: more weights, same work
    assert by_name["multiway"]["params"] > by_name["single_stream"]["params"]
    table = format_fusion_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| two_tower |" in table


# ------------------------------------------------------------------ bad inputs


def test_bad_inputs_name_the_argument():
    style = _style("single_stream", max_text_len=6)
    text, text_mask, image, image_mask = _inputs()
    with pytest.raises(ValueError, match="text must have shape"):
        style(text[..., :-1], text_mask, image, image_mask)
    with pytest.raises(ValueError, match="image must have shape"):
        style(text, text_mask, image[:1], image_mask)
    with pytest.raises(ValueError, match="text_mask must have shape"):
        style(text, text_mask[:, :3], image, image_mask)
    with pytest.raises(ValueError, match="image_mask row 1 has no real token"):
        style(text, text_mask, image, torch.tensor([[1] * 7, [0] * 7]))
    with pytest.raises(ValueError, match="text_mask must hold 0/1"):
        style(text, torch.full((B, LT), 2), image, image_mask)
    with pytest.raises(ValueError, match="text must be a floating-point"):
        style(text.long(), text_mask, image, image_mask)
    long_text = torch.randn(B, 7, D)
    with pytest.raises(ValueError, match="max_text_len=6"):
        style(long_text, None, image, image_mask)


def test_bad_configuration_names_the_option():
    with pytest.raises(ValueError, match=r"name='triple_stream'.*single_stream.*three_stream"):
        build_fusion("triple_stream")
    with pytest.raises(ValueError, match="unknown option 'vl_layer'.*vl_layers"):
        build_fusion("multiway", vl_layer=1)
    with pytest.raises(ValueError, match="num_heads=3"):
        build_fusion("dual_stream", dim=32, num_heads=3)
    with pytest.raises(ValueError, match="vl_layers=3 must be <= num_layers=2"):
        build_fusion("multiway", num_layers=2, vl_layers=3)
    with pytest.raises(ValueError, match="fusion_layers"):
        build_fusion("fusion_encoder", num_layers=2, fusion_layers=0)
    with pytest.raises(ValueError, match="activation"):
        build_fusion("three_stream", activation="swish")
    with pytest.raises(ValueError, match="modality"):
        _style("multiway").encode(torch.randn(1, 3, D), None, "audio")
    with pytest.raises(ValueError, match="module must be a torch.nn.Module"):
        count_flops("not a module")
