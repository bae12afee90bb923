"""Checks for notebook 04 (fusion styles): the merged-attention input of single-stream models and one
co-attention step (text queries over image keys/values), graded against ``course_lib.fusion``."""

from __future__ import annotations

import torch
from torch import nn

from course_lib.checks.verdict import call_learner, check_callable, expect, expect_close, passed
from course_lib.fusion.base import CrossAttentionSublayer
from course_lib.fusion.single_stream import SingleStreamFusion
from course_lib.nn import init_weights


def _pair(result, check: str, what: str):
    expect(isinstance(result, (tuple, list)) and len(result) == 2, check,
           f"return a pair {what}, got {type(result).__name__}")
    return result


def _padded_inputs(seed: int, B: int = 3, Lt: int = 5, Li: int = 7, D: int = 16):
    g = torch.Generator().manual_seed(seed)
    text, image = torch.randn(B, Lt, D, generator=g), torch.randn(B, Li, D, generator=g)
    text_mask = torch.ones(B, Lt, dtype=torch.bool)
    text_mask[1, 3:] = False  # a short caption
    image_mask = torch.ones(B, Li, dtype=torch.bool)
    image_mask[2, 4:] = False  # an image with fewer regions
    return text, text_mask, image, image_mask


def check_merged_input(merged_input_fn) -> None:
    """``merged_input_fn(text (B, Lt, D), text_mask (B, Lt), image (B, Li, D), image_mask (B, Li),
    type_embeddings (2, D)) -> (x (B, Lt + Li, D), mask (B, Lt + Li) bool)``: text first, each token plus
    its modality's type embedding (0 = text, 1 = image), and the joint key mask."""
    name = "check_merged_input"
    check_callable("merged_input_fn", merged_input_fn, name)
    for seed in range(3):
        text, text_mask, image, image_mask = _padded_inputs(seed)
        D = text.shape[-1]
        torch.manual_seed(seed)
        style = SingleStreamFusion(dim=D, num_heads=2, num_layers=1, text_positions=False)
        style.embed_norm = nn.Identity()  # the library's merged input, before its LayerNorm
        types = style.type_embeddings.weight.detach()  # (2, D)
        with torch.no_grad():
            want_x = style.embed(text, image)  # (B, Lt + Li, D)
        want_mask = torch.cat([text_mask, image_mask], dim=1)
        x, mask = _pair(call_learner(name, merged_input_fn, text.clone(), text_mask.clone(), image.clone(),
                              image_mask.clone(), types.clone()), name, "(x, mask)")
        if isinstance(x, torch.Tensor) and x.shape == want_x.shape and not torch.allclose(x, want_x, atol=1e-5):
            hints = [
                (torch.cat([image + types[1], text + types[0]], 1), "put the text tokens first: [text; image]"),
                (torch.cat([text, image], 1), "add the type embedding of each modality to its tokens"),
                (torch.cat([text + types[1], image + types[0]], 1), "type 0 is text and type 1 is image"),
                (torch.cat([text + types[0], image + types[0]], 1), "the image tokens need type 1, not type 0"),
            ]
            for wrong, hint in hints:
                expect(not torch.allclose(x, wrong, atol=1e-5), name, hint)
        expect_close(x, want_x, name, "the merged input x")
        expect(isinstance(mask, torch.Tensor), name, f"mask should be a torch.Tensor, got {type(mask).__name__}")
        expect(tuple(mask.shape) == tuple(want_mask.shape), name,
               f"mask has shape {tuple(mask.shape)}, expected {tuple(want_mask.shape)}: one entry per token of x")
        expect(mask.dtype == torch.bool, name, f"mask should be bool (True = a real token), got {mask.dtype}")
        expect(torch.equal(mask, want_mask), name,
               "mask must be the text mask followed by the image mask (padding stays False)")
    passed(name, "3 batches with padded text and images match SingleStreamFusion.embed's input and the joint mask")


def _reference_layer(seed: int, D: int, heads: int) -> CrossAttentionSublayer:
    torch.manual_seed(seed)
    layer = CrossAttentionSublayer(D, heads).eval()
    init_weights(layer, std=0.3)  # larger than BERT's 0.02, so attention is far from uniform
    with torch.no_grad():
        layer.norm.weight.uniform_(0.5, 1.5)
        layer.norm.bias.normal_(0.0, 0.1)
        for linear in (layer.attn.query, layer.attn.key, layer.attn.value, layer.attn.out):
            linear.bias.normal_(0.0, 0.1)
    return layer


def check_co_attention_step(co_attention_fn) -> None:
    """``co_attention_fn(layer, text (B, Lt, D), image (B, Li, D), image_mask (B, Li)) ->
    (new_text (B, Lt, D), attn (B, H, Lt, Li))``: ViLBERT's text-to-image half of a co-attention block,
    ``LN(text + W_o MHA(Q = W_q text, K = W_k image, V = W_v image))``, with ``layer`` a
    ``CrossAttentionSublayer`` (``layer.attn.query/key/value/out``, ``layer.attn.num_heads``, ``layer.norm``)."""
    name = "check_co_attention_step"
    check_callable("co_attention_fn", co_attention_fn, name)
    for seed, heads in ((0, 2), (1, 4), (2, 1)):
        text, _, image, image_mask = _padded_inputs(seed)
        D = text.shape[-1]
        layer = _reference_layer(seed, D, heads)
        with torch.no_grad():
            want_text, want_attn = layer(text, image, image_mask, return_attention=True)
        with torch.no_grad():
            result = call_learner(name, co_attention_fn, layer, text.clone(), image.clone(), image_mask.clone())
        new_text, attn = _pair(result, name, "(new_text, attn)")
        expect(isinstance(attn, torch.Tensor), name, f"attn should be a torch.Tensor, got {type(attn).__name__}")
        expect(tuple(attn.shape) == tuple(want_attn.shape), name,
               f"attn has shape {tuple(attn.shape)}, expected {tuple(want_attn.shape)} = (B, heads, Lt, Li): "
               "split D into heads and keep one map per head")
        expect(torch.allclose(attn.sum(-1), torch.ones(attn.shape[:-1]), atol=1e-4), name,
               "each row of attn must sum to 1 over the image tokens: softmax over the last (key) axis")
        expect(bool((attn[~image_mask[:, None, None, :].expand_as(attn)].abs() < 1e-6).all()), name,
               "padded image tokens (image_mask False) must get zero attention: mask the scores with -inf first")
        expect_close(attn, want_attn, name,
                     f"the attention weights ({heads} heads; scores are q.k / sqrt(head_dim))", atol=1e-5)
        expect_close(new_text, want_text, name,
                     "new_text (the output projection, then the residual and the LayerNorm: LN(text + out))",
                     atol=1e-4)
    passed(name, "3 layers (1, 2 and 4 heads, padded images) match CrossAttentionSublayer's output and attention")
