"""Parity of the fusion styles with transformers models of the same architecture.

Each HF model is built offline from a tiny random config (hidden 32, 2 heads, 1-2 layers), every
parameter is re-drawn at random (LayerNorm affine too, so a misplaced norm cannot pass), the
weights are copied with ``course_lib.fusion.hf_import`` and both models run on the same padded
batch. Tolerance: atol = rtol = 1e-5 in float32 (the two sides add the same terms in a slightly
different order; the largest difference measured is 2.2e-6).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch
from transformers import (BlipTextConfig, CLIPConfig, CLIPModel, LxmertConfig, LxmertModel, VisualBertConfig,
                          VisualBertModel)
from transformers.models.blip.modeling_blip_text import BlipTextModel

from course_lib.fusion.base import CrossAttentionSublayer
from course_lib.fusion.hf_import import (load_from_hf_blip_text, load_from_hf_blip_text_decoder, load_from_hf_clip,
                                         load_from_hf_lxmert, load_from_hf_visual_bert)
from course_lib.fusion.two_tower import TwoTowerFusion
from course_lib.models.clip import CLIP
from course_lib.models.clip import CLIPConfig as CourseCLIPConfig

torch.set_num_threads(1)
TOL = dict(atol=1e-5, rtol=1e-5)  # float32
DIM, HEADS, FFN, VOCAB = 32, 2, 64, 50


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith(("LayerNorm.weight", "layer_norm1.weight", "layer_norm2.weight",
                                         "layrnorm.weight", "layernorm.weight", "final_layer_norm.weight")) else 0.0
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + base)
    return model.eval()


def _masks():
    """Text mask (B=3, Lt=7) and image mask (B=3, Li=5) with padding in different rows."""
    text_mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4])
    image_mask = torch.tensor([[1] * 5, [1] * 5, [1] * 2 + [0] * 3])
    return text_mask, image_mask


def _ids(text_mask):
    ids = torch.randint(5, VOCAB, text_mask.shape, generator=torch.Generator().manual_seed(1))
    return ids * text_mask  # [PAD] = 0 at padding


def _assert_close_where(got, expected, mask):
    """Compare ``(B, L, D)`` tensors at the real tokens of ``mask (B, L)``."""
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], **TOL)


def test_single_stream_matches_visual_bert():
    config = VisualBertConfig(vocab_size=VOCAB, hidden_size=DIM, num_hidden_layers=2, num_attention_heads=HEADS,
                              intermediate_size=FFN, visual_embedding_dim=16, max_position_embeddings=20,
                              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    hf = _randomize(VisualBertModel(config))
    ours = load_from_hf_visual_bert(hf).eval()
    text_mask, image_mask = _masks()
    ids, feats = _ids(text_mask), torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=text_mask, visual_embeds=feats, visual_attention_mask=image_mask)
        text = hf.embeddings.word_embeddings(ids)  # the text extractor
        image = hf.embeddings.visual_projection(feats)  # the image extractor
        got = ours(text, text_mask, image, image_mask)
    _assert_close_where(got.text, expected.last_hidden_state[:, :7], text_mask)
    _assert_close_where(got.image, expected.last_hidden_state[:, 7:], image_mask)
    torch.testing.assert_close(got.pooled, expected.pooler_output, **TOL)


def test_cross_modality_matches_lxmert():
    config = LxmertConfig(vocab_size=VOCAB, hidden_size=DIM, num_attention_heads=HEADS, intermediate_size=FFN,
                          l_layers=2, x_layers=2, r_layers=1, visual_feat_dim=16, visual_pos_dim=4,
                          max_position_embeddings=20, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    hf = _randomize(LxmertModel(config))
    ours = load_from_hf_lxmert(hf).eval()
    text_mask, image_mask = _masks()
    gen = torch.Generator().manual_seed(2)
    ids, types = _ids(text_mask), torch.zeros(3, 7, dtype=torch.long)
    feats, boxes = torch.randn(3, 5, 16, generator=gen), torch.rand(3, 5, 4, generator=gen)
    with torch.no_grad():
        expected = hf(input_ids=ids, visual_feats=feats, visual_pos=boxes, attention_mask=text_mask,
                      visual_attention_mask=image_mask, token_type_ids=types)
        text = hf.embeddings(ids, types)  # word + position + type, LayerNorm
        image = hf.encoder.visn_fc(feats, boxes)  # (LN(W f) + LN(W box)) / 2
        got = ours(text, text_mask, image, image_mask)
    _assert_close_where(got.text, expected.language_output, text_mask)
    _assert_close_where(got.image, expected.vision_output, image_mask)
    torch.testing.assert_close(got.pooled, expected.pooled_output, **TOL)
    # LXMERT's single cross-attention serves both directions. Copying one HF module into two of
    # ours would pass the parity checks above, so count: one cross-attention module per layer,
    # as many parameters as HF's layer, and each module called twice per forward, text queries
    # over the 5 image tokens, then image queries over the 7 text tokens.
    for layer, hf_layer in zip(ours.cross_encoder, hf.encoder.x_layers, strict=True):
        assert sum(isinstance(m, CrossAttentionSublayer) for m in layer.modules()) == 1
        assert sum(p.numel() for p in layer.parameters()) == sum(p.numel() for p in hf_layer.parameters())
    calls = []
    hooks = [layer.cross.register_forward_hook(
        lambda module, args, out: calls.append((module, args[0].shape[1], args[1].shape[1])))
        for layer in ours.cross_encoder]
    with torch.no_grad():
        ours(text, text_mask, image, image_mask)
    for hook in hooks:
        hook.remove()
    assert calls == [(layer.cross, *lengths) for layer in ours.cross_encoder for lengths in ((7, 5), (5, 7))]


def _tiny_hf_clip() -> CLIPModel:
    text = dict(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=FFN, num_hidden_layers=2,
                num_attention_heads=HEADS, max_position_embeddings=16, hidden_act="gelu",
                pad_token_id=0, bos_token_id=1, eos_token_id=3)
    vision = dict(hidden_size=DIM, intermediate_size=FFN, num_hidden_layers=1, num_attention_heads=HEADS,
                  image_size=16, patch_size=4, hidden_act="gelu")
    return _randomize(CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)))


def test_two_tower_matches_hf_clip():
    hf = _tiny_hf_clip()
    ours = load_from_hf_clip(hf).eval()
    text_mask, _ = _masks()
    ids = _ids(text_mask)
    ids[torch.arange(3), text_mask.sum(1) - 1] = 3  # CLIP's end-of-text token, read by the pooler
    pixels = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hf_text = hf.text_model(input_ids=ids, attention_mask=text_mask)
        hf_image = hf.vision_model(pixel_values=pixels)
        text = hf.text_model.embeddings(input_ids=ids)  # token + position
        image = hf.vision_model.embeddings(pixels)  # [CLS] + patches + position
        got = ours(text, text_mask, image, None)
        expected = hf(input_ids=ids, attention_mask=text_mask, pixel_values=pixels)
    _assert_close_where(got.text, hf_text.last_hidden_state, text_mask)
    text_emb, image_emb = got.pooled
    torch.testing.assert_close(text_emb, hf.text_projection(hf_text.pooler_output), **TOL)
    torch.testing.assert_close(image_emb, hf.visual_projection(hf_image.pooler_output), **TOL)
    # CLIPModel's own output: L2-normalised embeddings.
    torch.testing.assert_close(torch.nn.functional.normalize(text_emb, dim=-1), expected.text_embeds, **TOL)
    torch.testing.assert_close(torch.nn.functional.normalize(image_emb, dim=-1), expected.image_embeds, **TOL)


def test_course_clip_is_the_two_tower_block():
    """One two-tower implementation: the course CLIP composes TwoTowerFusion, so its embeddings are the
    block's pooled outputs on CLIP's pixel and token embeddings (notebook 04 and notebook 22 run the
    same code). The HF parity of the whole model is in tests/test_clip.py."""
    torch.manual_seed(0)
    model = CLIP(CourseCLIPConfig(vocab_size=VOCAB, image_size=16, patch_size=4, vision_width=DIM, vision_layers=2,
                                  vision_heads=HEADS, text_width=DIM, text_layers=2, text_heads=HEADS,
                                  context_length=16, embed_dim=16)).eval()
    _randomize(model)
    assert type(model.towers) is TwoTowerFusion
    text_mask, _ = _masks()
    ids, images = _ids(text_mask), torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = model.towers(model.text_embed(ids), text_mask, model.image_embed(images), None)
        torch.testing.assert_close(got.pooled[0], model.text(ids, text_mask)[1], rtol=0, atol=0)
        torch.testing.assert_close(got.pooled[1], model.visual(images)[1], rtol=0, atol=0)


def _tiny_blip_text() -> BlipTextModel:
    config = BlipTextConfig(vocab_size=VOCAB, hidden_size=DIM, encoder_hidden_size=DIM, intermediate_size=FFN,
                            num_hidden_layers=2, num_attention_heads=HEADS, max_position_embeddings=20,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, is_decoder=True,
                            attn_implementation="eager")
    return _randomize(BlipTextModel(config, add_pooling_layer=False))


@pytest.mark.parametrize("decoder", [False, True], ids=["encoder", "decoder"])
def test_fusion_encoder_and_decoder_match_blip_text(decoder):
    hf = _tiny_blip_text()
    ours = (load_from_hf_blip_text_decoder(hf) if decoder else load_from_hf_blip_text(hf)).eval()
    text_mask, _ = _masks()
    # No image padding: in transformers 5.23, BlipTextAttention does not pass encoder_attention_mask on
    # to BlipTextSelfAttention, so HF's cross-attention ignores it (BLIP's ViT tokens are never padded).
    image_mask = torch.ones(3, 5, dtype=torch.long)
    ids, image = _ids(text_mask), torch.randn(3, 5, DIM, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=text_mask, encoder_hidden_states=image,
                      encoder_attention_mask=image_mask, is_decoder=decoder)
        got = ours(hf.embeddings(input_ids=ids), text_mask, image, image_mask)
    _assert_close_where(got.text, expected.last_hidden_state, text_mask)
    torch.testing.assert_close(got.image, image)  # no image encoder: the tokens pass through


def test_loaders_reject_the_wrong_model():
    with pytest.raises(ValueError, match="hf_model"):
        load_from_hf_visual_bert(_tiny_hf_clip())
    config = BlipTextConfig(vocab_size=VOCAB, hidden_size=DIM, encoder_hidden_size=DIM, intermediate_size=FFN,
                            num_hidden_layers=1, num_attention_heads=HEADS, is_decoder=False)
    with pytest.raises(ValueError, match="is_decoder"):
        load_from_hf_blip_text(BlipTextModel(config))
