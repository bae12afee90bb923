"""ERNIE-ViL: scene-graph prediction on ViLBERT (every objective finite and switchable, the masked words
scored in their role's loss, plain MLM = ViLBERT exactly), the fallback without a graph, bad input, the
fine-grained evaluation, exact resume of the pretraining command, gpu-base FLOPs, and the claim benchmark
at a small size."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from course_lib.data import ShapeWorld, WorldConfig
from course_lib.data.datasets import build_tokenizer
from course_lib.data.regions import ShapeWorldRegions
from course_lib.data.scene_graph import ShapeWorldSceneGraphs
from course_lib.evaluate.fine_grained import accuracy_by_type, chance_by_type, near_miss, near_miss_ranking
from course_lib.models.ernie_vil import ErnieViLConfig
from course_lib.models.registry import build_model
from course_lib.objectives.mlm import IGNORE_INDEX
from pretrain_helpers import gpu_region_batch, killed_and_resumed

SGP_OFF = dict(object_weight=0.0, attribute_weight=0.0, relation_weight=0.0)


@pytest.fixture(scope="module")
def world():
    return ShapeWorld(WorldConfig(min_objects=2, max_objects=2, seed=0))


@pytest.fixture(scope="module")
def tokenizer(world):
    return build_tokenizer(world, vocab_size=192, num_scenes=200)


@pytest.fixture(scope="module")
def batch(world, tokenizer):
    return ShapeWorldSceneGraphs(ShapeWorldRegions(world, tokenizer, context_length=20, max_regions=4))(range(16))


def tiny(**overrides):
    torch.manual_seed(0)
    return build_model("ernie_vil", "cpu-tiny", vocab_size=192, context_length=20, **overrides)


def test_every_objective_is_finite_weighted_and_trains(batch):
    model = tiny()
    torch.manual_seed(1)
    out = model(batch)
    assert set(out) == {"loss", "mlm", "object", "attribute", "relation", "mrckl", "itm"}
    assert all(torch.isfinite(v) for v in out.values())
    c = model.config
    assert (c.object_mask_prob, c.attribute_mask_prob, c.relation_mask_prob) == (0.3, 0.3, 0.3)  # the paper's
    torch.testing.assert_close(out["loss"], sum(getattr(c, f"{k}_weight") * v for k, v in out.items() if k != "loss"))
    out["loss"].backward()
    for name in ("word_embeddings.weight", "mlm_head.transform.0.weight", "itm_head.weight", "mrc_head.decoder.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize("off", ["object", "attribute", "relation", "itm", "mrckl"])
def test_each_objective_is_a_switch(batch, off):
    out = tiny(**{f"{off}_weight": 0.0})(batch)
    assert off not in out and set(out) == {"loss", "mlm", "object", "attribute", "relation", "mrckl", "itm"} - {off}


def test_masked_words_are_scored_in_their_roles_loss(batch):
    model = tiny(mrckl_weight=0.0).eval()
    rows = torch.ones(16, dtype=torch.bool)
    rows[3] = False
    torch.manual_seed(2)
    ids, labels = model.mask_text(batch, rows)
    assert (labels[3] == IGNORE_INDEX).all() and (ids[3] != batch["input_ids"][3]).any()  # masked alike, not scored
    roles = batch["sg_roles"]
    with torch.no_grad():
        out = model.encode(batch, ids)
        losses = model.objective_losses(out, batch, labels, None, rows)
        logits = model.mlm_head(out.text)
    for role, value in (("object", 1), ("attribute", 2), ("relation", 3), ("mlm", 0)):
        scored = (labels != IGNORE_INDEX) & (roles == value)
        if scored.any():
            torch.testing.assert_close(losses[role], F.cross_entropy(logits[scored], labels[scored]))
    assert set(losses) >= {"mlm", "object", "attribute", "relation"}


def test_scene_graph_masking_masks_more_graph_words(batch):
    sgp, plain = tiny(), tiny(**SGP_OFF)
    rows = torch.ones(16, dtype=torch.bool)
    graph = batch["sg_roles"] > 0
    share = {}
    for name, model in (("sgp", sgp), ("plain", plain)):
        torch.manual_seed(0)
        chosen = torch.stack([model.mask_text(batch, rows)[1] != IGNORE_INDEX for _ in range(50)])
        share[name] = (chosen & graph).sum().item() / graph.sum().item() / 50
    assert 0.3 < share["sgp"] < 0.6 and 0.1 < share["plain"] < 0.2  # 30% of nodes (+ random MLM) vs 15%


def test_without_scene_graph_prediction_it_is_vilbert(batch):
    plain = tiny(**SGP_OFF)
    vilbert = build_model("vilbert", "cpu-tiny", vocab_size=192, context_length=20)
    vilbert.load_state_dict(plain.state_dict())
    torch.manual_seed(4)
    ours = plain(batch)
    torch.manual_seed(4)
    theirs = vilbert(batch)
    assert set(ours) == set(theirs) == {"loss", "mlm", "mrckl", "itm"}
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key])


def test_a_batch_without_a_scene_graph_falls_back_to_random_mlm(batch):
    model = tiny()
    plain = {k: v for k, v in batch.items() if k not in ("sg_roles", "sg_nodes")}
    with pytest.warns(UserWarning, match="plain random MLM"):
        out = model(plain)
    assert set(out) == {"loss", "mlm", "mrckl", "itm"} and torch.isfinite(out["loss"])


def test_bad_input_and_config_name_the_problem(batch):
    model = tiny()
    with pytest.raises(ValueError, match="sg_roles must have shape"):
        model({**batch, "sg_roles": batch["sg_roles"][:, :5]})
    with pytest.raises(ValueError, match="no sg_nodes"):
        model({k: v for k, v in batch.items() if k != "sg_nodes"})
    with pytest.raises(ValueError, match="integer"):
        model({**batch, "sg_roles": batch["sg_roles"].float()})
    with pytest.raises(ValueError, match="region_feats"):
        model({**batch, "region_feats": batch["region_feats"][..., :10]})
    with pytest.raises(ValueError, match="relation_mask_prob"):
        ErnieViLConfig(relation_mask_prob=0.0)
    with pytest.raises(ValueError, match="needs mlm_weight > 0"):
        ErnieViLConfig(mlm_weight=0.0)
    with pytest.raises(ValueError, match="unknown option 'scene_weight'"):
        tiny(scene_weight=1.0)
    ErnieViLConfig(mlm_weight=0.0, **SGP_OFF)  # ViLBERT without MLM is allowed


# ----------------------------------------------------------------------------- fine-grained evaluation


def test_accuracy_and_chance_by_question_type():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    answers, types = torch.tensor([0, 0, 1, 0]), torch.tensor([0, 0, 4, 4])
    assert accuracy_by_type(logits, answers, types) == {"exist": 0.5, "relation": 0.5, "all": 0.5}
    train = {"answers": torch.tensor([1, 1, 0, 0, 0]), "question_types": torch.tensor([0, 0, 4, 4, 4])}
    assert chance_by_type(train, {"answers": answers, "question_types": types}) == {"exist": 0.0, "relation": 0.5,
                                                                                    "all": 0.75}
    with pytest.raises(ValueError, match="answers"):
        accuracy_by_type(logits, answers[:2], types)
    with pytest.raises(ValueError, match="not in train"):
        chance_by_type({"answers": answers, "question_types": torch.zeros(4, dtype=torch.long)},
                       {"answers": answers, "question_types": types})


def test_near_misses_are_false_and_differ_in_one_node(world):
    from course_lib.data.scene_graph import parse_scene_graph
    from course_lib.evaluate.caption_truth import caption_is_true

    rng = np.random.default_rng(0)
    made = {"object": 0, "attribute": 0, "relation": 0}
    for scene in world.scenes(range(60), "val"):
        for caption in scene.captions[:2]:
            for kind in made:
                text = near_miss(scene, caption, kind, rng)
                if text is None:
                    template = parse_scene_graph(caption).template  # a count caption's numbers cannot change
                    assert (kind == "relation" and template != "relation") or (kind == "attribute" and template == "count")
                    continue
                made[kind] += 1
                assert not caption_is_true(text, scene) and caption_is_true(caption, scene)
                a, b = parse_scene_graph(caption).to_dict(), parse_scene_graph(text).to_dict()
                changed = sum(x != y for x, y in zip(a["objects"], b["objects"])) + (a["relations"] != b["relations"])
                assert changed == 1, (caption, text)
    assert min(made.values()) > 20
    with pytest.raises(ValueError, match="kind"):
        near_miss(world.scene(0), world.scene(0).captions[0], "colour", rng)


def test_near_miss_ranking_counts_wins_and_ties():
    class Scorer(torch.nn.Module):
        def match_scores(self, batch):
            return batch["score"]

    own = {"input_ids": torch.zeros(4, 3), "score": torch.tensor([1.0, 0.0, 2.0, 5.0])}
    near = {"input_ids": torch.zeros(4, 3), "score": torch.tensor([0.0, 1.0, 2.0, 1.0])}
    out = near_miss_ranking(Scorer(), own, near, torch.tensor([0, 0, 2, 2]))
    assert out == {"object": 0.5, "relation": 0.75, "all": 0.625}
    with pytest.raises(ValueError, match="match_scores"):
        near_miss_ranking(torch.nn.Linear(2, 2), own, near, torch.tensor([0, 0, 2, 2]))


# ----------------------------------------------------------------------------- at scale


def test_pretrain_command_resumes_exactly(tmp_path):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        straight, resumed = killed_and_resumed("ernie_vil", tmp_path)
    assert not [w for w in caught if "plain random MLM" in str(w.message)]  # the command's batches carry graphs
    assert resumed.history.losses == straight.history.losses


def test_gpu_base_builds_and_reports_flops():
    from course_lib.flops import model_flops_per_sample

    model = build_model("ernie_vil", "gpu-base")
    c = model.config
    assert c.text_only_layers + c.layers == 12 and c.layers == 6 and c.image_dim == 1024  # 12 text + 6 visual
    assert 200e6 < sum(p.numel() for p in model.parameters()) < 280e6
    batch = gpu_region_batch(c, regions=16, batch_size=2)
    batch["region_probs"] = torch.softmax(torch.randn(2, 16, c.num_region_classes), -1)
    batch["sg_roles"] = torch.zeros_like(batch["input_ids"])  # a graph-less caption: random MLM, no warning
    batch["sg_nodes"] = torch.full_like(batch["input_ids"], -1)
    with torch.no_grad():
        flops = model_flops_per_sample(model, batch)
    fusion = sum(p.numel() for p in model.fusion.parameters())
    assert 6 * fusion * 17 < flops < 3 * 6 * fusion * (c.context_length + 17)


def test_claim_benchmark_runs_at_a_small_size(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "ernie_vil_claim.py"
    spec = importlib.util.spec_from_file_location("ernie_vil_claim", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        results = bench.main(["--small", "--seeds=1", f"--out={tmp_path / 'claim.json'}"])
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((tmp_path / "claim.json").read_text())
    assert [a["arm"] for a in saved["arms"]] == ["sgp", "mlm"] and saved["arms"] == results["arms"]
    for arm in saved["arms"]:
        assert set(arm["scores"]) == set(saved["chance"]) and all(len(v) == 1 for v in arm["scores"].values())


# ----------------------------------------------------------------------------- exercise checks


def test_checks_pass_the_solution_and_explain_wrong_answers():
    from course_lib.checks.ernie_vil import check_accuracy_by_type, check_node_tokens
    from course_lib.checks.verdict import ExerciseError

    check_node_tokens(lambda nodes, chosen: chosen.gather(1, nodes.clamp(min=0)) & (nodes >= 0))
    with pytest.raises(ExerciseError, match="word_nodes = -1"):
        check_node_tokens(lambda nodes, chosen: chosen.gather(1, nodes.clamp(min=0)))  # -1 read as a node
    with pytest.raises(ExerciseError, match="its own row"):
        check_node_tokens(lambda nodes, chosen: chosen.any(0)[nodes.clamp(min=0)] & (nodes >= 0))
    with pytest.raises(ExerciseError, match="not yet"):
        check_node_tokens(lambda nodes, chosen: None)

    check_accuracy_by_type(accuracy_by_type)
    with pytest.raises(ExerciseError, match="'shape' is in the result"):
        check_accuracy_by_type(lambda logits, answers, types: {
            **accuracy_by_type(logits, answers, types), "shape": 0.0})
    with pytest.raises(ExerciseError, match="accuracy of"):
        check_accuracy_by_type(lambda logits, answers, types: {
            k: (v if k == "all" else 0.5) for k, v in accuracy_by_type(logits, answers, types).items()})
