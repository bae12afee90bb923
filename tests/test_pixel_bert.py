"""Pixel-BERT: the CNN trained end to end, random pixel sampling in the pretraining step only, the
semantic embedding, MLM + ITM, the shared evaluation, bad input, the pretraining command (ShapeWorld and
image-text shards, exact resume), gpu-base's size and FLOPs, the checks of notebook 21 and the benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from course_lib.data import ShapeWorld, WorldConfig
from course_lib.data.datasets import build_tokenizer
from course_lib.data.regions import ShapeWorldRegions
from course_lib.models.registry import build_model
from pretrain_helpers import killed_and_resumed

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def source():
    world = ShapeWorld(WorldConfig(min_objects=1, max_objects=2))  # notebook 10's world, 32 px
    tokenizer = build_tokenizer(world, vocab_size=128, num_scenes=200)
    return ShapeWorldRegions(world, tokenizer, context_length=20, max_regions=4)


@pytest.fixture(scope="module")
def batch(source):
    return source(list(range(8)))


def tiny(**overrides):
    torch.manual_seed(0)
    return build_model("pixel_bert", "cpu-tiny", vocab_size=128, context_length=20, layers=1, **overrides)


def recording_fusion(model, seen: list):
    original = model.fusion.forward

    def record(text, text_mask, image, image_mask, return_attention=False):
        seen.append(image)
        return original(text, text_mask, image, image_mask, return_attention)
    model.fusion.forward = record


# ----------------------------------------------------------------------------- pixels and sampling


def test_sampling_happens_in_the_pretraining_step_only(batch):
    model = tiny()
    c = model.config
    assert (c.image_size, c.stride, c.grid, c.cells, c.num_samples) == (32, 2, 16, 256, 100)
    seen = []
    recording_fusion(model, seen)
    model.train()(batch)
    model.eval()(batch)  # a validation loss is the pretraining step's: sampled too
    assert [s.shape[1] for s in seen] == [100, 100]
    seen.clear()
    model.train().encode(batch)  # fine-tuning reads every cell
    model.eval().match_scores(batch)
    assert [s.shape[1] for s in seen] == [256, 256]
    seen.clear()
    tiny(num_samples=0)(batch)  # the ablation: every cell in pretraining too
    assert seen == [] and tiny(num_samples=0).sampler is None


def test_sampled_tokens_are_the_grid_tokens_at_fresh_random_cells(batch):
    model = tiny().eval()
    full, cells = model.pixel_tokens(batch["images"])
    assert full.shape == (8, 256, 64) and torch.equal(cells[3], torch.arange(256))
    torch.manual_seed(1)
    picked, indices = model.pixel_tokens(batch["images"], sample=True)
    assert picked.shape == (8, 100, 64) and indices.shape == (8, 100)
    assert (indices[:, 1:] > indices[:, :-1]).all()  # distinct and sorted
    torch.testing.assert_close(picked, full.gather(1, indices[..., None].expand(8, 100, 64)), rtol=0, atol=1e-6)
    assert len({tuple(row.tolist()) for row in indices}) == 8  # each image its own draw
    _, again = model.pixel_tokens(batch["images"], sample=True)
    assert not torch.equal(again, indices)  # a fresh draw at every step


def test_visual_embedding_is_projected_cells_plus_the_semantic_embedding(batch):
    """A pixel token enters BERT as LN(GridFeatures(cell) + s_v), s_v the fusion's image type vector."""
    model = tiny().eval()
    tokens, _ = model.pixel_tokens(batch["images"])
    words = model.word_embeddings(batch["input_ids"])
    merged = model.fusion.embed(words, tokens)
    L = batch["input_ids"].shape[1]
    expected = model.fusion.embed_norm(tokens + model.fusion.type_embeddings.weight[1])
    torch.testing.assert_close(merged[:, L:], expected)
    images = batch["images"].float() / 255
    torch.testing.assert_close(model.pixel_tokens(images)[0], tokens)  # uint8 or float in [0, 1]: the same


def test_forward_gives_mlm_and_itm_and_trains_the_cnn_end_to_end(batch):
    model = tiny()
    out = model(batch)
    assert set(out) == {"loss", "mlm", "itm"} and all(torch.isfinite(v) for v in out.values())
    torch.testing.assert_close(out["loss"], out["mlm"] + out["itm"])
    for name in ("mlm", "itm"):  # each loss alone reaches the first convolution
        model.zero_grad()
        torch.manual_seed(0)
        model(batch)[name].backward()
        grad = model.pixels.backbone.layers[0][0].weight.grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert set(tiny(itm_weight=0.0)(batch)) == {"loss", "mlm"}
    assert set(tiny(mlm_weight=0.0)(batch)) == {"loss", "itm"}


def test_itm_negatives_get_another_rows_image_and_mlm_scores_matched_pairs(batch, monkeypatch):
    import course_lib.models.pixel_bert as pixel_bert
    import course_lib.models.region_bert as region_bert

    seen = {}
    original_swap, original_mask = region_bert.swap_images, pixel_bert.mask_caption

    def recording_swap(b, swapped, generator=None):
        out = original_swap(b, swapped, generator)
        seen.update(swapped=swapped, images=out["images"])
        return out

    def recording_mask(ids, mask, rows, vocab, prob):
        masked, labels = original_mask(ids, mask, rows, vocab, prob)
        seen.update(rows=rows, labels=labels)
        return masked, labels

    monkeypatch.setattr(region_bert, "swap_images", recording_swap)  # what itm_negatives calls
    monkeypatch.setattr(pixel_bert, "mask_caption", recording_mask)
    tiny()(batch)
    swapped = seen["swapped"]
    assert swapped.any() and (~swapped).any()
    same = (seen["images"] == batch["images"]).flatten(1).all(1)
    assert torch.equal(same, ~swapped)  # a negative's image is another image of the batch
    assert torch.equal(seen["rows"], ~swapped)
    assert (seen["labels"][swapped] == -100).all()


def test_plugs_into_the_shared_evaluation(source, batch):
    from course_lib.data.language import answer_vocabulary
    from course_lib.evaluate import VQAFineTuner, fused_retrieval
    from course_lib.evaluate.region_tasks import itm_finetune_loss

    model = tiny().eval()
    recall = fused_retrieval(model, {k: v[:5] for k, v in batch.items()}, (1,))
    assert 0.0 <= recall["mean_recall"] <= 1.0
    tuner = VQAFineTuner(model, len(answer_vocabulary(source.world.config)))
    tuner(source.questions(range(3)))["loss"].backward()
    assert model.pixels.backbone.layers[0][0].weight.grad is not None
    assert torch.isfinite(itm_finetune_loss(model, batch)["loss"])


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("change, message", [
    (lambda b: b.pop("images"), r"missing \['images'\]"),
    (lambda b: b.update(images=b["images"][:, :, :16, :16]), "images are 16 x 16 pixels; the model's image_size is 32"),
    (lambda b: b.update(images=b["images"][:, :1]), "images must have shape"),
    (lambda b: b.update(images=b["images"].float().fill_(float("nan"))), "NaN"),
    (lambda b: b.update(images=b["images"].long()), "uint8 or float"),
    (lambda b: b.update(input_ids=b["input_ids"][:, :3].clone().fill_(2)), "attention_mask must have shape"),
    (lambda b: b.update(input_ids=b["input_ids"] + 1000), "vocab_size"),
    (lambda b: b.update(attention_mask=torch.zeros_like(b["attention_mask"])), "caption 0 of input_ids is empty"),
    (lambda b: b.update(input_ids=torch.cat([b["input_ids"]] * 2, 1),
                        attention_mask=torch.cat([b["attention_mask"]] * 2, 1)), "context_length"),
])
def test_bad_batches_name_the_key(batch, change, message):
    bad = dict(batch)
    change(bad)
    with pytest.raises(ValueError, match=message):
        tiny()(bad)


def test_bad_configs_name_the_option(batch):
    with pytest.raises(ValueError, match="num_samples=300 is more than the 256 cells"):
        tiny(num_samples=300)
    with pytest.raises(ValueError, match="multiple of the CNN stride 2"):
        tiny(image_size=33)
    with pytest.raises(ValueError, match="nothing would be learned"):
        tiny(mlm_weight=0.0, itm_weight=0.0)
    with pytest.raises(ValueError, match="cnn_channels must be"):
        tiny(cnn_channels=())
    with pytest.raises(ValueError, match="unknown option 'samples'"):
        tiny(samples=10)
    with pytest.raises(ValueError, match="at least 2"):
        tiny()({k: v[:1] for k, v in batch.items()})
    with pytest.raises(ValueError, match="batch must be a dict"):
        tiny()([1, 2])


# ----------------------------------------------------------------------------- at scale


def test_pretrain_command_resumes_pixel_bert_exactly(tmp_path):
    straight, resumed = killed_and_resumed("pixel_bert", tmp_path, "--model.layers=1")
    assert resumed.history.losses == straight.history.losses  # masking, ITM and pixel draws resume too
    assert {"mlm", "itm"} <= set(straight.history.records[-1])


def test_pretrain_command_reads_image_text_shards(tmp_path):
    from course_lib.data.shards import write_shards
    from course_lib.pretrain import parse_args, pretrain

    world = ShapeWorld(image_size=48)  # the shards hold 48-px images; the reader resizes them to 32
    scenes = world.scenes(range(16))
    pixels = world.render_batch(scenes)
    write_shards([{"__key__": f"{i:04d}", "jpg": pixels[i], "txt": s.description} for i, s in enumerate(scenes)],
                 tmp_path / "shards", "train", max_count=8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = pretrain(parse_args(["--model=pixel_bert", "--data=shards", f"--data_path={tmp_path / 'shards'}",
                                      "--steps=2", "--global_batch=8", "--num_workers=0", "--log_every=1",
                                      "--model.layers=1", f"--out_dir={tmp_path / 'run'}"]))
    finally:
        torch.set_num_threads(threads)
    assert len(result.history.losses) == 2 and all(torch.isfinite(torch.tensor(result.history.losses)))


def test_pretrain_counts_the_sampled_training_forward():
    """The FLOPs course_lib.pretrain reports (counted in eval mode) are the sampled pretraining step's."""
    from course_lib.data.onthefly import SyntheticPairs
    from course_lib.flops import model_flops_per_sample

    batch = SyntheticPairs(32, 20, 128)(list(range(2)))
    batch["images"] = batch["images"].float() / 255
    sampled = model_flops_per_sample(tiny(), batch)
    every = model_flops_per_sample(tiny(num_samples=0), batch)
    assert sampled < every
    model = tiny()
    assert model.training and model_flops_per_sample(model, batch) == sampled and model.training


def test_gpu_base_reports_parameters_and_flops():
    from course_lib.features.text import CLS_ID, SEP_ID
    from course_lib.flops import model_flops_per_sample

    model = build_model("pixel_bert", "gpu-base")
    c = model.config
    assert (c.dim, c.layers, c.heads, c.vocab_size, c.num_samples) == (768, 12, 12, 30522, 100)
    assert (c.image_size, c.stride, c.cells) == (512, 32, 256)  # ResNet-50's stride: a 16 x 16 map
    cnn = sum(p.numel() for p in model.pixels.backbone.parameters())
    assert 15e6 < cnn < 25e6  # about ResNet-50's trunk (23.5M)
    total = sum(p.numel() for p in model.parameters())
    assert 100e6 < total < 135e6  # BERT-base (110M) + the CNN
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, c.vocab_size, (2, c.context_length), generator=g)
    ids[:, 0], ids[:, -1] = CLS_ID, SEP_ID
    batch = {"images": torch.rand(2, 3, c.image_size, c.image_size, generator=g), "input_ids": ids,
             "attention_mask": torch.ones(2, c.context_length, dtype=torch.long)}
    with torch.no_grad():
        flops = model_flops_per_sample(model, batch)  # 3 x the sampled (train-time) forward
    layers = sum(p.numel() for n, p in model.named_parameters() if "fusion.encoder.layers." in n)
    bert = 6 * layers * (c.context_length + c.num_samples)
    assert 30e9 < flops - bert < 150e9  # the CNN at 512 px: ~17 G multiply-adds forward, x 3 x 2


# ----------------------------------------------------------------------------- checks and benchmark


def test_checks_pass_on_solutions_and_fail_on_wrong_answers():
    from course_lib.checks.pixel_bert import check_layer_flops, check_sample_pixels
    from course_lib.checks.verdict import ExerciseError

    def sample(tokens, k, generator):
        noise = torch.rand(tokens.shape[:2], generator=generator)
        indices = noise.argsort(1)[:, :k].sort(1).values
        return tokens.gather(1, indices[..., None].expand(-1, -1, tokens.shape[2])), indices

    check_sample_pixels(sample)

    def same_cells(tokens, k, generator):
        indices = torch.randperm(tokens.shape[1], generator=generator)[:k].sort().values.expand(tokens.shape[0], k)
        return tokens.gather(1, indices[..., None].expand(-1, -1, tokens.shape[2])), indices

    def unsorted(tokens, k, generator):
        indices = torch.rand(tokens.shape[:2], generator=generator).argsort(1)[:, :k]
        return tokens.gather(1, indices[..., None].expand(-1, -1, tokens.shape[2])), indices

    def with_replacement(tokens, k, generator):
        indices = torch.randint(tokens.shape[1], (tokens.shape[0], k), generator=generator).sort(1).values
        return tokens.gather(1, indices[..., None].expand(-1, -1, tokens.shape[2])), indices

    for wrong, message in ((same_cells, "same cells"), (unsorted, "sorted"), (with_replacement, "same cell twice"),
                           (lambda t, k, g: (t[:, :k], torch.arange(k).expand(t.shape[0], k)), "same cells")):
        with pytest.raises(ExerciseError, match=message):
            check_sample_pixels(wrong)
    with pytest.raises(ExerciseError, match="not yet|NotImplementedError"):
        check_sample_pixels(lambda t, k, g: (_ for _ in ()).throw(NotImplementedError("draw")))

    check_layer_flops(lambda n, d, r: 2 * n * (4 + 2 * r) * d * d + 4 * n * n * d)
    with pytest.raises(ExerciseError, match="projections and the MLP only"):
        check_layer_flops(lambda n, d, r: 2 * n * (4 + 2 * r) * d * d)
    with pytest.raises(ExerciseError, match="half the FLOPs"):
        check_layer_flops(lambda n, d, r: n * (4 + 2 * r) * d * d + 2 * n * n * d)


def test_sampling_benchmark_runs_at_a_small_size(tmp_path, capsys):
    import importlib.util

    path = ROOT / "benchmarks" / "pixel_bert_sampling.py"
    spec = importlib.util.spec_from_file_location("pixel_bert_sampling", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        results = bench.main(["--small", "--seeds=1", "--lines=sampled,visualbert", f"--out={tmp_path / 'p.json'}"])
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["rows"] == results["rows"] and [r["line"] for r in saved["rows"]] == ["sampled", "visualbert"]
    sampled, visualbert = saved["rows"]
    assert sampled["scores"]["grounding"] == [None] and 0 <= visualbert["scores"]["grounding"][0] <= 1
    assert len(sampled["seconds_per_step"]) == 1 and sampled["seconds_per_step"][0] > 0
    printed = capsys.readouterr().out
    assert "| Pixel-BERT, 100 of 256 cells sampled (the paper) |" in printed
    assert "reproduce: python benchmarks/pixel_bert_sampling.py --small" in printed
    committed = json.loads((path.parent / "results" / "pixel_bert_sampling.json").read_text())
    assert [r["line"] for r in committed["rows"]] == list(bench.LINES)  # the full table is committed
    assert all(len(r["scores"]["VQA"]) >= 3 for r in committed["rows"])  # >= 3 seeds a line
