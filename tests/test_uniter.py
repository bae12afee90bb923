"""UNITER: every objective finite and switchable, conditional masking, the task mix, WRA on the fused
outputs, exact resume of the pretraining command, gpu-base FLOPs, bad input, and the ablation benchmark
at a small size."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from course_lib.data import ShapeWorld, WorldConfig
from course_lib.data.datasets import build_tokenizer
from course_lib.data.regions import ShapeWorldRegions
from course_lib.models.registry import build_model
from course_lib.models.uniter import TASKS, UniterConfig
from course_lib.objectives.mlm import IGNORE_INDEX
from course_lib.objectives.wra import ot_distance, wra_loss
from pretrain_helpers import assert_flops_near_6nt, gpu_region_batch, killed_and_resumed

ALL_ON = dict(sample_tasks=False, mrc_weight=1.0)  # every objective on every batch


@pytest.fixture(scope="module")
def batch():
    world = ShapeWorld(WorldConfig(min_objects=1, max_objects=3))
    tokenizer = build_tokenizer(world, vocab_size=128, num_scenes=200)
    return ShapeWorldRegions(world, tokenizer, context_length=32, max_regions=5)(list(range(12)))


def tiny(**overrides):
    torch.manual_seed(0)
    return build_model("uniter", "cpu-tiny", vocab_size=128, **overrides)


def test_every_objective_is_finite_weighted_and_trains(batch):
    model = tiny(**ALL_ON)
    out = model(batch)
    assert set(out) == {"loss", "mlm", "itm", "wra", "mrfr", "mrc", "mrckl"}
    assert all(torch.isfinite(v) for v in out.values())
    c = model.config
    expected = sum(getattr(c, f"{name}_weight") * out[name] for name in out if name != "loss")
    torch.testing.assert_close(out["loss"], expected)
    assert c.wra_weight == 0.1 and c.mix_itm == c.mix_mlm == 2.0 and c.mix_mrfr == c.mix_mrckl == 1.0  # the paper's
    out["loss"].backward()
    for name in ("word_embeddings.weight", "region_mask_embedding", "mrfr_head.transform.0.weight",
                 "mrc_head.decoder.weight", "itm_head.weight", "region_embedding.geometry_proj.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize("off", ["mlm", "itm", "mrfr", "mrc", "mrckl", "wra"])
def test_each_objective_is_a_switch(batch, off):
    overrides = dict(ALL_ON, **{f"{off}_weight": 0.0})
    if off == "itm":
        overrides["wra_weight"] = 0.0  # WRA rides on ITM's batches
    out = tiny(**overrides)(batch)
    assert off not in out and "loss" in out
    assert set(out) - {"loss"} == {"mlm", "itm", "wra", "mrfr", "mrc", "mrckl"} - {off} - ({"wra"} if off == "itm" else set())


def test_mrfr_head_is_tied_to_the_input_projection_and_geometry_is_7d():
    model = tiny()
    assert model.mrfr_head.weight is model.region_embedding.feature_proj.weight
    assert model.region_embedding.geometry == "7d" and model.region_embedding.preset.size == 7
    assert tiny(mrfr_weight=0.0).mrfr_head is None


def test_config_errors_name_the_option():
    with pytest.raises(ValueError, match="wra_weight > 0 needs itm_weight > 0"):
        UniterConfig(itm_weight=0.0)
    with pytest.raises(ValueError, match="mix_mrfr = 0"):
        UniterConfig(mix_mrfr=0.0)
    with pytest.raises(ValueError, match="mix_itm must be >= 0"):
        UniterConfig(mix_itm=-1.0)
    with pytest.raises(ValueError, match="nothing would be learned"):
        UniterConfig(mlm_weight=0.0, itm_weight=0.0, mrfr_weight=0.0, mrckl_weight=0.0, wra_weight=0.0)
    with pytest.raises(ValueError, match="MRC-kl"):
        UniterConfig(mrc_target="soft")
    with pytest.raises(ValueError, match="unknown option 'mrm_weight'"):
        tiny(mrm_weight=1.0)
    UniterConfig(mlm_weight=0.0, itm_weight=0.0, mrckl_weight=0.0, wra_weight=0.0)  # MRFR alone (the paper's L3)
    UniterConfig(mix_mrfr=0.0, mrfr_weight=0.0)  # a switched-off task needs no share


# ----------------------------------------------------------------------------- conditional masking


@pytest.mark.parametrize("task", TASKS)
def test_conditional_masking_never_masks_both_modalities(batch, task):
    model = tiny(mrc_weight=1.0)
    for seed in range(20):
        torch.manual_seed(seed)
        inputs = model.mask_for_task(batch, task)
        words = inputs.mlm_labels is not None and (inputs.mlm_labels != IGNORE_INDEX).any(1)
        changed = (inputs.input_ids != batch["input_ids"]).any(1)
        regions = inputs.hidden.any(1) if inputs.hidden is not None else torch.zeros_like(changed)
        if task == "mlm":
            assert inputs.hidden is None and words.all()  # every caption scored, every image whole
        elif task == "itm":
            assert inputs.mlm_labels is None and inputs.hidden is None and not changed.any()
            assert inputs.matched.any() and not inputs.matched.all()
        else:
            assert inputs.mlm_labels is None and not changed.any() and regions.all()  # >= 1 region per image
            assert not (inputs.hidden & ~batch["region_mask"].bool()).any()  # never padding
        assert not (changed & regions).any()
        if task != "itm":
            assert inputs.matched.all()  # MLM and MRM see matched pairs only


def test_without_conditional_masking_both_modalities_are_masked(batch):
    model = tiny(conditional_masking=False, wra_weight=0.0)
    torch.manual_seed(0)
    for task in ("mlm", "mrfr", "mrckl"):
        inputs = model.mask_for_task(batch, task)
        assert inputs.hidden.any(1).all() and (inputs.mlm_labels != IGNORE_INDEX).any(1).all()


def test_a_masked_region_is_zeroed_plus_the_mask_vector(batch):
    model = tiny()
    hidden = torch.zeros_like(batch["region_mask"])
    hidden[:, 0] = True
    _, image, _ = model.embed(batch, batch["input_ids"], hidden)
    mask_vector = model.region_mask_embedding.expand(len(hidden), -1)
    by_hand = model.region_embedding(mask_vector, batch["region_boxes"][:, 0])
    torch.testing.assert_close(image[:, 0], by_hand)
    _, whole, _ = model.embed(batch, batch["input_ids"], None)
    torch.testing.assert_close(image[:, 1:], whole[:, 1:])  # the other regions are untouched


# ----------------------------------------------------------------------------- the task mix


def test_tasks_are_drawn_by_the_mix_and_deterministically():
    model = tiny(mrc_weight=1.0, mix_mrc=3.0)
    mix = model.config.task_mix
    assert mix == pytest.approx({"mlm": 2 / 9, "itm": 2 / 9, "mrfr": 1 / 9, "mrc": 3 / 9, "mrckl": 1 / 9})
    torch.manual_seed(0)
    draws = [model.sample_task() for _ in range(9000)]
    counts = Counter(draws)
    for task, p in mix.items():
        assert abs(counts[task] / len(draws) - p) < 0.02, (task, counts[task] / len(draws), p)
    torch.manual_seed(0)
    assert [model.sample_task() for _ in range(9000)] == draws  # the global RNG decides
    assert set(tiny(mrfr_weight=0.0, mrckl_weight=0.0, wra_weight=0.0).config.task_mix) == {"mlm", "itm"}


def test_forward_runs_the_drawn_task_only(batch):
    model = tiny()
    keys = {"mlm": {"mlm"}, "itm": {"itm", "wra"}, "mrfr": {"mrfr"}, "mrckl": {"mrckl"}}
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        out = model(batch)
        assert set(out) == {"loss"} | keys[model.last_task]
        torch.testing.assert_close(out["loss"], sum(getattr(model.config, f"{k}_weight") * out[k] for k in keys[model.last_task]))
        seen.add(model.last_task)
    assert seen == set(keys)


def test_wra_is_ipot_between_the_fused_outputs(batch):
    model = tiny()
    torch.manual_seed(3)
    inputs = model.mask_for_task(batch, "itm")
    torch.manual_seed(3)
    losses = model.task_losses(batch, "itm")
    out = model.encode(inputs.batch)
    distances = ot_distance(out.text, out.image, inputs.batch["attention_mask"].bool(),
                            inputs.batch["region_mask"].bool(), beta=0.5, iterations=50, cost_scale=1.0)
    torch.testing.assert_close(losses["wra"], wra_loss(distances, inputs.matched))
    plans = model.transport_plans(batch)
    assert plans.shape == (12, 32, 5)
    torch.testing.assert_close(plans.sum((1, 2)), torch.ones(12))
    assert (plans[~batch["region_mask"].bool()[:, None, :].expand_as(plans)] == 0).all()


# ----------------------------------------------------------------------------- bad input


def test_bad_input_names_the_problem(batch):
    model = tiny(mrc_weight=1.0)
    with pytest.raises(ValueError, match="MRC-kl needs region_probs"):
        model.task_losses({k: v for k, v in batch.items() if k != "region_probs"}, "mrckl")
    with pytest.raises(ValueError, match="at least 2 pairs"):
        model.task_losses({k: v[:1] for k, v in batch.items()}, "itm")
    with pytest.raises(ValueError, match="unknown task 'mrm'"):
        model.mask_for_task(batch, "mrm")
    with pytest.raises(ValueError, match="region_feats"):
        model({**batch, "region_feats": batch["region_feats"][..., :10]})
    with pytest.raises(ValueError, match="missing"):
        model({k: v for k, v in batch.items() if k != "region_boxes"})
    with pytest.raises(ValueError, match="has no region"):
        model({**batch, "region_mask": torch.zeros_like(batch["region_mask"])})
    with pytest.raises(ValueError, match="NaN"):
        model({**batch, "region_feats": batch["region_feats"] * float("nan")})


# ----------------------------------------------------------------------------- at scale


def test_pretrain_command_resumes_exactly(tmp_path):
    straight, resumed = killed_and_resumed("uniter", tmp_path)
    assert resumed.history.losses == straight.history.losses  # task draws, masking and ITM draws resume too
    assert resumed.history.records == straight.history.records  # the same task at every step


def test_pretrain_command_accumulates_micro_batches_of_different_tasks(tmp_path):
    from course_lib.pretrain import parse_args, pretrain

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = pretrain(parse_args(["--model=uniter", "--steps=3", "--global_batch=8", "--micro_batch=2",
                                      "--num_workers=0", "--log_every=1", f"--out_dir={tmp_path / 'run'}",
                                      f"--tokenizer={tmp_path / 'tokenizer'}"]))
    finally:
        torch.set_num_threads(threads)
    logged = {k for r in result.history.records for k in r} - {"step", "lr", "loss", "grad_norm"}
    assert logged and logged <= {"mlm", "itm", "wra", "mrfr", "mrckl"}  # 4 micro-batches, one task each
    assert all(torch.isfinite(torch.tensor(result.history.losses)))


def test_gpu_base_builds_and_reports_flops():
    model = build_model("uniter", "gpu-base")
    c = model.config
    assert c.dim == 768 and c.layers == 12 and c.region_feat_dim == 2048 and c.num_region_classes == 1601
    assert 100e6 < sum(p.numel() for p in model.parameters()) < 135e6  # BERT-base + region embedding and heads
    batch = gpu_region_batch(c)
    batch["region_probs"] = torch.softmax(torch.randn(2, 36, c.num_region_classes), -1)
    batch["region_labels"] = batch["region_probs"][..., :-1].argmax(-1)
    assert_flops_near_6nt(model, batch, c.context_length + 36)

def test_ablation_benchmark_runs_at_a_small_size(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "uniter_ablation.py"
    spec = importlib.util.spec_from_file_location("uniter_ablation", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        results = bench.main(["--small", "--seeds=1", "--lines=L1,L6,L11", f"--out={tmp_path / 'ablation.json'}"])
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((tmp_path / "ablation.json").read_text())
    assert saved["rows"] == results["rows"] and [r["line"] for r in saved["rows"]] == ["L1", "L6", "L11"]
    for row in saved["rows"]:
        assert set(row["scores"]) == {*bench.TASKS, bench.ALIGNMENT} and all(len(v) == 1 for v in row["scores"].values())
        assert all(0 <= x <= 1 for v in row["scores"].values() for x in v)
        assert len(row["paper"]) == len(bench.PAPER_COLUMNS)
    printed = capsys.readouterr().out
    assert "| L11 | MLM + ITM + MRC-kl + MRFR + WRA |" in printed and "400.93" in printed
    assert "reproduce: python benchmarks/uniter_ablation.py --small" in printed
    committed = json.loads((path.parent / "results" / "uniter_ablation.json").read_text())
    assert [r["line"] for r in committed["rows"]] == list(bench.LINES)  # the full table is committed
    assert all(len(v) >= 3 for r in committed["rows"] for v in r["scores"].values())  # >= 3 seeds a line
