"""ALBEF: ITC on the unimodal encoders before fusion, ITM with hard negatives drawn from ITC, MLM, the
momentum model (EMA) with its feature queues and soft targets, the switches, two-stage retrieval, bad
input, and the pretraining command (exact resume with the momentum model and queues in the checkpoint)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from course_lib.evaluate.fused import match_matrix
from course_lib.evaluate.two_stage import rerank_top_k, two_stage_retrieval, two_stage_scores
from course_lib.features.text import CLS_ID, SEP_ID
from course_lib.models.registry import build_model
from pretrain_helpers import killed_and_resumed


def tiny(**overrides):
    torch.manual_seed(0)
    return build_model("albef", "cpu-tiny", **{"vocab_size": 64, "queue_size": 16, **overrides})


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 64, (4, 10), generator=g)
    ids[:, 0], ids[:, -1] = CLS_ID, SEP_ID
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[1, 7:] = 0
    return {"images": torch.rand(4, 3, 32, 32, generator=g), "input_ids": ids, "attention_mask": mask}


def test_forward_gives_every_objective_and_trains(batch):
    model = tiny()
    out = model(batch)
    assert {"loss", "itc", "itm", "mlm", "alpha", "temperature"} <= set(out)
    assert torch.isfinite(out["loss"]) and float(out["alpha"]) == 0.0  # alpha ramps up from 0
    torch.testing.assert_close(out["loss"].detach(), out["itc"] + out["itm"] + out["mlm"])
    out["loss"].backward()
    assert model.encoders.vision_proj.weight.grad.abs().sum() > 0 and model.itm_head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.momentum_encoders.parameters())  # the momentum model is frozen


def test_itc_reads_the_unimodal_encoders_before_fusion(batch):
    """ITC's features come from the text layers without cross-attention: changing the image does not
    change the text feature (it would if the text feature were read after fusion)."""
    model = tiny().eval()
    text = model.encode_text(batch["input_ids"], batch["attention_mask"])
    enc = model.encoders
    hidden = enc.encoder.text_layers[0](enc.embeddings(batch["input_ids"]), batch["attention_mask"].bool())[0]
    torch.testing.assert_close(text, F.normalize(enc.text_proj(hidden[:, 0]), dim=-1))
    assert not enc.encoder.text_layers[0].has_cross and enc.encoder.text_layers[1].has_cross
    fused = model.encode(batch).pooled
    fused_other = model.encode(dict(batch, images=batch["images"].flip(0))).pooled
    assert not torch.allclose(fused, fused_other)  # the fused [CLS] does read the image


def test_momentum_update_queue_and_alpha_ramp(batch):
    model = tiny(alpha_warmup_steps=4, momentum=0.5)
    before = {n: p.detach().clone() for n, p in model.momentum_encoders.named_parameters()}
    student = {n: p.detach().clone() for n, p in model.encoders.named_parameters()}
    queue_before = model.text_queue.queue.clone()
    with torch.no_grad():
        model.encoders.vision_proj.weight.add_(1.0)  # move the student so the EMA has something to follow
    model(batch)
    name = "vision_proj.weight"
    torch.testing.assert_close(model.momentum_encoders.get_parameter(name),
                               0.5 * before[name] + 0.5 * (student[name] + 1.0))
    assert int(model.text_queue.ptr) == 4 and int(model.forwards) == 1
    torch.testing.assert_close(model.text_queue.queue[4:], queue_before[4:])  # the 4 oldest rows replaced
    model.eval()
    text_m = model.momentum_encoders.encode_text(batch["input_ids"], batch["attention_mask"].bool())[1]
    torch.testing.assert_close(model.text_queue.queue[:4], text_m)  # ... by the momentum text features
    alphas = []
    model.train()
    for _ in range(5):
        alphas.append(float(model(batch)["alpha"]))
    assert alphas == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4])  # alpha * min(1, forwards / warm-up)


def test_eval_mode_changes_no_state(batch):
    model = tiny().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model(batch)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_itc_targets_are_the_paper_mix(batch, monkeypatch):
    """With alpha = 0.4 the ITC target is 0.4 softmax(momentum sims / temp) + 0.6 one-hot over [batch; queue]."""
    import course_lib.models.albef as albef

    seen = []
    real = albef.soft_cross_entropy
    monkeypatch.setattr(albef, "soft_cross_entropy", lambda logits, targets: seen.append(targets) or real(logits, targets))
    model = tiny(alpha_warmup_steps=0)
    model(batch)
    i2t = seen[0]
    assert i2t.shape == (4, 4 + 16)  # the batch's 4 captions, then the queue's 16
    assert torch.allclose(i2t.sum(1), torch.ones(4)) and (i2t.diagonal() >= 0.6).all()
    off = i2t - 0.6 * torch.eye(4, 20)
    assert (off >= 0).all() and torch.allclose(off.sum(1), torch.full((4,), 0.4))  # 0.4 x the teacher's softmax


def test_same_captions_are_positives_in_the_batch_and_the_queue(batch, monkeypatch):
    """caption_positives: a key with the same caption as the query is a positive (BLIP's idx positives):
    ITC's hard target spreads over them, and ITM never draws them as negatives."""
    import course_lib.models.albef as albef

    batch = dict(batch, input_ids=batch["input_ids"].clone(), attention_mask=batch["attention_mask"].clone())
    batch["input_ids"][2], batch["attention_mask"][2] = batch["input_ids"][0], batch["attention_mask"][0]
    keys = albef.caption_key(batch["input_ids"], batch["attention_mask"])
    assert keys[0] == keys[2] and len(set(keys.tolist())) == 3
    padded = albef.caption_key(torch.cat([batch["input_ids"], torch.zeros(4, 3, dtype=torch.long)], 1),
                               torch.cat([batch["attention_mask"], torch.zeros(4, 3, dtype=torch.long)], 1))
    torch.testing.assert_close(padded, keys)  # padding does not change the key
    seen, excluded = [], []
    real, real_neg = albef.soft_cross_entropy, albef.sample_hard_negatives
    monkeypatch.setattr(albef, "soft_cross_entropy", lambda logits, targets: seen.append(targets) or real(logits, targets))
    monkeypatch.setattr(albef, "sample_hard_negatives",
                        lambda *a, **k: excluded.append(k["same_image"]) or real_neg(*a, **k))
    model = tiny(caption_positives=True, distill=False)
    model(batch)
    first = seen[0]  # (4, 4 + 16): rows 0 and 2 share a caption; the queue holds random rows (key -1)
    assert torch.equal(first[0, :4], torch.tensor([0.5, 0.0, 0.5, 0.0])) and first[1, 1] == 1 and first[:, 4:].sum() == 0
    assert excluded[0][0, 2] and excluded[0][2, 0] and not excluded[0][0, 1]
    torch.testing.assert_close(model.caption_queue[:4], keys)  # enqueued with the momentum features
    model(batch)
    second = seen[2]  # now the queue's first 4 rows are the previous batch: rows 0 and 2 match 4 keys each
    assert torch.equal(second[0].nonzero().flatten(), torch.tensor([0, 2, 4, 6])) and second[0, 0] == 0.25


def test_hard_negatives_come_from_itc_and_random_without_itc(batch, monkeypatch):
    import course_lib.models.albef as albef

    calls = []
    monkeypatch.setattr(albef, "sample_hard_negatives",
                        lambda *a, **k: calls.append("hard") or (torch.tensor([1, 0, 3, 2]), torch.tensor([2, 3, 0, 1])))
    monkeypatch.setattr(albef, "sample_random_negatives",
                        lambda n, **k: calls.append("random") or torch.tensor([1, 0, 3, 2]))
    tiny()(batch)
    assert calls == ["hard"]
    calls.clear()
    tiny(itc_weight=0.0)(batch)
    assert calls == ["random", "random"]
    calls.clear()
    tiny(hard_negatives=False)(batch)
    assert calls == ["random", "random"]


def test_switches_are_config_fields(batch):
    out = tiny(distill=False, alpha_warmup_steps=0)(batch)
    assert float(out["alpha"]) == 0.0
    out = tiny(itc_weight=0.0, mlm_weight=0.0)(batch)
    torch.testing.assert_close(out["loss"].detach(), out["itm"])


def test_state_dict_holds_momentum_model_and_queues():
    keys = tiny().state_dict().keys()
    assert {"image_queue.queue", "text_queue.queue", "image_queue.ptr", "caption_queue", "forwards", "temp"} <= set(keys)
    assert any(k.startswith("momentum_encoders.encoder.text_layers") for k in keys)


def test_two_stage_retrieval_reranks_the_top_k(batch):
    sim = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.7], [0.3, 0.6, 0.1]])
    rescored = rerank_top_k(sim, lambda rows, cols: (10 * rows + cols).float(), k=2)
    assert rescored[0, 0] == 0 and rescored[0, 2] == 2 and rescored[0, 1] < rescored[0, 0]
    assert rescored[1, 2] == 12 and rescored[1, 0] < rescored[1, 1]
    model = tiny().eval()
    full = two_stage_scores(model, batch, k=4)  # k = N: every pair re-scored, equal to the ITM matrix
    torch.testing.assert_close(full[0], match_matrix(model, batch))
    torch.testing.assert_close(full[1], match_matrix(model, batch).T)
    scores = two_stage_retrieval(model, batch, k=2, ks=(1,))
    assert set(scores) == {"i2t_R@1", "t2i_R@1", "mean_recall"}
    everything = two_stage_retrieval(model, batch, k=2, ks=(1,), positives=torch.ones(4, 4, dtype=torch.bool))
    assert everything["i2t_R@1"] == everything["t2i_R@1"] == 1.0  # every text a positive: every query hits
    with pytest.raises(ValueError, match="positives"):
        two_stage_retrieval(model, batch, k=2, positives=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="k must be"):
        two_stage_retrieval(model, batch, k=0)


def test_bad_input_names_the_problem(batch):
    model = tiny()
    with pytest.raises(ValueError, match="images"):
        model({k: v for k, v in batch.items() if k != "images"})
    with pytest.raises(ValueError, match="images"):
        model(dict(batch, images=torch.rand(4, 3, 16, 16)))
    with pytest.raises(ValueError, match="at least 2"):
        model({k: v[:1] for k, v in batch.items()})
    with pytest.raises(ValueError, match="attention_mask"):
        model(dict(batch, attention_mask=torch.zeros(4, 10, dtype=torch.long)))
    with pytest.raises(ValueError, match="captions"):
        model(dict(batch, input_ids=batch["input_ids"][:3], attention_mask=batch["attention_mask"][:3]))
    with pytest.raises(ValueError, match="alpha"):
        tiny(alpha=1.5)
    with pytest.raises(ValueError, match="all 0"):
        tiny(itc_weight=0.0, itm_weight=0.0, mlm_weight=0.0)
    with pytest.raises(ValueError, match="unknown option"):
        tiny(queue=3)


# ----------------------------------------------------------------------------- at scale


def test_pretrain_command_resumes_albef_exactly(tmp_path):
    straight, resumed = killed_and_resumed("albef", tmp_path)
    assert resumed.history.losses == straight.history.losses  # momentum model, queues and alpha ramp resume too
    assert {"itc", "itm", "mlm", "alpha"} <= set(straight.history.records[-1])
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_pretrain_command_reads_image_text_shards(tmp_path):
    from course_lib.data import ShapeWorld
    from course_lib.data.shards import write_shards
    from course_lib.pretrain import parse_args, pretrain

    world = ShapeWorld(image_size=32)
    scenes = world.scenes(range(8))
    pixels = world.render_batch(scenes)
    shards = tmp_path / "shards"
    write_shards([{"__key__": f"{i:04d}", "jpg": pixels[i], "txt": s.description} for i, s in enumerate(scenes)],
                 shards, "train", max_count=4)
    result = pretrain(parse_args(["--model=albef", "--data=shards", f"--data_path={shards}", "--steps=2",
                                  "--global_batch=4", "--num_workers=0", f"--out_dir={tmp_path / 'run'}"]))
    assert all(torch.isfinite(torch.tensor(result.history.losses)))


def test_gpu_base_reports_parameters_and_flops():
    from course_lib.flops import model_flops_per_sample

    model = build_model("albef", "gpu-base")
    c = model.config
    assert (c.dim, c.image_layers, c.text_layers, c.fusion_layers, c.embed_dim) == (768, 12, 6, 6, 256)
    assert (c.queue_size, c.momentum, c.alpha, c.temperature, c.image_size, c.patch_size) == (65536, 0.995, 0.4, 0.07,
                                                                                              256, 16)
    # ViT-B/16 (86M) + BERT-base (110M) + 6 cross-attention blocks (14M): ALBEF's 210M trainable parameters
    assert 200e6 < model.num_parameters() < 225e6
    batch = {"images": torch.rand(2, 3, 256, 256), "input_ids": torch.randint(5, 1000, (2, 30)),
             "attention_mask": torch.ones(2, 30, dtype=torch.long)}
    with torch.no_grad():
        flops = model_flops_per_sample(model, batch)
    # ViT-B/16 at 256 px is 2 x 86M x 257 = 44 GFLOPs a pass, run by the model and its momentum twin; the
    # text passes (unimodal, fusion for 3B ITM pairs, MLM) add about 40 more; x 3 for a training step
    assert 300e9 < flops < 500e9


def test_claims_benchmark_runs_at_a_small_size(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "albef_claims.py"
    spec = importlib.util.spec_from_file_location("albef_claims", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        results = bench.main(["--small", "--seeds=1", f"--out={tmp_path / 'claims.json'}"])
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((tmp_path / "claims.json").read_text())
    assert saved["rows"] == results["rows"]
    assert {(r["setup"], r["noise"]) for r in saved["rows"]} == {("ALBEF", 0.0), ("no ITC", 0.0), ("no MoD", 0.0),
                                                                  ("ALBEF", 0.4), ("no MoD", 0.4)}
    # a run split over side-by-side processes (--part i/n), merged, is the same run
    for i in range(2):
        bench.main(["--small", "--seeds=1", f"--part={i}/2", f"--out={tmp_path / f'part{i}.json'}"])
    torch.set_num_threads(threads)
    merged = bench.main(["--merge", str(tmp_path / "part0.json"), str(tmp_path / "part1.json"),
                         f"--out={tmp_path / 'merged.json'}"])
    assert merged["rows"] == saved["rows"]
    with pytest.raises(ValueError, match="do not cover"):
        bench.merge([json.loads((tmp_path / "part0.json").read_text())], "")
    assert bench.verdict([0.5, 0.6], [0.1, 0.2]) == "held" and bench.verdict([0.1], [0.5]) == "reversed"
    assert "ITC before fusion" in bench.markdown(saved)


# ----------------------------------------------------------------------------- graded exercises


def test_checks_pass_the_solutions_and_name_the_mistakes(capsys):
    from course_lib.checks.albef import check_ema, check_soft_targets
    from course_lib.checks.verdict import ExerciseError

    check_ema(lambda pm, p, m: [m * a + (1 - m) * b for a, b in zip(pm, p)])
    check_soft_targets(lambda s, a: a * s.softmax(1) + (1 - a) * torch.eye(*s.shape))
    assert capsys.readouterr().out.count("PASS") == 2
    with pytest.raises(ExerciseError, match="m weighs the momentum model"):
        check_ema(lambda pm, p, m: [m * b + (1 - m) * a for a, b in zip(pm, p)])
    with pytest.raises(ExerciseError, match="dim=1"):
        check_soft_targets(lambda s, a: a * s.softmax(0) + (1 - a) * torch.eye(*s.shape))
    with pytest.raises(ExerciseError, match="alpha weighs"):
        check_soft_targets(lambda s, a: (1 - a) * s.softmax(1) + a * torch.eye(*s.shape))
    with pytest.raises(ExerciseError, match="not yet|fill in"):
        check_ema(lambda pm, p, m: None)
