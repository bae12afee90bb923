"""The explorers of course_lib.widgets, driven as a user would (setting a control's .value redraws):
each output follows its controls, each fusion style's maps are read in the order the style builds its
sequence, and bad arguments raise a ValueError that names them."""

import numpy as np
import pytest
import torch
from torch import nn

from course_lib.data import ShapeWorld, WorldConfig
from course_lib.data.datasets import build_tokenizer
from course_lib.features.patch import PatchEmbedding
from course_lib.features.text import TextEmbeddings
from course_lib.fusion.registry import FUSION_STYLES, build_fusion
from course_lib.models.clip import CLIP, CLIPConfig
from course_lib.objectives.mlm import MLMHead
from course_lib.widgets import (attention_explorer, masked_word_playground, retrieval_playground,
                                text_query_attention, transport_explorer)

GRID = (2, 2)  # a 2 x 2 patch grid plus the image [CLS]: Li = 5
LT, LI, H = 6, 5, 2
TOKENS = ["[CLS]", "a", "red", "circle", "[SEP]"]  # 5 real text tokens; position 5 is padding


@pytest.fixture(scope="module")
def world():
    return ShapeWorld(WorldConfig(image_size=32, max_objects=2, seed=0))


@pytest.fixture(scope="module")
def tokenizer(world):
    return build_tokenizer(world, vocab_size=128, num_scenes=100)


@pytest.fixture(scope="module")
def pictures(world):
    return world.images(range(8), "val")  # (8, 3, 32, 32) in [0, 1]


def bars(view, axis: int, horizontal: bool = False) -> list[float]:
    """The heights (widths, for ``horizontal`` bars) of the bar chart on axis ``axis`` of the last figure."""
    return [p.get_width() if horizontal else p.get_height() for p in view.figure.axes[axis].patches]


# ---------------------------------------------------------------------------- attention explorer


def hand_made_layers(style: str, to_image: torch.Tensor, to_text: torch.Tensor) -> list[dict]:
    """``FusionOutput.attentions`` of ``style`` (batch of 1) whose text-query blocks are ``to_image
    (H, Lt, Li)`` and ``to_text (H, Lt, Lt)``, laid out as the style builds its sequence; every other
    block is noise, so reading the wrong block gives other numbers."""
    g = torch.Generator().manual_seed(1)

    def noise(*shape):
        return torch.rand(1, H, *shape, generator=g)

    if style in ("single_stream", "multiway"):  # [text; image]
        joint = noise(LT + LI, LT + LI)
        joint[0, :, :LT, LT:], joint[0, :, :LT, :LT] = to_image, to_text
        return [{"self": joint}]
    if style == "three_stream":  # UNIMO: [image; text]; text_self is the unimodal stream, not the pair
        joint = noise(LI + LT, LI + LT)
        joint[0, :, LI:, :LI], joint[0, :, LI:, LI:] = to_image, to_text
        return [{"joint": joint, "text_self": noise(LT, LT), "image_self": noise(LI, LI)}]
    if style == "two_tower":
        return [{"text_self": to_text[None]}, {"image_self": noise(LI, LI)}]
    cross = {"text_to_image": to_image[None], "text_self": to_text[None]}
    if style in ("dual_stream", "cross_modality"):
        cross.update(image_to_text=noise(LI, LT), image_self=noise(LI, LI))
    return [{"image_self": noise(LI, LI)}, cross]  # an image-only layer first, as the encoders run


@pytest.mark.parametrize("style", list(FUSION_STYLES))
def test_attention_is_read_in_each_styles_sequence_order(style, pictures):
    to_image, to_text = torch.rand(H, LT, LI) / 10, torch.rand(H, LT, LT) / 10
    to_image[:, 2], to_text[:, 2] = 0.0, 0.0
    to_image[:, 2, 3] = 0.9  # "red" looks at image token 3: patch (1, 0) after the [CLS]
    to_text[:, 2, 3] = 0.8  # ... and at "circle"
    layers = hand_made_layers(style, to_image, to_text)
    layer = layers[0] if style == "two_tower" else layers[-1]  # two-tower's text layer comes first
    got_image, got_text, kind = text_query_attention(style, layer, image_len=LI)
    torch.testing.assert_close(got_text, to_text)
    view = attention_explorer({style: layers}, pictures[0], TOKENS, grid=GRID, query="red")
    assert view.controls["query"].value == 2
    assert bars(view, 1) == pytest.approx(to_text[:, 2, :5].mean(0).tolist())
    if style == "two_tower":
        assert got_image is None and "no cross-modal attention" in kind
        assert "two_tower has no cross-modal attention" in view.readout.value
    else:
        torch.testing.assert_close(got_image, to_image)
        assert "image tokens" in view.readout.value and "patch (1, 0) 0.90" in view.readout.value
        heat = view.figure.axes[0].images[-1].get_array()  # (32, 32), upsampled from the 2 x 2 patches
        assert np.unravel_index(np.argmax(heat), heat.shape)[0] >= 16  # the bottom-left patch is hottest
        assert np.unravel_index(np.argmax(heat), heat.shape)[1] < 16


@pytest.mark.parametrize("style", list(FUSION_STYLES))
def test_attention_explorer_follows_every_control_on_real_models(style, pictures):
    torch.manual_seed(0)
    fusion = build_fusion(style, dim=16, num_heads=2, num_layers=2).eval()
    text, image = torch.randn(1, LT, 16), torch.randn(1, LI, 16)
    text_mask = torch.tensor([[True] * 5 + [False]])
    with torch.no_grad():
        out = fusion(text, text_mask, image, None, return_attention=True)
    view = attention_explorer({style: out.attentions}, pictures[0], TOKENS, grid=GRID)
    seen = {view.readout.value}
    for name, value in (("query", 3), ("head", 1), ("layer", view.controls["layer"].options[0][1])):
        view.controls[name].value = value
        seen.add(view.readout.value)
    assert len(seen) == 4 if len(view.controls["layer"].options) > 1 else len(seen) == 3
    assert "query <b>circle</b>" in view.readout.value and "head 1" in view.readout.value


def test_attention_explorer_switches_styles_and_draws_region_boxes(pictures):
    to_image, to_text = torch.full((H, LT, 3), 0.1), torch.full((H, LT, LT), 0.1)
    to_image[:, 1, 1] = 0.7  # "a" looks at region 1
    maps = {"fusion_encoder": hand_made_layers("fusion_encoder", to_image, to_text),
            "two_tower": hand_made_layers("two_tower", to_image, to_text)}
    boxes = [[2, 2, 10, 10], [12, 12, 20, 20], [22, 4, 30, 12]]
    view = attention_explorer(maps, pictures[0], TOKENS, boxes=boxes, image_cls=False)
    view.controls["query"].value = 1
    widths = [p.get_linewidth() for p in view.figure.axes[0].patches]
    assert int(np.argmax(widths)) == 1 and "region 1 0.70" in view.readout.value
    view.controls["style"].value = "two_tower"
    assert [label for label, _ in view.controls["head"].options] == ["mean of heads", "head 0", "head 1"]
    assert "two_tower has no cross-modal attention" in view.readout.value


def test_attention_explorer_names_bad_arguments(pictures):
    layers = hand_made_layers("single_stream", torch.rand(H, LT, LI), torch.rand(H, LT, LT))
    with pytest.raises(ValueError, match="style"):
        attention_explorer({"late_fusion": layers}, pictures[0], TOKENS, grid=GRID)
    with pytest.raises(ValueError, match="image"):  # a batch, not one image
        attention_explorer({"single_stream": layers}, pictures, TOKENS, grid=GRID)
    with pytest.raises(ValueError, match="image"):  # still normalised
        attention_explorer({"single_stream": layers}, pictures[0] * 2 - 1, TOKENS, grid=GRID)
    with pytest.raises(ValueError, match="grid"):
        attention_explorer({"single_stream": layers}, pictures[0], TOKENS)
    with pytest.raises(ValueError, match="image_len"):  # a 3 x 3 grid: 10 image tokens, not 5
        attention_explorer({"dual_stream": hand_made_layers("dual_stream", torch.rand(H, LT, LI),
                                                             torch.rand(H, LT, LT))}, pictures[0], TOKENS, grid=(3, 3))
    with pytest.raises(ValueError, match="tokens"):
        attention_explorer({"single_stream": layers}, pictures[0], TOKENS * 2, grid=GRID)
    with pytest.raises(ValueError, match="query"):
        attention_explorer({"single_stream": layers}, pictures[0], TOKENS, grid=GRID, query="blue")
    with pytest.raises(ValueError, match="return_attention"):
        attention_explorer({"single_stream": [{"self": None}]}, pictures[0], TOKENS, grid=GRID)


# ---------------------------------------------------------------------------- transport explorer


def transport_case():
    regions = torch.eye(3, 4)  # three orthogonal region tokens
    words = torch.stack([torch.ones(4), regions[2], regions[0], regions[1], regions[0], torch.ones(4)])
    word_mask = torch.tensor([False, True, True, True, True, False])  # no mass on [CLS] and [SEP]
    tokens = ["[CLS]", "circle", "red", "square", "blue", "[SEP]"]
    boxes = [[1, 1, 9, 9], [11, 11, 19, 19], [21, 5, 29, 13]]
    return words, regions, tokens, boxes, word_mask


def test_transport_explorer_follows_the_chosen_word(pictures):
    words, regions, tokens, boxes, word_mask = transport_case()
    view = transport_explorer(words, regions, tokens, pictures[0], boxes, word_mask=word_mask,
                              region_labels=["red square", "blue circle", "green circle"])
    first = view.readout.value
    assert "<b>circle</b> carries 1/4" in first and first.index("green circle: 1.000") < first.index("red square")
    frame = view.figure.axes[1].patches[-1]  # the red frame around the chosen row
    assert frame.get_y() == pytest.approx(-0.5)
    assert transport_explorer(words, regions, tokens, pictures[0], boxes, word_mask=word_mask,
                              word="square").controls["word"].value == 3
    view.controls["word"].value = 3  # "square" -> region 1
    assert "<b>square</b>" in view.readout.value and "blue circle: 1.000" in view.readout.value
    assert view.figure.axes[1].patches[-1].get_y() == pytest.approx(1.5)
    widths = [p.get_linewidth() for p in view.figure.axes[0].patches]
    assert int(np.argmax(widths)) == 1
    assert [label for label, _ in view.controls["word"].options] == ["1: circle", "2: red", "3: square", "4: blue"]


def test_transport_explorer_names_bad_arguments(pictures):
    words, regions, tokens, boxes, word_mask = transport_case()
    with pytest.raises(ValueError, match="boxes"):
        transport_explorer(words, regions, tokens, pictures[0], boxes[:2])
    with pytest.raises(ValueError, match="regions"):
        transport_explorer(words, regions[:, :3], tokens, pictures[0], boxes)
    with pytest.raises(ValueError, match="tokens"):
        transport_explorer(words, regions, tokens[:3], pictures[0], boxes)
    with pytest.raises(ValueError, match="word_mask"):
        transport_explorer(words, regions, tokens, pictures[0], boxes, word_mask=torch.zeros(6, dtype=torch.bool))
    with pytest.raises(ValueError, match="image"):
        transport_explorer(words, regions, tokens, pictures[0] * 255, boxes)
    with pytest.raises(ValueError, match="word"):  # [CLS] carries no mass
        transport_explorer(words, regions, tokens, pictures[0], boxes, word_mask=word_mask, word="[CLS]")


# ---------------------------------------------------------------------------- retrieval playground


@pytest.fixture(scope="module")
def clip(tokenizer):
    torch.manual_seed(0)
    return CLIP(CLIPConfig.from_preset("cpu-tiny", vocab_size=len(tokenizer), vision_layers=1, text_layers=1)).eval()


def test_retrieval_playground_both_directions(world, tokenizer, clip, pictures):
    captions = [s.description for s in world.scenes(range(8), "val")]
    playground = retrieval_playground(clip, tokenizer, pictures, captions, k=len(pictures))
    to_images, to_captions = playground.children
    first = to_images.readout.value
    assert f"top {len(pictures)} images" in first and len(to_images.figure.axes) == len(pictures)
    # every image is shown, so the query's own image is there, marked (an untrained model ranks at random)
    assert any("✓" in ax.get_title() for ax in to_images.figure.axes)  # images whose caption is the query
    to_images.controls["caption"].value = "a small blue square"
    assert to_images.readout.value != first and "a small blue square" in to_images.readout.value
    to_images.controls["caption"].value = "a purple circle zz"
    assert "Unknown word(s): 'purple', 'zz'" in to_images.readout.value and not to_images.figure.axes
    to_images.controls["caption"].value = "   "
    assert "empty" in to_images.readout.value
    to_images.controls["caption"].value = " and ".join(["a red circle"] * 12)
    assert "the model reads at most 32" in to_images.readout.value
    before = to_captions.readout.value
    to_captions.controls["image"].value = 5
    assert to_captions.readout.value != before and "image 5" in to_captions.readout.value
    assert "✓ " + captions[5] in to_captions.readout.value or captions[5] not in to_captions.readout.value


def test_retrieval_playground_names_bad_arguments(world, tokenizer, clip, pictures):
    captions = [s.description for s in world.scenes(range(8), "val")]
    with pytest.raises(ValueError, match="images"):
        retrieval_playground(clip, tokenizer, pictures[:, :, :16, :16], captions)
    with pytest.raises(ValueError, match="captions"):
        retrieval_playground(clip, tokenizer, pictures, [])
    with pytest.raises(ValueError, match="k"):
        retrieval_playground(clip, tokenizer, pictures, captions, k=9)
    with pytest.raises(ValueError, match="pictures"):
        retrieval_playground(clip, tokenizer, pictures, captions, pictures=pictures * 2 - 1)
    with pytest.raises(ValueError, match="model"):
        retrieval_playground(nn.Linear(2, 2), tokenizer, pictures, captions)


# ---------------------------------------------------------------------------- masked-word playground


class TinyMLM(nn.Module):
    """Patches + caption -> single-stream fusion -> MLM head, randomly initialised: ``(B, L, V)`` logits."""

    def __init__(self, vocab_size: int, dim: int = 16):
        super().__init__()
        self.text = TextEmbeddings(vocab_size, dim, max_positions=32)
        self.patches = PatchEmbedding(32, 8, dim)
        self.fusion = build_fusion("single_stream", dim=dim, num_heads=2, num_layers=1, text_positions=False)
        self.head = MLMHead(dim, vocab_size, tie_to=self.text.word_embeddings)

    def predict(self, image, input_ids, attention_mask):
        """One image ``(3, 32, 32)`` for every caption of the batch ``(B, L)``."""
        patches = self.patches(image[None]).expand(len(input_ids), -1, -1)
        return self.head(self.fusion(self.text(input_ids), attention_mask, patches, None).text)


def test_masked_word_playground_follows_word_and_other_image(world, tokenizer, pictures):
    torch.manual_seed(0)
    model = TinyMLM(len(tokenizer)).eval()
    caption = world.scene(0, "val").description
    shape = caption.split()[3]  # "a small cyan triangle and ...": the first object's shape
    view = masked_word_playground(model.predict, tokenizer, caption, pictures, word=shape, top_k=4)
    assert f"(hidden: <b>{shape}</b>)" in view.readout.value
    first, own_bars, other_bars = view.readout.value, bars(view, 1, True), bars(view, 3, True)
    assert "[MASK]" in first and "given its own image (0)" in first and "given the other image (1)" in first
    assert len(own_bars) == 4
    view.controls["other"].value = 6
    assert "given the other image (6)" in view.readout.value
    assert bars(view, 1, True) == own_bars and bars(view, 3, True) != other_bars  # only the other image's change
    positions = [value for _, value in view.controls["word"].options]
    view.controls["word"].value = positions[-1]
    hidden = tokenizer.convert_ids_to_tokens(tokenizer(caption)["input_ids"])[positions[-1]]
    assert f"(hidden: <b>{hidden}</b>)" in view.readout.value and bars(view, 1, True) != own_bars


def test_masked_word_playground_names_bad_arguments(world, tokenizer, pictures):
    model = TinyMLM(len(tokenizer)).eval()
    caption = world.scene(0, "val").description
    with pytest.raises(ValueError, match="caption"):
        masked_word_playground(model.predict, tokenizer, "a purple zz", pictures)
    with pytest.raises(ValueError, match="predict"):
        masked_word_playground(lambda image, ids, mask: ids.float(), tokenizer, caption, pictures)
    with pytest.raises(ValueError, match="other"):
        masked_word_playground(model.predict, tokenizer, caption, pictures, other=8)
    with pytest.raises(ValueError, match="pictures"):
        masked_word_playground(model.predict, tokenizer, caption, list(range(8)), pictures=pictures[:7])
    with pytest.raises(ValueError, match="top_k"):
        masked_word_playground(model.predict, tokenizer, caption, pictures, top_k=0)
    with pytest.raises(ValueError, match="word"):
        masked_word_playground(model.predict, tokenizer, caption, pictures, word="purple")
