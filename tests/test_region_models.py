"""The single-stream region systems (VisualBERT, B2T2, Unicoder-VL, VL-BERT): losses, parity with
transformers' VisualBERT (weights copied both ways), their defining details and bad input."""

from __future__ import annotations

import pytest
import torch

from course_lib.data import ShapeWorld, WorldConfig
from course_lib.data.datasets import build_tokenizer
from course_lib.data.regions import ShapeWorldRegions, blank_boxes, shape_word_spans, whole_image_features
from course_lib.models.registry import build_model
from pretrain_helpers import assert_flops_near_6nt, gpu_region_batch, killed_and_resumed

SYSTEMS = ("visualbert", "b2t2", "unicoder_vl", "vl_bert")
EXPECTED = {"visualbert": {"mlm", "itm"}, "b2t2": {"mlm", "itm"}, "unicoder_vl": {"mlm", "itm", "mrc"},
            "vl_bert": {"mlm", "mrc"}}


@pytest.fixture(scope="module")
def source():
    world = ShapeWorld(WorldConfig(min_objects=2, max_objects=3))
    tokenizer = build_tokenizer(world, vocab_size=128, num_scenes=200)
    return ShapeWorldRegions(world, tokenizer, context_length=32)


@pytest.fixture(scope="module")
def batch(source):
    return source(list(range(8)))


def tiny(name, **overrides):
    torch.manual_seed(0)
    return build_model(name, "cpu-tiny", vocab_size=128, **overrides)


@pytest.mark.parametrize("name", SYSTEMS)
def test_forward_gives_each_objective_and_trains(name, batch):
    model = tiny(name)
    out = model(batch)
    assert set(out) == {"loss"} | EXPECTED[name]
    assert all(torch.isfinite(v) for v in out.values())
    total = sum(v for k, v in out.items() if k != "loss")  # the default weights are all 1
    torch.testing.assert_close(out["loss"], total)
    out["loss"].backward()
    assert model.word_embeddings.weight.grad is not None
    assert model.match_scores(batch).shape == (8,)


def test_objective_weights_are_switches(batch):
    assert set(tiny("vl_bert", itm_weight=1.0)(batch)) == {"loss", "mlm", "mrc", "itm"}
    assert set(tiny("visualbert", itm_weight=0.0)(batch)) == {"loss", "mlm"}
    with pytest.raises(ValueError, match="nothing would be learned"):
        tiny("visualbert", itm_weight=0.0, mlm_weight=0.0)
    with pytest.raises(ValueError, match="unknown option 'fusion'"):
        tiny("visualbert", fusion="late")


def test_gpu_base_builds():
    model = build_model("visualbert", "gpu-base")
    assert model.config.dim == 768 and model.config.region_feat_dim == 2048
    assert 100e6 < sum(p.numel() for p in model.parameters()) < 130e6  # BERT-base + a visual projection


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("change, message", [
    (lambda b: b.pop("region_feats"), "missing"),
    (lambda b: b.update(region_feats=b["region_feats"][..., :10]), "region_feats"),
    (lambda b: b.update(region_mask=torch.zeros_like(b["region_mask"])), "has no region"),
    (lambda b: b.update(input_ids=torch.cat([torch.tensor([[2, 3] + [0] * 30]), b["input_ids"][1:]]),
                        attention_mask=torch.cat([torch.tensor([[1, 1] + [0] * 30]), b["attention_mask"][1:]])),
     "caption 0 of input_ids is empty"),
    (lambda b: b.update(region_boxes=b["region_boxes"] * 3), "normalised"),
    (lambda b: b.update(region_feats=b["region_feats"] * float("nan")), "NaN"),
    (lambda b: b.update(region_labels=b["region_labels"] + 100), "num_region_classes"),
])
def test_bad_batches_name_the_key(batch, change, message):
    bad = dict(batch)
    change(bad)
    with pytest.raises(ValueError, match=message):
        tiny("unicoder_vl")(bad)


# ----------------------------------------------------------------------------- VisualBERT <-> transformers


def hf_visual_bert():
    from transformers import VisualBertConfig, VisualBertForPreTraining

    torch.manual_seed(1)
    config = VisualBertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, visual_embedding_dim=108, max_position_embeddings=32,
                              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = VisualBertForPreTraining(config).eval()
    with torch.no_grad():  # random, non-trivial values everywhere (biases and LayerNorms included)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def hf_outputs(hf, batch):
    with torch.no_grad():
        out = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 visual_embeds=batch["region_feats"], visual_attention_mask=batch["region_mask"].long())
    return out.prediction_logits[:, : batch["input_ids"].shape[1]], out.seq_relationship_logits


def course_outputs(model, batch):
    model.eval()
    with torch.no_grad():
        out = model.encode(batch)
        return model.mlm_head(out.text), model.itm_head(out.pooled)


def test_visualbert_matches_transformers_with_copied_weights(batch):
    """Tolerance 1e-5 (float32): the same operations in another order."""
    from course_lib.models.visualbert import from_transformers

    hf = hf_visual_bert()
    ours = from_transformers(hf)
    for theirs, mine in zip(hf_outputs(hf, batch), course_outputs(ours, batch)):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


def test_trained_visualbert_exports_to_transformers(batch, tmp_path):
    from transformers import VisualBertForPreTraining

    from course_lib.models.visualbert import to_transformers

    model = tiny("visualbert")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):  # trained weights, not the initial ones
        optimizer.zero_grad()
        model(batch)["loss"].backward()
        optimizer.step()
    to_transformers(model).save_pretrained(tmp_path)
    loaded = VisualBertForPreTraining.from_pretrained(tmp_path).eval()
    for theirs, mine in zip(hf_outputs(loaded, batch), course_outputs(model, batch)):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- what makes each one itself


def test_b2t2_sums_each_box_into_the_word_that_names_it(source, batch):
    scene = source.world.scene(0)
    spans = shape_word_spans(scene, scene.description)
    assert [scene.description[s:e] for _, s, e in spans] == [o.shape for o in scene.objects]
    model = tiny("b2t2")
    matrix = model.token_box_matrix(batch)  # (B, L, R)
    refs = batch["token_box"]
    assert matrix.sum(-1).eq((refs >= 0).float()).all()  # one box per referring token, none elsewhere
    b, t = (refs >= 0).nonzero()[0].tolist()
    assert matrix[b, t, refs[b, t]] == 1
    no_refs = {k: v for k, v in batch.items() if k != "token_box"}
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model.encode(batch).pooled, model.encode(no_refs).pooled)
        late = tiny("b2t2", fusion="late").eval()
        assert torch.allclose(late.encode(batch).pooled, late.encode(no_refs).pooled)  # late fusion: text only


def test_vl_bert_blanks_the_masked_roi_in_the_whole_image(batch):
    images = batch["images"].float() / 255
    hidden = torch.zeros_like(batch["region_mask"])
    hidden[0, 0] = True
    blanked = blank_boxes(images, batch["region_boxes"], hidden)
    x1, y1, x2, y2 = (batch["region_boxes"][0, 0] * 32).tolist()
    inside = blanked[0, :, int(y1) + 1:int(y2) - 1, int(x1) + 1:int(x2) - 1]
    assert inside.abs().max() == 0 and torch.equal(blanked[1:], images[1:])
    fixed, leaky = tiny("vl_bert"), tiny("vl_bert", blank_masked=False)
    whole = whole_image_features(images)
    assert torch.allclose(leaky.whole_image(batch, hidden), whole, atol=1e-6)
    assert not torch.allclose(fixed.whole_image(batch, hidden)[0], whole[0])
    assert torch.allclose(fixed.whole_image(batch, hidden)[1:], whole[1:], atol=1e-6)
    mean_mode = tiny("vl_bert", whole_image="mean")
    kept = batch["region_feats"][0][batch["region_mask"][0] & ~hidden[0]].mean(0)
    torch.testing.assert_close(mean_mode.whole_image(batch, hidden)[0], kept)
    no_pixels = {k: v for k, v in batch.items() if k != "images"}
    with pytest.raises(ValueError, match="whole_image='mean'"):
        tiny("vl_bert", whole_image="pixels").whole_image(no_pixels, hidden)


def test_vl_bert_gives_every_roi_one_position_and_starts_blind(batch):
    model = tiny("vl_bert").eval()
    text, image, _ = model.embed(batch, batch["input_ids"], None)
    assert model.visual_ln_text.weight.abs().max() == 0  # the visual signal is learned in from 0
    moved = dict(batch, region_boxes=batch["region_boxes"].flip(1), region_feats=batch["region_feats"].flip(1))
    _, image_flipped, _ = model.embed(moved, batch["input_ids"], None)
    torch.testing.assert_close(image_flipped, image.flip(1))  # no order among the RoIs: same position


def test_unicoder_vl_zeroes_masked_region_features(batch):
    model = tiny("unicoder_vl")
    hidden = torch.zeros_like(batch["region_mask"])
    hidden[:, 0] = True
    _, image, _ = model.embed(batch, batch["input_ids"], hidden)
    zeroed = dict(batch, region_feats=batch["region_feats"].masked_fill(hidden[..., None], 0.0))
    _, expected, _ = model.embed(zeroed, batch["input_ids"], None)
    torch.testing.assert_close(image, expected)


# ----------------------------------------------------------------------------- at scale


@pytest.mark.parametrize("name", SYSTEMS)
def test_pretrain_command_resumes_region_models_exactly(name, tmp_path):
    straight, resumed = killed_and_resumed(name, tmp_path)
    assert resumed.history.losses == straight.history.losses  # masking and ITM draws resume too


@pytest.mark.parametrize("name", SYSTEMS)
def test_gpu_base_reports_parameters_and_flops(name):
    model = build_model(name, "gpu-base")
    c = model.config
    assert_flops_near_6nt(model, gpu_region_batch(c), c.context_length + (0 if name == "b2t2" else 36))
