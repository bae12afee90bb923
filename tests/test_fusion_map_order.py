"""Each fusion style's attention maps are read in the order that style builds its sequence.

``course_lib.widgets.text_query_attention`` cuts the text-query blocks out of a style's maps: for
merged attention out of one ``(L, L)`` map over ``[text; image]`` (single-stream, multiway) or
``[image; text]`` (three-stream, UNIMO), for the others from separate maps. Notebook 04 draws its
figures and its explorer with it. These tests run the real ``course_lib.fusion`` styles (tiny sizes)
and check the blocks against what each style actually concatenated, in two ways that do not depend on
the weights:

- **columns**: keys that are padding get exactly zero attention, so masking distinctive positions of
  the text and of the image shows where each modality's keys are;
- **rows**: when every text token is the same vector (and the image tokens differ), every layer keeps
  the text tokens identical, so every text query's row is the same; a block read at the wrong rows
  includes image queries, whose rows differ.

The test also reads three-stream's map the wrong way round (as ``[text; image]``) and checks that
both checks catch it, so they can fail.
"""

import pytest
import torch

from course_lib.fusion.registry import FUSION_STYLES, build_fusion
from course_lib.nn import init_weights
from course_lib.widgets import text_query_attention

torch.set_num_threads(1)
LT, LI, D, H = 5, 7, 16, 2
TEXT_PAD = [3]  # a padded text position in the middle, not only at the end
IMAGE_PAD = [1, 4]  # padded image positions: a pattern no other block has


def _style(name: str):
    """A 2-layer style with weights ~ N(0, 0.2) (attention far from uniform)."""
    torch.manual_seed(0)
    options = dict(dim=D, num_heads=H, num_layers=2, mlp_ratio=2.0)
    if name == "single_stream":
        options["text_positions"] = False  # nothing but the inputs tells the text tokens apart
    return init_weights(build_fusion(name, **options), std=0.2).eval()


def _masked_run(name: str):
    gen = torch.Generator().manual_seed(0)
    text, image = torch.randn(1, LT, D, generator=gen), torch.randn(1, LI, D, generator=gen)
    text_mask, image_mask = torch.ones(1, LT, dtype=torch.bool), torch.ones(1, LI, dtype=torch.bool)
    text_mask[0, TEXT_PAD], image_mask[0, IMAGE_PAD] = False, False
    with torch.no_grad():
        return _style(name)(text, text_mask, image, image_mask, return_attention=True).attentions


def _same_text_run(name: str):
    gen = torch.Generator().manual_seed(1)
    text = torch.randn(1, 1, D, generator=gen).expand(1, LT, D).contiguous()  # every text token the same
    image = torch.randn(1, LI, D, generator=gen)  # every image token different
    with torch.no_grad():
        return _style(name)(text, None, image, None, return_attention=True).attentions


def _text_layers(name: str, layers):
    """``[(to_image, to_text), ...]`` for every layer with text queries."""
    read = [text_query_attention(name, layer, image_len=LI)[:2] for layer in layers]
    return [(to_image, to_text) for to_image, to_text in read if to_image is not None or to_text is not None]


def _zero_columns(maps: torch.Tensor) -> list[int]:
    """The key positions that no query of any head attends to; ``maps (H, Nq, Nk)``."""
    return (maps == 0).all(0).all(0).nonzero().flatten().tolist()


def _rows_identical(maps: torch.Tensor) -> bool:
    """Whether every query row of ``maps (H, Nq, Nk)`` equals the first one."""
    return torch.allclose(maps, maps[:, :1].expand_as(maps), atol=1e-5)


@pytest.mark.parametrize("name", list(FUSION_STYLES))
def test_text_query_blocks_have_the_padding_of_the_style_sequence(name):
    layers = _text_layers(name, _masked_run(name))
    assert layers, f"{name} returned no layer with text queries"
    cross_modal = [to_image for to_image, _ in layers if to_image is not None]
    assert (cross_modal == []) == (name == "two_tower")  # only two-tower has no map over the image
    for to_image, to_text in layers:
        if to_image is not None:
            assert to_image.shape == (H, LT, LI)
            assert _zero_columns(to_image) == IMAGE_PAD  # exactly the padded image keys get nothing
        assert to_text.shape == (H, LT, LT)
        if name in ("two_tower", "encoder_decoder"):  # causal text: the first query sees only itself
            assert set(TEXT_PAD) <= set(_zero_columns(to_text))
            assert (to_text[..., TEXT_PAD] == 0).all()
        else:
            assert _zero_columns(to_text) == TEXT_PAD
        total = to_text.sum(-1) + (to_image.sum(-1) if to_image is not None and name in
                                   ("single_stream", "multiway", "three_stream") else 0)
        torch.testing.assert_close(total, torch.ones(H, LT))  # a merged row is split between the blocks


@pytest.mark.parametrize("name", list(FUSION_STYLES))
def test_text_query_blocks_hold_the_rows_of_the_text_tokens(name):
    for to_image, to_text in _text_layers(name, _same_text_run(name)):
        if to_image is not None:
            assert _rows_identical(to_image), f"{name}: the rows read as text queries differ"
        if name not in ("two_tower", "encoder_decoder"):  # causal rows differ by construction
            assert _rows_identical(to_text)


def test_reading_three_stream_as_text_first_is_caught():
    """UNIMO puts the image first; cutting the ``[text; image]`` blocks instead fails both checks."""
    masked = _masked_run("three_stream")[0]["joint"][0]  # (H, LI + LT, LI + LT)
    assert _zero_columns(masked[:, :LT, LT:]) != IMAGE_PAD
    same_text = _same_text_run("three_stream")[0]["joint"][0]
    assert not _rows_identical(same_text[:, :LT, LT:])
    right, _, kind = text_query_attention("three_stream", {"joint": same_text[None]}, image_len=LI)
    assert _rows_identical(right) and kind == "merged self-attention over [image; text]"
