"""ViLBERT and 12-in-1: the dual-stream widths, 5-d geometry and global token, the masking (90% zeroed,
the IoU > 0.4 overlap rule, no masked modelling on negatives), MRC-kl, every objective a switch, the
shared evaluation, the multi-task heads and stop-and-go, the data helpers, bad input, the pretraining
command's exact resume, gpu-base parameters and FLOPs, the exercise checks, and the claim benchmark."""

from __future__ import annotations

import pytest
import torch

from course_lib.data import ShapeWorld, WorldConfig
from course_lib.data.datasets import build_tokenizer
from course_lib.data.multitask import (CachedRegions, clean_train_sets, duplicate_detections, multitask_splits,
                                       nlvr_pairs, right_image)
from course_lib.data.regions import ShapeWorldRegions
from course_lib.evaluate.boxes import box_iou
from course_lib.fusion.dual_stream import DualStreamFusion
from course_lib.evaluate.multitask import TASKS, MultiTaskModel, StopAndGo
from course_lib.models.registry import build_model
from course_lib.models.vilbert import ViLBERTConfig, overlapping_regions
from course_lib.objectives.mlm import IGNORE_INDEX
from pretrain_helpers import gpu_region_batch, killed_and_resumed


@pytest.fixture(scope="module")
def source():
    world = ShapeWorld(WorldConfig(min_objects=1, max_objects=3))
    tokenizer = build_tokenizer(world, vocab_size=128, num_scenes=200)
    return CachedRegions(world, tokenizer, context_length=24, max_regions=4)


@pytest.fixture(scope="module")
def batch(source):
    return source(list(range(12)))


def tiny(**overrides):
    torch.manual_seed(0)
    return build_model("vilbert", "cpu-tiny", vocab_size=128, **overrides)


# ----------------------------------------------------------------------------- architecture


def test_streams_have_their_own_widths_and_the_paper_s_depths(batch):
    model = tiny().eval()
    c = model.config
    assert (c.dim, c.image_dim, c.bi_dim, c.text_only_layers, c.layers) == (64, 96, 96, 1, 2)
    out = model.encode(batch, return_attention=True)
    B, L = batch["input_ids"].shape
    R = batch["region_feats"].shape[1]
    assert out.text.shape == (B, L, 64) and out.image.shape == (B, R, 96) and out.pooled.shape == (B, 96)
    assert out.extras["image_global"].shape == (B, 96)
    assert [set(m) for m in out.attentions] == [{"text_self"}] + [{"text_to_image", "image_to_text", "text_self",
                                                                   "image_self"}] * 2
    assert out.attentions[1]["text_to_image"].shape == (B, c.bi_heads, L, R + 1)  # the global token first
    assert out.attentions[1]["image_to_text"].shape == (B, c.bi_heads, R + 1, L)
    block = model.fusion.co_attention[0]
    assert block.text_to_image.attn.query.weight.shape == (96, 64)  # text queries into the co-attention width
    assert block.text_to_image.attn.key.weight.shape == (96, 96) and block.text_to_image.attn.out.weight.shape == (64, 96)
    assert model.fusion.image_layers[0].mlp.fc1.weight.shape == (96, 96)  # image_mlp_ratio 1.0 (v_intermediate 1024)


def test_dual_stream_fusion_keeps_one_width_by_default():
    fusion = DualStreamFusion(dim=32, num_heads=4, num_layers=1)
    text, tm, image, im = fusion.example_inputs(2, 5, 7)
    out = fusion(text, tm, image, im)
    assert out.image.shape == (2, 7, 32) and out.pooled.shape == (2, 32)
    wide = DualStreamFusion(dim=32, num_heads=4, num_layers=1, image_dim=48, image_heads=6, bi_dim=40, bi_heads=5)
    text, tm, image, im = wide.example_inputs(2, 5, 7)
    assert image.shape == (2, 7, 48) and wide(text, tm, image, im).pooled.shape == (2, 40)
    assert wide.flops(1, 5, 7) > 0
    with pytest.raises(ValueError, match="image_dim=48 must be a multiple of image_heads=5"):
        DualStreamFusion(dim=32, num_heads=4, image_dim=48, image_heads=5)


def test_image_input_is_5d_geometry_and_the_global_token(batch):
    model = tiny()
    zeroed = torch.zeros_like(batch["region_mask"])
    zeroed[:, 0] = True
    _, image, mask = model.embed(batch, batch["input_ids"], zeroed)
    feats = batch["region_feats"].masked_fill(zeroed[..., None], 0.0)
    visible = batch["region_mask"] & ~zeroed
    mean = (feats * visible[..., None]).sum(1) / visible.sum(1, keepdim=True).clamp(min=1)
    boxes = torch.cat([torch.tensor([0.0, 0.0, 1.0, 1.0]).expand(len(feats), 1, 4), batch["region_boxes"]], 1)
    x1, y1, x2, y2 = boxes.unbind(-1)
    geometry = torch.stack([x1, y1, x2, y2, (x2 - x1) * (y2 - y1)], -1)
    e = model.region_embedding
    expected = e.norm(e.feature_proj(torch.cat([mean[:, None], feats], 1)) + e.geometry_proj(geometry))
    torch.testing.assert_close(image, expected)
    assert mask[:, 0].all() and torch.equal(mask[:, 1:], batch["region_mask"])
    assert e.geometry_proj.in_features == 5


def test_word_table_is_shared_with_the_mlm_decoder():
    model = tiny()
    assert model.mlm_head.decoder.weight is model.text_embeddings.word_embeddings.weight
    assert model.word_embeddings is model.text_embeddings.word_embeddings


# ----------------------------------------------------------------------------- masking


def test_region_masking_rates_and_the_overlap_rule(source):
    torch.manual_seed(0)
    big = duplicate_detections(source(list(range(60))), prob=0.5, max_regions=6)
    model = tiny(overlap_iou=0.4)
    rows = torch.ones(60, dtype=torch.bool)
    draws = [model.mask_image(big, rows) for _ in range(60)]
    targets = torch.stack([d[0] for d in draws])
    zeroed = torch.stack([d[1] for d in draws])
    real = big["region_mask"].expand_as(targets)
    assert 0.13 < targets[real].float().mean() < 0.17  # ViLBERT's 0.15
    assert 0.85 < zeroed[targets].float().mean() < 0.95  # 90% of the hidden regions zeroed
    extra = zeroed & ~targets
    assert extra.any()
    for k, b in list(zip(*torch.where(extra.any(2))))[:10]:  # an extra zeroed region overlaps a target
        iou = box_iou(big["region_boxes"][b], big["region_boxes"][b])
        assert ((iou > 0.4) & targets[k, b][None, :]).any(1)[extra[k, b]].all()
    off = tiny(overlap_iou=0.0)
    torch.manual_seed(0)
    t, z = off.mask_image(big, rows)
    assert not (z & ~t).any()  # the 2019 recipe zeroes only hidden regions


def test_overlapping_regions_by_hand():
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.45, 0.5], [0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 0.5, 0.5]]])
    mask = torch.tensor([[True, True, True, False]])
    hidden = torch.tensor([[True, False, False, False]])
    assert overlapping_regions(boxes, mask, hidden, 0.4).tolist() == [[True, True, False, False]]  # padding kept out
    assert overlapping_regions(boxes, mask, hidden, 0.95).tolist() == [[True, False, False, False]]


@pytest.mark.parametrize("on_negatives", [False, True])
def test_no_masked_modelling_on_negative_pairs(batch, monkeypatch, on_negatives):
    import course_lib.models.region_bert as region_bert

    seen = {}
    original = region_bert.swap_images

    def recording_swap(b, swapped, generator=None):
        seen["swapped"] = swapped.clone()
        return original(b, swapped, generator)

    monkeypatch.setattr(region_bert, "swap_images", recording_swap)  # what itm_negatives calls
    model = tiny(masked_on_negatives=on_negatives, mask_prob=0.5, region_mask_prob=0.5)
    texts, images = {}, {}
    monkeypatch.setattr(model, "objective_losses", lambda out, b, labels, targets, matched: (
        texts.update(labels=labels), images.update(targets=targets, matched=matched),
        {"itm": out.pooled.sum() * 0})[-1])
    model(batch)
    swapped = seen["swapped"]
    assert torch.equal(images["matched"], ~swapped)
    scored_words = (texts["labels"] != IGNORE_INDEX).any(1)
    scored_regions = images["targets"].any(1)
    if on_negatives:
        assert (scored_words & swapped).any() and (scored_regions & swapped).any()
    else:
        assert not (scored_words & swapped).any() and not (scored_regions & swapped).any()


# ----------------------------------------------------------------------------- objectives


def test_every_objective_is_finite_weighted_and_trains(batch):
    model = tiny(mrc_weight=1.0)
    out = model(batch)
    assert set(out) == {"loss", "mlm", "mrckl", "mrc", "itm"}
    assert all(torch.isfinite(v) for v in out.values())
    c = model.config
    torch.testing.assert_close(out["loss"], sum(getattr(c, f"{k}_weight") * v for k, v in out.items() if k != "loss"))
    out["loss"].backward()
    for name in ("word_embeddings.weight", "region_embedding.geometry_proj.weight",
                 "fusion.co_attention.0.text_to_image.attn.query.weight", "fusion.image_layers.1.mlp.fc1.weight",
                 "mrc_head.decoder.weight", "itm_head.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize("off", ["mlm", "mrckl", "itm"])
def test_each_objective_is_a_switch(batch, off):
    out = tiny(**{f"{off}_weight": 0.0})(batch)
    assert set(out) == {"loss", "mlm", "mrckl", "itm"} - {off}


def test_mrckl_is_the_kl_to_the_detector(batch):
    model = tiny().eval()
    torch.manual_seed(1)
    rows = torch.ones(12, dtype=torch.bool)
    targets, zeroed = model.mask_image(batch, rows)
    out = model.encode(batch, None, zeroed)
    log_q = torch.log_softmax(model.mrc_head(out.image), -1)[targets]
    p = batch["region_probs"][targets]
    expected = (p * (torch.log(p.clamp(min=1e-30)) - log_q)).sum(-1).mean()
    torch.testing.assert_close(model.objective_losses(out, batch, None, targets, rows)["mrckl"], expected)


def test_plugs_into_the_shared_evaluation(source, batch):
    from course_lib.data.language import answer_vocabulary
    from course_lib.evaluate import GroundingFineTuner, VQAFineTuner, fused_retrieval

    model = tiny().eval()
    assert 0.0 <= fused_retrieval(model, {k: v[:5] for k, v in batch.items()}, (1,))["mean_recall"] <= 1.0
    vqa = VQAFineTuner(model, len(answer_vocabulary(source.world.config)))
    vqa(source.questions(range(3)))["loss"].backward()
    grounding = GroundingFineTuner(model)
    assert grounding.head.in_features == model.config.image_dim
    grounding(source.phrases(range(12), min_objects=2))["loss"].backward()


# ----------------------------------------------------------------------------- 12-in-1


def test_multitask_heads_share_one_model(source):
    from course_lib.data.language import answer_vocabulary

    answers = len(answer_vocabulary(source.world.config))
    model = tiny()
    mt = MultiTaskModel(model, answers)
    assert mt.vqa.model is model and mt.grounding.model is model
    pool = list(range(100, 160))
    rows = {"retrieval": source(range(8)), "vqa": source.questions(range(4)),
            "grounding": source.phrases(range(12), min_objects=2), "nlvr": nlvr_pairs(source, range(8), pool)}
    for task in TASKS:
        loss = mt.loss(task, rows[task])
        assert torch.isfinite(loss)
        assert 0.0 <= mt.score(task, rows[task]) <= 1.0
    single = MultiTaskModel(tiny(), answers, ("vqa",))
    with pytest.raises(ValueError, match="no head"):
        single.loss("grounding", rows["grounding"])
    with pytest.raises(ValueError, match="subset"):
        MultiTaskModel(tiny(), answers, ("captioning",))


def test_stop_and_go_follows_12_in_1():
    control = StopAndGo(["a", "b"])
    states = []
    for score in (0.5, 0.6, 0.6, 0.6005, 0.6, 0.59):
        control.update("a", score)
        states.append(control.stopped["a"])
    # improved twice; then 2 evaluations without a 0.1% gain (> patience 1) stop it; a 1.7% drop restarts it
    assert states == [False, False, False, True, True, False]
    control.update("b", 0.4)
    control.update("b", 0.4)
    control.update("b", 0.4)
    assert control.stopped["b"]
    assert [control.active("b", i) for i in range(8)] == [True, False, False, False, True, False, False, False]
    assert control.active("a", 3)


def test_nlvr_pairs_truth_and_balance(source):
    from course_lib.evaluate.caption_truth import caption_is_true

    pairs = nlvr_pairs(source, range(40), range(200, 400), seed=0)
    assert 0.25 < pairs["label"].float().mean() < 0.75
    world = source.world
    for row in range(40):
        text = source.tokenizer.decode(pairs["input_ids"][row], skip_special_tokens=True)
        left, right = world.scene(int(pairs["index"][row])), world.scene(int(pairs["right_index"][row]))
        caption = next(c for c in left.captions if source.tokenizer.decode(
            source.tokenizer(c)["input_ids"], skip_special_tokens=True) == text)
        assert caption_is_true(caption, left)
        assert int(pairs["label"][row]) == caption_is_true(caption, right)
    flipped = right_image(pairs)
    assert torch.equal(flipped["region_feats"], pairs["right_region_feats"])
    assert torch.equal(flipped["input_ids"], pairs["input_ids"])


def test_clean_splits_hold_out_every_task_s_test_images():
    train, val, test, dropped = multitask_splits(range(300), 150, 10, 20, seed=0)
    held = {i for ids in list(test.values()) + list(val.values()) for i in ids}
    assert all(not (set(ids) & held) for ids in train.values())
    assert all(d > 0 for d in dropped.values())  # other tasks' test images were there, and went
    assert clean_train_sets({"a": [1, 2, 3]}, {"b": [2]}) == {"a": [1, 3]}


def test_duplicate_detections_overlap_their_original(source, batch):
    out = duplicate_detections(batch, prob=1.0, max_regions=8, seed=0)
    src = out["region_source"]
    twins = (src >= 0) & (src != torch.arange(8))
    assert twins.any()
    for b, r in twins.nonzero().tolist():
        o = int(src[b, r])
        assert box_iou(out["region_boxes"][b, r][None], out["region_boxes"][b, o][None]) > 0.4
        assert torch.equal(out["region_probs"][b, r], out["region_probs"][b, o])
    n = batch["region_mask"].shape[1]
    torch.testing.assert_close(out["region_feats"][:, :n][batch["region_mask"]],
                               batch["region_feats"][batch["region_mask"]])
    assert torch.equal(CachedRegions(source.world, source.tokenizer, 24, max_regions=4)(range(12))["region_feats"],
                       ShapeWorldRegions(source.world, source.tokenizer, 24, max_regions=4)(range(12))["region_feats"])


# ----------------------------------------------------------------------------- bad input


def test_bad_input_names_the_problem(batch):
    model = tiny()
    with pytest.raises(ValueError, match="region_feats"):
        model({**batch, "region_feats": batch["region_feats"][..., :5]})
    with pytest.raises(ValueError, match="missing"):
        model({k: v for k, v in batch.items() if k != "region_boxes"})
    with pytest.raises(ValueError, match="region_probs"):
        model({k: v for k, v in batch.items() if k != "region_probs"})
    with pytest.raises(ValueError, match="hidden_regions must have the shape"):
        model.encode(batch, hidden_regions=batch["region_mask"][:, :2])
    with pytest.raises(ValueError, match="at least 2"):
        model({k: v[:1] for k, v in batch.items()})
    with pytest.raises(ValueError, match="overlap_iou"):
        tiny(overlap_iou=1.5)
    with pytest.raises(ValueError, match="bi_dim=90 must be a multiple of bi_heads=4"):
        tiny(bi_dim=90)
    with pytest.raises(ValueError, match="region_zero_prob"):
        tiny(region_zero_prob=-0.1)
    with pytest.raises(ValueError, match="unknown option"):
        tiny(image_width=3)
    with pytest.raises(ValueError, match="images"):
        duplicate_detections({k: v for k, v in batch.items() if k != "images"})


# ----------------------------------------------------------------------------- at scale


def test_pretrain_command_resumes_exactly(tmp_path):
    straight, resumed = killed_and_resumed("vilbert", tmp_path)
    assert resumed.history.losses == straight.history.losses
    assert {"mlm", "mrckl", "itm"} <= set(straight.history.records[-1])


def test_gpu_base_is_bert_base_6layer_6conect_and_reports_flops():
    from course_lib.flops import model_flops_per_sample

    c = ViLBERTConfig.from_preset("gpu-base")
    assert (c.dim, c.heads, c.text_only_layers + c.layers, c.image_dim, c.image_heads, c.layers) == (
        768, 12, 12, 1024, 8, 6)
    assert (c.bi_dim, c.bi_heads, c.region_feat_dim, c.num_region_classes, c.vocab_size) == (1024, 8, 2048, 1601, 30522)
    model = build_model("vilbert", "gpu-base")
    params = sum(p.numel() for p in model.parameters())
    assert 220e6 < params < 260e6  # BERT-base + a 6-layer 1024-d image stream + 6 co-attention blocks
    batch = gpu_region_batch(c)
    batch["region_probs"] = torch.softmax(torch.randn(2, 36, c.num_region_classes), -1)
    with torch.no_grad():
        flops = model_flops_per_sample(model, batch)
    stream = sum(p.numel() for n, p in model.named_parameters() if n.startswith("fusion."))
    tokens = c.context_length + 37  # words, and the regions with the global token
    assert 0.5 * 6 * stream * tokens < flops < 3 * 6 * stream * tokens


# ----------------------------------------------------------------------------- exercises and the claim


def test_exercise_checks_pass_the_solutions_and_explain_mistakes():
    from course_lib.checks.verdict import ExerciseError
    from course_lib.checks.vilbert import check_global_image_feature, check_overlap_mask

    check_overlap_mask(lambda boxes, mask, hidden, threshold=0.4: overlapping_regions(boxes, mask, hidden, threshold))

    def no_padding_check(boxes, mask, hidden, threshold=0.4):
        return overlapping_regions(boxes, torch.ones_like(mask), hidden, threshold)

    with pytest.raises(ExerciseError, match="padding"):
        check_overlap_mask(no_padding_check)

    def starter(*args):
        raise NotImplementedError("write it")

    with pytest.raises(ExerciseError):
        check_overlap_mask(starter)

    def right(feats, mask, zeroed):
        visible = (mask & ~zeroed).float()[..., None]
        return (feats * visible).sum(1) / visible.sum(1).clamp(min=1)

    check_global_image_feature(right)
    with pytest.raises(ExerciseError, match="give its feature away"):
        check_global_image_feature(lambda feats, mask, zeroed: right(feats, mask, torch.zeros_like(zeroed)))
    with pytest.raises(ExerciseError, match="NaN"):
        check_global_image_feature(lambda feats, mask, zeroed: (feats * (mask & ~zeroed)[..., None]).sum(1)
                                   / (mask & ~zeroed).sum(1, keepdim=True))
    with pytest.raises(ExerciseError):
        check_global_image_feature(starter)


def test_claim_benchmark_runs_at_a_small_size(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "vilbert_multitask.py"
    spec = importlib.util.spec_from_file_location("vilbert_multitask", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        results = bench.main(["--small", "--seeds=1", f"--out={tmp_path / 'claim.json'}"])
    finally:
        torch.set_num_threads(threads)
    assert set(results["multi"]) == set(TASKS) and len(results["single"]["vqa"]) == 1
    assert json.loads((tmp_path / "claim.json").read_text())["protocol"]["steps"] == bench.SMALL["steps"]
    committed = json.loads((path.parent / "results" / "vilbert_multitask.json").read_text())
    assert committed["protocol"] == bench.PROTOCOL and len(committed["multi"]["vqa"]) == 3
