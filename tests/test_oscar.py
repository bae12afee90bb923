"""Oscar: the (words, tags, regions) triple, tags from the detector, MLM over words and tags, the
contrastive loss with polluted tags, the no-tags switch, bad input, and the pretraining command."""

from __future__ import annotations

import pytest
import torch

from course_lib.data import ShapeWorld, WorldConfig
from course_lib.data.datasets import build_tokenizer
from course_lib.data.regions import ShapeWorldRegions
from course_lib.data.simulated_detector import DetectorConfig
from course_lib.features.tags import ObjectTags, read_class_names
from course_lib.features.text import CLS_ID, MASK_ID, PAD_ID, SEP_ID, pack_pair
from course_lib.models.registry import build_model
from course_lib.objectives.polluted import pollute
from pretrain_helpers import assert_flops_near_6nt, gpu_region_batch, killed_and_resumed

TAGS = 12


@pytest.fixture(scope="module")
def source():
    world = ShapeWorld(WorldConfig(min_objects=1, max_objects=3))
    tokenizer = build_tokenizer(world, vocab_size=128, num_scenes=200)
    return ShapeWorldRegions(world, tokenizer, context_length=24, tag_tokens=TAGS)


@pytest.fixture(scope="module")
def batch(source):
    return source(list(range(16)))


def tiny(**overrides):
    torch.manual_seed(0)
    return build_model("oscar", "cpu-tiny", vocab_size=128, **{"max_tag_tokens": TAGS, **overrides})


# ----------------------------------------------------------------------------- tags from the detector


def test_tags_are_the_detectors_class_names(source, batch):
    tokenizer, names = source.tokenizer, [source.world.config.class_name(c) for c in range(source.num_classes)]
    for row in range(16):
        labels = batch["region_labels"][row][batch["region_mask"][row] & (batch["region_labels"][row] >= 0)]
        expected = " ".join(names[c] for c in labels.tolist()).split()  # ShapeWorld's names are whole words
        tokens = tokenizer.convert_ids_to_tokens(batch["tag_ids"][row][batch["tag_mask"][row].bool()])
        assert tokens == expected[:TAGS - 1] + ["[SEP]"]  # cut to TAGS tokens, the [SEP] kept
    assert batch["tag_ids"].shape == (16, TAGS) and (batch["tag_ids"][batch["tag_mask"] == 0] == PAD_ID).all()


def test_tags_carry_the_detectors_errors(source):
    """A less confident detector names some objects wrongly; the tags follow its labels, not the truth."""
    noisy = ShapeWorldRegions(source.world, source.tokenizer, 24, tag_tokens=TAGS,
                              detector=DetectorConfig(confidence=0.5, confusion=2.0))
    clean_batch, noisy_batch = source(list(range(64))), noisy(list(range(64)))
    torch.testing.assert_close(noisy_batch["region_boxes"], clean_batch["region_boxes"])  # same boxes...
    assert not torch.equal(noisy_batch["region_labels"], clean_batch["region_labels"])  # ...other names
    assert not torch.equal(noisy_batch["tag_ids"], clean_batch["tag_ids"])
    redone = ObjectTags(source.tokenizer, [source.world.config.class_name(c) for c in range(18)], TAGS)(
        noisy_batch["region_labels"], noisy_batch["region_mask"])
    assert torch.equal(redone["tag_ids"], noisy_batch["tag_ids"])


def test_object_tags_from_a_class_name_file(source, tmp_path):
    path = tmp_path / "objects_vocab.txt"
    path.write_text("red circle,red disc\nblue square\ngreen triangle\n")
    names = read_class_names(path)
    assert names == ["red circle", "blue square", "green triangle"]
    tags = ObjectTags(source.tokenizer, names, max_tokens=4)
    out = tags(torch.tensor([[2, 0, -1], [-1, -1, -1]]), torch.tensor([[True, True, False], [True, False, False]]))
    first = source.tokenizer.convert_ids_to_tokens(out["tag_ids"][0])
    assert first == ["green", "triangle", "red", "[SEP]"]  # cut to max_tokens, [SEP] kept
    assert out["tag_ids"][1].tolist() == [SEP_ID, PAD_ID, PAD_ID, PAD_ID]  # no labelled region: [SEP] alone
    assert out["tag_mask"].tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]
    with pytest.raises(ValueError, match="class names"):
        tags(torch.tensor([[5]]), torch.tensor([[True]]))
    with pytest.raises(FileNotFoundError, match="tag_names"):
        read_class_names(tmp_path / "missing.txt")


# ----------------------------------------------------------------------------- the triple


def test_triple_layout_and_segments(batch):
    model = tiny()
    ids, mask, segments = model.text_sequence(batch)
    L = batch["input_ids"].shape[1]
    assert ids.shape == mask.shape == segments.shape == (16, L + TAGS)
    for row in range(16):
        n_words = int(batch["attention_mask"][row].sum())
        n_tags = int(batch["tag_mask"][row].sum())
        caption = batch["input_ids"][row, :n_words]
        tags = batch["tag_ids"][row, :n_tags]
        assert torch.equal(ids[row, :n_words], caption)  # [CLS] words [SEP] keep their columns
        assert torch.equal(ids[row, n_words:n_words + n_tags], tags)  # tags [SEP] right after
        assert (ids[row, n_words + n_tags:] == PAD_ID).all() and mask[row].sum() == n_words + n_tags
        assert ids[row, 0] == CLS_ID and ids[row, n_words - 1] == SEP_ID and ids[row, n_words + n_tags - 1] == SEP_ID
        assert segments[row, :n_words].eq(0).all() and segments[row, n_words:n_words + n_tags].eq(1).all()
    out = model.eval().encode(batch)
    assert out.text.shape == (16, L + TAGS, model.config.dim) and out.image.shape[1] == batch["region_feats"].shape[1]
    no_tags = tiny(use_tags=False)
    assert no_tags.text_sequence(batch)[0].shape == (16, L) and no_tags.eval().encode(batch).text.shape[1] == L


def test_pack_pair_is_the_tokenizers_pair_layout(source):
    tok = source.tokenizer
    a = tok(["a red circle", "a small blue square and a green triangle"], padding="max_length", max_length=12,
            return_tensors="pt")
    b = tok(["red circle", "blue square"], padding="max_length", max_length=5, add_special_tokens=False,
            return_tensors="pt")
    b_ids = torch.cat([b["input_ids"], torch.zeros(2, 1, dtype=torch.long)], 1)
    b_mask = torch.cat([b["attention_mask"], torch.zeros(2, 1, dtype=torch.long)], 1)
    for row in range(2):  # append [SEP] after each row's last real piece
        n = int(b_mask[row].sum())
        b_ids[row, n], b_mask[row, n] = SEP_ID, 1
    ids, mask, types = pack_pair(a["input_ids"], a["attention_mask"], b_ids, b_mask)
    reference = tok(["a red circle", "a small blue square and a green triangle"], ["red circle", "blue square"],
                    padding="max_length", max_length=18, return_tensors="pt")
    assert torch.equal(ids, reference["input_ids"]) and torch.equal(mask, reference["attention_mask"])
    assert torch.equal(types, reference["token_type_ids"])


def test_tags_share_the_word_embeddings_and_get_segment_b(batch):
    model = tiny().eval()
    ids, _, segments = model.text_sequence(batch)
    text, _, _ = model.embed(batch, ids, segments)
    word = model.word_embeddings.weight
    torch.testing.assert_close(text[segments == 0], word[ids[segments == 0]])
    torch.testing.assert_close(text[segments == 1], word[ids[segments == 1]] + model.tag_segment.weight[0])


# ----------------------------------------------------------------------------- objectives


def test_forward_gives_mlm_and_contrastive_and_trains(batch):
    model = tiny()
    out = model(batch)
    assert set(out) == {"loss", "mlm", "contrastive"}
    assert all(torch.isfinite(v) for v in out.values())
    torch.testing.assert_close(out["loss"], out["mlm"] + out["contrastive"])
    out["loss"].backward()
    assert model.tag_segment.weight.grad is not None and model.itm_head.weight.grad is not None
    assert model.match_scores(batch).shape == (16,)
    assert set(tiny(use_tags=False)(batch)) == {"loss", "mlm", "contrastive"}
    assert set(tiny(itm_weight=1.0, contrastive_weight=0.0)(batch)) == {"loss", "mlm", "itm"}


def test_pollution_rate_and_labels(batch):
    """Half of the rows get another row's tags (Oscar's 0.5); a row is polluted iff its tags changed."""
    torch.manual_seed(0)
    big = {k: v.repeat(64, *[1] * (v.dim() - 1)) for k, v in batch.items()}  # 1024 rows
    polluted, matched, source = pollute(big, ("tag_ids", "tag_mask"), 0.5)
    replaced = source != torch.arange(1024)
    assert 0.45 < replaced.float().mean() < 0.55
    changed = (polluted["tag_ids"] != big["tag_ids"]).any(1)
    assert torch.equal(matched, ~changed)
    assert torch.equal(polluted["tag_ids"], big["tag_ids"][source])
    assert torch.equal(polluted["region_feats"], big["region_feats"])  # only the tags are polluted
    assert not replaced[0] and replaced[-1]


def test_contrastive_loss_is_the_head_on_polluted_triples(batch, monkeypatch):
    """The loss equals a cross-entropy of the [CLS] head on the triples with the drawn tags."""
    import course_lib.models.oscar as oscar

    model = tiny(mlm_weight=0.0).eval()
    seen = {}

    def recording_pollute(b, keys, prob):
        out = pollute(b, keys, prob)
        seen.update(batch=out[0], matched=out[1], keys=tuple(keys), prob=prob)
        return out

    monkeypatch.setattr(oscar, "pollute", recording_pollute)
    loss = model(batch)["contrastive"]
    assert seen["keys"] == ("tag_ids", "tag_mask") and seen["prob"] == 0.5
    logits = model.itm_logits(seen["batch"])
    expected = torch.nn.functional.cross_entropy(logits, seen["matched"].long())
    torch.testing.assert_close(loss, expected)
    model_no_tags = tiny(use_tags=False, mlm_weight=0.0)
    model_no_tags(batch)
    assert "region_feats" in seen["keys"]  # without tags, the regions are polluted (ITM)


def test_mlm_masks_tags_too(batch, monkeypatch):
    import course_lib.models.oscar as oscar

    seen = {}
    original = oscar.mask_caption

    def recording_mask(ids, mask, rows, vocab, prob):
        masked, labels = original(ids, mask, rows, vocab, prob)
        seen.update(ids=ids, masked=masked, labels=labels, rows=rows)
        return masked, labels

    monkeypatch.setattr(oscar, "mask_caption", recording_mask)
    model = tiny(mask_prob=0.5)
    model(batch)
    _, _, segments = model.text_sequence(dict(batch))  # segments do not depend on the draw
    chosen = seen["labels"] != -100
    assert (chosen & (segments == 1)).any() and (chosen & (segments == 0)).any()  # words and tags
    assert ((seen["masked"] == MASK_ID) & (segments == 1)).any()
    assert not torch.isin(seen["ids"][chosen], torch.tensor([PAD_ID, CLS_ID, SEP_ID])).any()
    assert seen["rows"].all()  # Oscar scores MLM on polluted triples too (mask_loss_for_unmatched)
    tiny(use_tags=False, mask_prob=0.5)(batch)
    assert not seen["rows"].all()  # without tags the regions are swapped: matched pairs only


def test_retrieval_finetuning_swaps_tags_with_their_image(batch):
    from course_lib.models.region_bert import swap_images

    swapped = torch.zeros(16, dtype=torch.bool)
    swapped[3] = True
    out = swap_images(batch, swapped, torch.Generator().manual_seed(0))
    source = int((out["region_feats"][3] == batch["region_feats"]).flatten(1).all(1).nonzero()[0])
    assert torch.equal(out["tag_ids"][3], batch["tag_ids"][source])  # the tags go with their regions
    assert torch.equal(out["input_ids"], batch["input_ids"])


def test_plugs_into_the_shared_evaluation(source, batch):
    from course_lib.data.language import answer_vocabulary
    from course_lib.evaluate import VQAFineTuner, fused_retrieval

    model = tiny().eval()
    recall = fused_retrieval(model, {k: v[:6] for k, v in batch.items()}, (1,))
    assert 0.0 <= recall["mean_recall"] <= 1.0
    questions = source.questions(range(4))  # the questions carry their image's tags
    assert questions["tag_ids"].shape == (len(questions["answers"]), TAGS)
    tuner = VQAFineTuner(model, len(answer_vocabulary(source.world.config)))
    tuner(questions)["loss"].backward()
    assert model.tag_segment.weight.grad is not None


def test_region_shard_batches_get_tags_from_class_names(source):
    from course_lib.data.region_shards import RegionBatches

    boxes = torch.tensor([[0.1, 0.1, 0.5, 0.5]] * 3)
    samples = [{"feats": torch.randn(3, 8), "boxes": boxes, "labels": torch.tensor([1, 0, -1]), "text": "a blue square",
                "key": "a"},
               {"feats": torch.randn(2, 8), "boxes": boxes[:2], "labels": torch.tensor([-1, -1]),
                "text": "a red circle", "key": "b"}]
    collate = RegionBatches(source.tokenizer, 16, max_regions=4, tag_names=["red circle", "blue square"], tag_tokens=6)
    out = collate(samples)
    assert source.tokenizer.convert_ids_to_tokens(out["tag_ids"][0]) == ["blue", "square", "red", "circle", "[SEP]",
                                                                          "[PAD]"]
    assert out["tag_ids"][1].tolist()[:2] == [SEP_ID, PAD_ID]  # no labelled region: [SEP] alone
    assert "tag_ids" not in RegionBatches(source.tokenizer, 16, max_regions=4)(samples)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("change, message", [
    (lambda b: b.pop("tag_ids"), "missing \\['tag_ids'\\]"),
    (lambda b: b.update(tag_ids=b["tag_ids"][:3]), "tag_ids must have shape"),
    (lambda b: b.update(tag_mask=b["tag_mask"][:, :4]), "tag_mask must have the shape"),
    (lambda b: b.update(tag_ids=torch.cat([b["tag_ids"], b["tag_ids"]], 1),
                        tag_mask=torch.cat([b["tag_mask"], b["tag_mask"]], 1)), "max_tag_tokens"),
    (lambda b: b.update(tag_ids=b["tag_ids"] + 1000), "vocab_size"),
    (lambda b: b.update(tag_mask=torch.zeros_like(b["tag_mask"])), "tag_mask row 0 is empty"),
    (lambda b: b.update(tag_ids=b["tag_ids"].float()), "integer token ids"),
    (lambda b: b.pop("region_feats"), "missing"),
])
def test_bad_batches_name_the_key(batch, change, message):
    bad = dict(batch)
    change(bad)
    with pytest.raises(ValueError, match=message):
        tiny()(bad)


def test_bad_configs_name_the_option(batch):
    with pytest.raises(ValueError, match="pollute_prob"):
        tiny(pollute_prob=1.0)
    with pytest.raises(ValueError, match="no region objective"):
        tiny(mrc_weight=1.0)
    with pytest.raises(ValueError, match="both > 0"):
        tiny(itm_weight=1.0)
    with pytest.raises(ValueError, match="nothing would be learned"):
        tiny(mlm_weight=0.0, contrastive_weight=0.0)
    with pytest.raises(ValueError, match="unknown option 'tags'"):
        tiny(tags=False)
    with pytest.raises(ValueError, match="at least 2"):
        tiny()({k: v[:1] for k, v in batch.items()})
    with pytest.raises(ValueError, match="hides no region"):
        tiny().encode(batch, hidden_regions=torch.zeros_like(batch["region_mask"]))
    with pytest.raises(ValueError, match="tag_tokens"):
        ShapeWorldRegions(ShapeWorld(WorldConfig()), None, 24, tag_tokens=1)


# ----------------------------------------------------------------------------- at scale


def test_pretrain_command_resumes_oscar_exactly(tmp_path):
    straight, resumed = killed_and_resumed("oscar", tmp_path)
    assert resumed.history.losses == straight.history.losses  # masking and pollution draws resume too
    assert {"mlm", "contrastive"} <= set(straight.history.records[-1])


def test_pretrain_on_region_shards_needs_tag_names():
    from course_lib.pretrain import _tag_names
    from course_lib.models.registry import build_config

    with pytest.raises(ValueError, match="tag_names_file"):
        _tag_names(build_config("oscar"))


def test_gpu_base_reports_parameters_and_flops():
    model = build_model("oscar", "gpu-base")
    c = model.config
    assert c.dim == 768 and c.layers == 12 and c.region_feat_dim == 2048 and c.max_tag_tokens == 32
    assert 100e6 < sum(p.numel() for p in model.parameters()) < 130e6  # BERT-base + the region embedding
    batch = gpu_region_batch(c)
    batch["tag_ids"] = torch.randint(5, c.vocab_size, (2, c.max_tag_tokens), generator=torch.Generator().manual_seed(1))
    batch["tag_mask"] = torch.ones(2, c.max_tag_tokens, dtype=torch.long)
    assert_flops_near_6nt(model, batch, c.context_length + c.max_tag_tokens + 36)
