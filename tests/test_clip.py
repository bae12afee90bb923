"""CLIP: the symmetric loss over the similarity matrix, the clamp of the learnable temperature, the
towers being the fusion block, parity with transformers' CLIPModel both ways (load and export through
save_pretrained), the zero-shot / probe / binding helpers, bad input, exact resume of the pretraining
command, gpu-base parameters and FLOPs, and the studies benchmark at a small size."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from course_lib.data import ShapeWorld, WorldConfig
from course_lib.data.shapeworld import SceneObject
from course_lib.evaluate.zero_shot import (TEMPLATES, attribute_swap, binding_accuracy, description_retrieval, fill,
                                           linear_probe, zero_shot_accuracy, zero_shot_weights)
from course_lib.features.text import SEP_ID
from course_lib.fusion.two_tower import TwoTowerFusion
from course_lib.models.clip import CLIP, CLIPConfig, clip_optimizer, fit, from_transformers, to_transformers
from course_lib.models.registry import build_model
from course_lib.objectives.itc import contrastive_loss
from pretrain_helpers import killed_and_resumed

TOL = dict(rtol=1e-4, atol=1e-5)  # float32, different kernels (HF eager attention vs ours fused)


def tiny(**overrides) -> CLIP:
    torch.manual_seed(0)
    config = dict(vocab_size=40, image_size=16, patch_size=4, vision_width=48, vision_layers=2, vision_heads=3,
                  text_width=32, text_layers=2, text_heads=4, context_length=12, embed_dim=16)
    return CLIP(CLIPConfig(**{**config, **overrides}))


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial weights everywhere (the init leaves LayerNorms at 1/0 and the class token tiny)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "logit_scale" not in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g) + (1.0 if name.endswith("norm.weight") else 0.0))
    return model


def batch(n: int = 3, length: int = 9, image_size: int = 16) -> dict:
    g = torch.Generator().manual_seed(2)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, 5:] = 0  # a padded caption
    ids = torch.randint(5, 40, (n, length), generator=g) * mask
    ids[:, 0] = 2
    ids[torch.arange(n), mask.sum(1) - 1] = SEP_ID  # [CLS] ... [SEP] [PAD]...
    return {"images": torch.rand(n, 3, image_size, image_size, generator=g), "input_ids": ids, "attention_mask": mask}


# ----------------------------------------------------------------------------- the model


def test_loss_is_the_symmetric_cross_entropy_over_the_similarity_matrix():
    model, b = randomize(tiny()).eval(), batch(4)
    out = model(b)
    img, txt = model.encode_image(b["images"]), model.encode_text(b["input_ids"], b["attention_mask"])
    logits = math.exp(math.log(1 / 0.07)) * img @ txt.T  # (B, B), the matching pairs on the diagonal
    labels = torch.arange(4)
    by_hand = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(out["loss"], by_hand, **TOL)
    torch.testing.assert_close(out["loss"], contrastive_loss(img, txt, model.itc.logit_scale.exp()), **TOL)
    assert out["temperature"].item() == pytest.approx(0.07)


def test_towers_are_the_two_tower_fusion_block():
    model, b = randomize(tiny()).eval(), batch()
    assert type(model.towers) is TwoTowerFusion and model.towers.image_dim == 48
    with torch.no_grad():
        out = model.towers(model.text_embed(b["input_ids"]), b["attention_mask"], model.image_embed(b["images"]), None)
    torch.testing.assert_close(F.normalize(out.pooled[0], dim=-1), model.encode_text(b["input_ids"], b["attention_mask"]))
    torch.testing.assert_close(F.normalize(out.pooled[1], dim=-1), model.encode_image(b["images"]))
    # the padding after [SEP] changes nothing: the text tower is causal and pools at the last real token
    padded = {k: F.pad(b[k], (0, 2)) for k in ("input_ids", "attention_mask")}
    torch.testing.assert_close(model.encode_text(**padded), model.encode_text(b["input_ids"], b["attention_mask"]))


def test_clamp_keeps_the_scale_at_100_and_its_absence_lets_it_run():
    for clamp in (True, False):
        model = tiny(clamp_logit_scale=clamp)
        with torch.no_grad():
            model.itc.logit_scale.fill_(math.log(500.0))
        model.train()(batch())
        expected = 100.0 if clamp else 500.0
        assert model.itc.logit_scale.exp().item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="max_logit_scale"):
        CLIPConfig(max_logit_scale=10.0)  # below the initial 1 / 0.07


def test_optimizer_gives_the_logit_scale_its_own_lr_and_no_decay():
    model = tiny()
    groups = clip_optimizer(model, lr=1e-3, weight_decay=0.2, logit_scale_lr=0.5).param_groups
    scale_group = [g for g in groups if any(p is model.itc.logit_scale for p in g["params"])]
    assert len(scale_group) == 1 and scale_group[0]["lr"] == 0.5 and scale_group[0]["weight_decay"] == 0.0
    assert len(scale_group[0]["params"]) == 1
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert all(p.dim() >= 2 for p in groups[0]["params"]) and groups[0]["weight_decay"] == 0.2


def test_fit_learns_and_clamps_after_each_step():
    model, b = tiny(), batch(6)
    records = fit(model, lambda step: b, steps=20, lr=3e-3)
    assert records[-1]["loss"] < 0.7 * records[0]["loss"]  # one batch, being memorised
    for clamp in (True, False):
        model = tiny(clamp_logit_scale=clamp)
        with torch.no_grad():
            model.itc.logit_scale.fill_(math.log(500.0))  # as if a hot learning rate had pushed it there
        scale = fit(model, lambda step: b, steps=1, lr=1e-3, logit_scale_lr=0.01)[-1]["scale"]
        # clamped to 100 (then one Adam step of ~1% down: the loss is lower at a softer scale), or left at ~500
        assert (98 < scale <= 100) if clamp else (490 < scale < 510)
    with pytest.raises(ValueError, match="batches"):
        fit(model, [b], steps=1, lr=1e-3)


# ----------------------------------------------------------------------------- transformers parity


def hf_clip():
    from transformers import CLIPConfig as HFConfig, CLIPModel

    text = dict(vocab_size=40, hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=12, hidden_act="gelu", pad_token_id=0, bos_token_id=2, eos_token_id=SEP_ID)
    vision = dict(hidden_size=48, intermediate_size=192, num_hidden_layers=2, num_attention_heads=3, image_size=16,
                  patch_size=4, hidden_act="gelu")
    torch.manual_seed(3)
    return randomize(CLIPModel(HFConfig(text_config=text, vision_config=vision, projection_dim=16))).eval()


def test_loaded_from_hf_clip_model_gives_its_embeddings_and_logits():
    hf, b = hf_clip(), batch()
    ours = from_transformers(hf)
    with torch.no_grad():
        expected = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["images"])
        img, txt = ours.encode_image(b["images"]), ours.encode_text(b["input_ids"], b["attention_mask"])
    torch.testing.assert_close(img, expected.image_embeds, **TOL)
    torch.testing.assert_close(txt, expected.text_embeds, **TOL)
    torch.testing.assert_close(ours.itc.logit_scale.exp() * img @ txt.T, expected.logits_per_image, **TOL)


def test_trained_model_exports_to_clip_model_through_save_pretrained(tmp_path):
    from transformers import CLIPModel

    model, b = tiny(), batch()
    fit(model, lambda step: b, steps=3, lr=1e-3)  # trained, not just initialised
    to_transformers(model).save_pretrained(tmp_path / "clip")
    loaded = CLIPModel.from_pretrained(tmp_path / "clip").eval()
    with torch.no_grad():
        out = loaded(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["images"])
        torch.testing.assert_close(out.image_embeds, model.encode_image(b["images"]), **TOL)
        torch.testing.assert_close(out.text_embeds, model.encode_text(b["input_ids"], b["attention_mask"]), **TOL)
    assert loaded.logit_scale.item() == pytest.approx(model.itc.logit_scale.item())
    back = from_transformers(loaded)
    torch.testing.assert_close(back.state_dict(), model.eval().state_dict(), rtol=0, atol=0)


def test_interop_rejects_what_has_no_equivalent():
    with pytest.raises(ValueError, match="vision='cnn'"):
        to_transformers(tiny(vision="cnn"))
    with pytest.raises(ValueError, match="course CLIP"):
        to_transformers(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="CLIPModel"):
        from_transformers(tiny())
    hf = hf_clip()
    hf.config.text_config.eos_token_id = 2
    with pytest.raises(ValueError, match="eos_token_id"):
        from_transformers(hf)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_names_the_argument():
    model, b = tiny(), batch()
    with pytest.raises(ValueError, match="images"):
        model({**b, "images": b["images"][:, :, :8]})
    empty = b["attention_mask"].clone()
    empty[1] = 0
    with pytest.raises(ValueError, match="attention_mask row 1 has no real token"):
        model({**b, "attention_mask": empty})
    with pytest.raises(ValueError, match="context length is 12"):
        model.encode_text(torch.ones(2, 13, dtype=torch.long), torch.ones(2, 13))
    with pytest.raises(ValueError, match="input_ids must hold integer"):
        model.encode_text(torch.ones(2, 5), torch.ones(2, 5))
    with pytest.raises(ValueError, match="attention_mask"):
        model.encode_text(torch.ones(2, 5, dtype=torch.long), torch.ones(2, 4))
    with pytest.raises(ValueError, match="batch must be a dict with images"):
        model({"images": b["images"]})
    with pytest.raises(ValueError, match="text_layers must be a positive int"):
        CLIPConfig(text_layers=0)
    with pytest.raises(ValueError, match="vision"):
        CLIPConfig(vision="resnet")
    with pytest.raises(ValueError, match="image_dim=48 must be a multiple of image_heads=5"):
        TwoTowerFusion(dim=32, num_heads=4, image_dim=48, image_heads=5)


# ----------------------------------------------------------------------------- zero-shot helpers


class Oracle(torch.nn.Module):
    """Image k (all pixels = k) embeds as one-hot k; a text as one-hot of its index in ``texts``."""

    def __init__(self, tokenizer, texts):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.codes = {tuple(tokenizer(t)["input_ids"]): k for k, t in enumerate(texts)}

    def encode_image(self, images):
        return F.one_hot(images[:, 0, 0, 0].long(), len(self.codes)).float()

    def encode_text(self, input_ids, attention_mask):
        keys = [self.codes[tuple(row[m.bool()].tolist())] for row, m in zip(input_ids, attention_mask)]
        return F.one_hot(torch.tensor(keys), len(self.codes)).float()


def test_prompt_ensemble_is_the_normalised_mean_of_normalised_prompts():
    tokenizer = _tokenizer()
    model = tiny(context_length=32, vocab_size=len(tokenizer))
    weights = zero_shot_weights(model, tokenizer, [("red", "circle"), ("blue", "square")], TEMPLATES["sizes (2)"])
    from course_lib.evaluate.zero_shot import embed_texts

    one = embed_texts(model, tokenizer, ["a large red circle", "a small red circle"])
    torch.testing.assert_close(weights[0], F.normalize(one.mean(0), dim=0))
    assert fill("a {color} {shape}", "orange", "circle") == "an orange circle"
    assert zero_shot_accuracy(torch.eye(2), torch.eye(2), torch.tensor([0, 0])) == 0.5
    with pytest.raises(ValueError, match="template"):
        fill("a {colour} thing", "red", "circle")
    with pytest.raises(ValueError, match="templates"):
        zero_shot_weights(model, tokenizer, [("red", "circle")], "a {color} {shape}")


def test_linear_probe_separates_separable_classes():
    g = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(3, 5, generator=g)
    y = torch.arange(60) % 3
    x = centres[y] + 0.3 * torch.randn(60, 5, generator=g)
    logits = linear_probe(x[:45], y[:45], x[45:], 3)
    assert logits.shape == (15, 3) and (logits.argmax(1) == y[45:]).all()
    with pytest.raises(ValueError, match="train_y"):
        linear_probe(x, y + 5, x, 3)


def test_attribute_swap_exchanges_two_objects_colours():
    world = ShapeWorld(WorldConfig(held_out=(("red", "circle"),)))
    scene = world.scene(0, "val")
    a = SceneObject("square", "blue", "small", (0.1, 0.1, 0.3, 0.3), 0)
    b = SceneObject("triangle", "green", "large", (0.5, 0.5, 0.9, 0.9), 0)
    c = SceneObject("triangle", "red", "large", (0.5, 0.1, 0.9, 0.4), 0)
    make = lambda objects: type(scene)(scene.config, "val", 0, tuple(objects))  # noqa: E731
    assert attribute_swap(make([a, b])) == "a small green square and a large blue triangle"
    assert attribute_swap(make([b, c])) is None  # same shape: a swap names the same objects
    circle = SceneObject("circle", "blue", "small", (0.1, 0.1, 0.3, 0.3), 0)
    assert attribute_swap(make([circle, c])) is None  # would name the held-out red circle


def test_binding_and_retrieval_helpers_score_an_oracle():
    tokenizer = _tokenizer()
    texts = ["a red circle and a blue square", "a blue circle and a red square"]
    model = Oracle(tokenizer, texts)
    images = torch.tensor([0.0, 1.0, 1.0]).view(3, 1, 1, 1).expand(3, 3, 2, 2)  # images 1 and 2 show text 1
    true = [texts[0], texts[1], texts[1]]
    assert binding_accuracy(model, tokenizer, images, true, [texts[1], texts[0], texts[0]]) == 1.0
    assert binding_accuracy(model, tokenizer, images, true, true) == 0.0  # a tie is no preference
    recall, chance = description_retrieval(model, tokenizer, images, true, ks=(1,))
    assert recall["t2i_R@1"] == 1.0 and chance["t2i_R@1"] == pytest.approx((1 / 3 + 2 / 3 + 2 / 3) / 3)
    with pytest.raises(ValueError, match="same non-zero length"):
        binding_accuracy(model, tokenizer, images, true, true[:2])


_TOKENIZER = {}


def _tokenizer():
    if "t" not in _TOKENIZER:
        from course_lib.data.datasets import build_tokenizer

        _TOKENIZER["t"] = build_tokenizer(ShapeWorld(WorldConfig()), vocab_size=40, num_scenes=200)
    return _TOKENIZER["t"]


# ----------------------------------------------------------------------------- at scale


def test_pretrain_command_resumes_clip_exactly(tmp_path):
    straight, resumed = killed_and_resumed("clip", tmp_path, "--preset=cpu-tiny", "--model.vision_layers=1",
                                           "--model.text_layers=1")
    assert resumed.history.losses == straight.history.losses
    assert "temperature" in straight.history.records[-1]


def test_gpu_base_reports_parameters_and_flops():
    from course_lib.flops import count_forward_flops

    with torch.device("meta"):
        model = build_model("clip", "gpu-base")
        images, tokens = torch.zeros(1, 3, 224, 224), torch.zeros(1, 77, dtype=torch.long)
    c = model.config
    assert (c.vision_width, c.text_width, c.embed_dim) == (768, 512, 512) and model.towers.image_dim == 768
    assert 120e6 < sum(p.numel() for p in model.parameters()) < 130e6  # ViT-B/16 + the 12-layer text tower (124M)
    vision = count_forward_flops(model.visual, images)
    text = count_forward_flops(model.text, (tokens, torch.ones_like(tokens)))
    assert 34e9 < vision < 36e9 and 5.5e9 < text < 6.5e9  # open_clip's profile of ViT-B/16: 35.1 + 6.0


def test_studies_benchmark_runs_at_a_small_size(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "clip_studies.py"
    spec = importlib.util.spec_from_file_location("clip_studies", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        results = bench.main(["--small", "--seeds=1", f"--out={tmp_path / 'clip.json'}"])
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((tmp_path / "clip.json").read_text())
    assert saved["rows"] == results["rows"]
    assert [r["study"] for r in saved["rows"]] == ["batch", "batch", "clamp", "clamp"]
    main = next(r for r in saved["rows"] if r["templates"])
    assert {f"zero-shot val [{name}]" for name in TEMPLATES} <= set(main["scores"])
    assert all(0 <= x <= 1 for k, v in main["scores"].items() if k != "final loss" for x in v)
    assert saved["chance"]["binding"] == 0.5 and len(saved["rows"][-1]["scale_curves"]) == 1
