"""LXMERT: the five pretraining tasks (finite, weighted, switchable), the sentence-swap matching, object
masking, the QA loss on matched questions only, parity with transformers' ``LxmertForPreTraining`` (every
head, weights copied both ways, export through ``save_pretrained``), exact resume of the pretraining
command, gpu-base sizes and FLOPs, bad input, and the QA-pretraining benchmark at a small size."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from course_lib.data import ShapeWorld, WorldConfig
from course_lib.data.datasets import build_tokenizer
from course_lib.data.language import answer_vocabulary
from course_lib.data.regions import ShapeWorldRegions
from course_lib.models.lxmert import (LXMERTConfig, TASKS, from_transformers, hide_objects,
                                      qa_pretraining_pool, swap_sentences, to_transformers)
from course_lib.models.registry import build_model
from course_lib.objectives.mlm import IGNORE_INDEX
from pretrain_helpers import gpu_region_batch, killed_and_resumed

os.environ.setdefault("HF_HUB_OFFLINE", "1")
WORLD = WorldConfig(min_objects=1, max_objects=3)
ANSWERS = len(answer_vocabulary(WORLD))


@pytest.fixture(scope="module")
def source():
    world = ShapeWorld(WORLD)
    tokenizer = build_tokenizer(world, vocab_size=128, num_scenes=200)
    return ShapeWorldRegions(world, tokenizer, context_length=32, max_regions=5)


@pytest.fixture(scope="module")
def batch(source):
    """Captions (answers -1) and questions (an answer each) of 6 scenes."""
    return qa_pretraining_pool(source, list(range(6)))


def tiny(**overrides):
    torch.manual_seed(0)
    return build_model("lxmert", "cpu-tiny", vocab_size=128, num_qa_answers=ANSWERS, **overrides)


def test_the_pool_holds_captions_and_questions(source, batch):
    questions = source.questions(list(range(6)))
    n_q = len(questions["input_ids"])
    assert (batch["answers"][:-n_q] == -1).all() and torch.equal(batch["answers"][-n_q:], questions["answers"])
    assert "token_box" not in batch and len(batch["input_ids"]) == 6 + n_q
    assert set(qa_pretraining_pool(source, [0, 1], with_questions=False)["answers"].tolist()) == {-1}


def test_every_task_is_finite_weighted_and_trains(batch):
    model = tiny(qa_weight=0.5, obj_weight=2.0)
    torch.manual_seed(1)
    out = model(batch)
    assert set(out) == {"loss", "mlm", "itm", "feat", "obj", "qa"}
    assert all(torch.isfinite(v) for v in out.values())
    c = model.config
    torch.testing.assert_close(out["loss"], sum(getattr(c, f"{k}_weight") * out[k] for k in out if k != "loss"))
    out["loss"].backward()
    params = dict(model.named_parameters())
    for name in ("word_embeddings.weight", "text_embeddings.position_embeddings.weight",
                 "region_embedding.geometry_proj.weight", "fusion.text_encoder.0.attn.query.weight",
                 "fusion.image_encoder.0.mlp.fc1.weight", "fusion.cross_encoder.0.cross.attn.key.weight",
                 "itm_head.weight", "qa_head.net.3.weight", "object_heads.decoders.feat.weight",
                 "object_heads.decoders.obj.weight"):
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name


@pytest.mark.parametrize("off", TASKS[:-2] + ("qa",))
def test_each_task_is_a_switch(batch, off):
    out = tiny(**{f"{off}_weight": 0.0})(batch)
    assert off not in out and set(out) == {"loss", "mlm", "itm", "feat", "obj", "qa"} - {off}


def test_the_paper_sizes_ratio_and_defaults():
    c = LXMERTConfig.from_preset("gpu-base")
    assert (c.dim, c.heads, c.text_layers, c.image_layers, c.layers) == (768, 12, 9, 5, 5)
    assert (c.region_feat_dim, c.num_region_classes - 1, c.num_attributes, c.num_qa_answers, c.vocab_size) == (
        2048, 1600, 400, 9500, 30522)
    t = LXMERTConfig.from_preset("cpu-tiny")
    assert (t.text_layers, t.image_layers, t.layers) == (2, 1, 1)
    assert (t.mask_prob, t.region_mask_prob, t.itm_prob, t.visual_loss_normalizer) == (0.15, 0.15, 0.5, 6.67)
    assert t.masked_loss_on_mismatched and not t.label_masked_only  # the public code's recipe


# ----------------------------------------------------------------------------- what makes it LXMERT


def test_matching_swaps_the_sentence_not_the_image(batch):
    swapped = torch.zeros(len(batch["input_ids"]), dtype=torch.bool)
    swapped[1::2] = True
    torch.manual_seed(0)
    out = swap_sentences(batch, swapped)
    for key in ("region_feats", "region_boxes", "region_mask", "images"):
        assert torch.equal(out[key], batch[key])  # the image stays
    assert not torch.equal(out["input_ids"][swapped], batch["input_ids"][swapped])
    assert torch.equal(out["input_ids"][~swapped], batch["input_ids"][~swapped])
    assert (out["answers"][swapped] == -1).all()  # a question about another image is not answered
    assert torch.equal(out["answers"][~swapped], batch["answers"][~swapped])


def test_qa_is_scored_on_matched_questions_only(batch):
    model = tiny()
    model.eval()
    logits = torch.randn(len(batch["answers"]), ANSWERS)
    answers = batch["answers"].clone()
    expected = F.cross_entropy(logits[answers >= 0], answers[answers >= 0])
    torch.testing.assert_close(model.qa_loss(logits, answers), expected)
    assert model.qa_loss(logits, torch.full_like(answers, -1)) is None
    captions_only = {k: v[batch["answers"] < 0] for k, v in batch.items()}
    assert "qa" not in model(captions_only)  # nothing to answer: no QA loss, no NaN


def test_hide_objects_follows_lxmert_random_feat():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(400, 10, 6, generator=g) + 5.0
    mask = torch.ones(400, 10, dtype=torch.bool)
    mask[:, 8:] = False
    masked, chosen = hide_objects(feats, mask, 0.15, generator=g)
    assert not (chosen & ~mask).any() and abs(chosen[mask].float().mean().item() - 0.15) < 0.01
    zeroed = (masked == 0).all(-1) & chosen
    kept = (masked == feats).all(-1) & chosen
    other = chosen & ~zeroed & ~kept
    n = chosen.sum().item()
    assert abs(zeroed.sum().item() / n - 0.8) < 0.04 and abs(kept.sum().item() / n - 0.1) < 0.03
    assert abs(other.sum().item() / n - 0.1) < 0.03
    assert torch.equal(masked[~chosen], feats[~chosen])  # an unchosen object is untouched


def test_visual_losses_are_the_originals_reductions(batch):
    model = tiny()
    torch.manual_seed(0)
    predicted = {"feat": torch.randn_like(batch["region_feats"]),
                 "obj": torch.randn(*batch["region_mask"].shape, model.config.num_region_classes - 1)}
    chosen = batch["region_mask"].clone()
    chosen[:, 1:] = False
    losses = model.visual_losses(predicted, batch, chosen)
    real, labels = batch["region_mask"], batch["region_labels"]
    smooth = F.smooth_l1_loss(predicted["feat"], batch["region_feats"], reduction="none").mean(-1)
    torch.testing.assert_close(losses["feat"], (smooth * chosen).sum() / real.sum() * 6.67)
    conf = batch["region_probs"][..., :-1].gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    ce = F.cross_entropy(predicted["obj"].flatten(0, 1), labels.clamp(min=0).flatten(), reduction="none")
    weight = (conf * (real & (labels >= 0))).flatten()
    torch.testing.assert_close(losses["obj"], (ce * weight).sum() / real.sum() * 6.67)  # every object, not only chosen
    only = tiny(label_masked_only=True).visual_losses(predicted, batch, chosen)["obj"]
    weight = (conf * (chosen & (labels >= 0))).flatten()
    torch.testing.assert_close(only, (ce * weight).sum() / real.sum() * 6.67)


def test_mlm_scores_mismatched_pairs_unless_switched_off(batch):
    from course_lib.models import lxmert as module

    seen = {}

    def spy(ids, attention, keep_rows, *args, **kwargs):
        seen["rows"] = keep_rows.clone()
        return original(ids, attention, keep_rows, *args, **kwargs)

    original = module.mask_caption
    module.mask_caption = spy
    try:
        torch.manual_seed(0)
        tiny()(batch)
        assert seen["rows"].all()
        torch.manual_seed(0)
        tiny(masked_loss_on_mismatched=False)(batch)
        assert not seen["rows"].all() and seen["rows"].any()
    finally:
        module.mask_caption = original


def test_mlm_labels_never_fall_on_padding(batch):
    from course_lib.models.region_bert import mask_caption

    ids, labels = mask_caption(batch["input_ids"], batch["attention_mask"], torch.ones(len(batch["input_ids"]),
                               dtype=torch.bool), 128, 0.15)
    assert ((labels != IGNORE_INDEX) <= batch["attention_mask"].bool()).all()


# ----------------------------------------------------------------------------- transformers parity and export


def hf_lxmert(attributes: int = 5):
    from transformers import LxmertConfig, LxmertForPreTraining

    config = LxmertConfig(vocab_size=128, hidden_size=32, num_attention_heads=4, intermediate_size=64, l_layers=2,
                          x_layers=2, r_layers=1, visual_feat_dim=108, visual_pos_dim=4, num_object_labels=18,
                          num_attr_labels=attributes, visual_attr_loss=attributes > 0, num_qa_labels=ANSWERS,
                          max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = LxmertForPreTraining(config).eval()
    with torch.no_grad():  # random, non-trivial values everywhere (biases and LayerNorms included)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def hf_heads(hf, batch) -> dict:
    with torch.no_grad():
        out = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 visual_feats=batch["region_feats"], visual_pos=batch["region_boxes"],
                 visual_attention_mask=batch["region_mask"].long(), output_hidden_states=True)
        objects = hf.obj_predict_head(out.vision_hidden_states[-1])
    return {"mlm": out.prediction_logits, "itm": out.cross_relationship_score, "qa": out.question_answering_score,
            **objects}


def course_heads(model, batch) -> dict:
    model.eval()
    with torch.no_grad():
        return model.heads(model.encode(batch))


@pytest.mark.parametrize("attributes", [5, 0])
def test_matches_transformers_with_copied_weights(batch, attributes):
    """Every head (MLM logits, matching logit, QA logits, feature regression, object and attribute
    labels) at atol 1e-5 (float32: the same operations in another order)."""
    hf = hf_lxmert(attributes)
    ours = from_transformers(hf)
    theirs, mine = hf_heads(hf, batch), course_heads(ours, batch)
    assert set(theirs) == set(mine) == {"mlm", "itm", "qa", "feat", "obj"} | ({"attr"} if attributes else set())
    for name in theirs:
        torch.testing.assert_close(mine[name], theirs[name], atol=1e-5, rtol=1e-5, msg=name)


def test_trained_lxmert_exports_to_transformers(batch, tmp_path):
    from transformers import LxmertForPreTraining

    model = tiny(num_attributes=3, mlp_ratio=2.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):  # trained weights, not the initial ones
        optimizer.zero_grad()
        model(batch)["loss"].backward()
        optimizer.step()
    to_transformers(model).save_pretrained(tmp_path)
    loaded = LxmertForPreTraining.from_pretrained(tmp_path).eval()
    theirs, mine = hf_heads(loaded, batch), course_heads(model, batch)
    assert set(theirs) == set(mine) == {"mlm", "itm", "qa", "feat", "obj", "attr"}
    for name in theirs:
        torch.testing.assert_close(mine[name], theirs[name], atol=1e-5, rtol=1e-5, msg=name)
    back = from_transformers(loaded)  # and back again
    for name, tensor in course_heads(back, batch).items():
        torch.testing.assert_close(tensor, mine[name], atol=1e-5, rtol=1e-5, msg=name)


def test_interop_rejects_the_wrong_model():
    from transformers import VisualBertConfig, VisualBertForPreTraining

    with pytest.raises(ValueError, match="LxmertForPreTraining"):
        from_transformers(VisualBertForPreTraining(VisualBertConfig(hidden_size=32, num_hidden_layers=1,
                                                                    num_attention_heads=2, intermediate_size=32)))
    with pytest.raises(ValueError, match="course LXMERT"):
        to_transformers(build_model("uniter", "cpu-tiny"))


# ----------------------------------------------------------------------------- bad input


def test_bad_input_names_the_problem(batch):
    model = tiny()
    with pytest.raises(ValueError, match="num_qa_answers"):
        model({**batch, "answers": batch["answers"].clamp(min=0) + ANSWERS})
    with pytest.raises(ValueError, match="at least 2 pairs"):
        model({k: v[:1] for k, v in batch.items()})
    with pytest.raises(ValueError, match="region_feats"):
        model({**batch, "region_feats": batch["region_feats"][..., :10]})
    with pytest.raises(ValueError, match="has no region"):
        model({**batch, "region_mask": torch.zeros_like(batch["region_mask"])})
    with pytest.raises(ValueError, match="NaN"):
        model({**batch, "region_feats": batch["region_feats"] * float("nan")})
    with pytest.raises(ValueError, match="answers"):
        model({**batch, "answers": batch["answers"][:2]})
    with pytest.raises(ValueError, match="needs region_labels"):
        model({k: v for k, v in batch.items() if k != "region_labels"})
    with pytest.raises(ValueError, match="mrc_weight must stay 0"):
        LXMERTConfig(mrc_weight=1.0)
    with pytest.raises(ValueError, match="text_layers"):
        LXMERTConfig(text_layers=0)
    with pytest.raises(ValueError, match="unknown option 'qa_loss'"):
        tiny(qa_loss=1.0)
    with pytest.raises(ValueError, match="nothing would be learned"):
        LXMERTConfig(**{f"{t}_weight": 0.0 for t in TASKS})


# ----------------------------------------------------------------------------- at scale


def test_pretrain_command_resumes_exactly(tmp_path):
    straight, resumed = killed_and_resumed("lxmert", tmp_path)
    assert resumed.history.losses == straight.history.losses
    assert resumed.history.records == straight.history.records


def test_gpu_base_builds_and_reports_flops():
    from course_lib.flops import model_flops_per_sample

    model = build_model("lxmert", "gpu-base")
    c = model.config
    n_params = sum(p.numel() for p in model.parameters())
    assert 200e6 < n_params < 240e6, n_params  # LXMERT's ~228M with the 9500-answer head
    regions = 36
    batch = gpu_region_batch(c, regions=regions)
    batch["region_labels"] = batch["region_labels"].clamp(max=c.num_region_classes - 2)
    with torch.no_grad():
        flops = model_flops_per_sample(model, batch)
    stack = {name: sum(p.numel() for p in getattr(model.fusion, name).parameters())
             for name in ("text_encoder", "image_encoder", "cross_encoder")}
    L = c.context_length
    six_nt = 6 * (stack["text_encoder"] * L + stack["image_encoder"] * regions + stack["cross_encoder"] * (L + regions))
    assert 0.8 * six_nt < flops < 3 * six_nt, (flops, six_nt)


def test_qa_benchmark_runs_at_a_small_size(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "lxmert_qa_pretraining.py"
    spec = importlib.util.spec_from_file_location("lxmert_qa_pretraining", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        results = bench.main(["--small", f"--out={tmp_path / 'qa.json'}"])
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((tmp_path / "qa.json").read_text())
    assert saved["rows"] == results["rows"] and [r["arm"] for r in saved["rows"]] == list(bench.ARMS)
    for row in saved["rows"]:
        assert all(len(row[m]) == 1 and 0 <= row[m][0] <= 1 for m in bench.MEASURES)
        assert len(row["qa_head"]) == (1 if row["arm"] == "with QA" else 0)  # only the QA arm has a trained head
    printed = capsys.readouterr().out
    assert "| with QA |" in printed and "reproduce: python benchmarks/lxmert_qa_pretraining.py --small" in printed
    committed = json.loads((path.parent / "results" / "lxmert_qa_pretraining.json").read_text())
    assert [r["arm"] for r in committed["rows"]] == list(bench.ARMS)
    assert all(len(r[m]) >= 3 for r in committed["rows"] for m in bench.MEASURES)  # >= 3 seeds an arm
    assert committed["protocol"]["seeds"] >= 3 and 0 < committed["chance"] < 1


# ----------------------------------------------------------------------------- the graded exercises


def test_checks_pass_the_solutions_and_name_the_mistakes(capsys):
    from course_lib.checks.lxmert import check_feature_loss, check_matching_negatives
    from course_lib.checks.verdict import ExerciseError

    def negatives(ids, mask, answers, swapped, source):
        return (torch.where(swapped[:, None], ids[source], ids), torch.where(swapped[:, None], mask[source], mask),
                answers.masked_fill(swapped, -1))

    def feature(predicted, target, chosen, region_mask, normalizer):
        per_object = F.smooth_l1_loss(predicted, target, reduction="none").mean(-1)
        return (per_object * chosen).sum() / region_mask.sum() * normalizer

    check_matching_negatives(negatives)
    check_feature_loss(feature)
    assert capsys.readouterr().out.count("PASS") == 2

    def starter(*args):
        raise NotImplementedError

    for check in (check_matching_negatives, check_feature_loss):
        with pytest.raises(ExerciseError, match="not yet"):
            check(starter)
    wrong = {
        "answers followed the questions": lambda i, m, a, s, src: (*negatives(i, m, a, s, src)[:2], a[src]),
        "attention mask must travel": lambda i, m, a, s, src: (negatives(i, m, a, s, src)[0], m,
                                                               negatives(i, m, a, s, src)[2]),
        "every row took": lambda i, m, a, s, src: (i[src], m[src], a.masked_fill(s, -1)),
    }
    for message, fn in wrong.items():
        with pytest.raises(ExerciseError, match=message):
            check_matching_negatives(fn)
    with pytest.raises(ExerciseError, match="squared error"):
        check_feature_loss(lambda p, t, c, m, n: (((p - t) ** 2).mean(-1) * c).sum() / m.sum() * n)
    with pytest.raises(ExerciseError, match="number of chosen objects"):
        check_feature_loss(lambda p, t, c, m, n: (F.smooth_l1_loss(p, t, reduction="none").mean(-1) * c).sum()
                           / c.sum() * n)
