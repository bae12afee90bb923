"""Unified VLP (course_lib.models.unified_vlp): the two self-attention masks against hand-built
matrices, what the seq2seq mask hides (later words, and the caption from the image), the segment
ids, the caption-only masking rule, left-to-right [MASK] decoding, the VQA input, the pretraining
command, and bad input. Seconds, on one thread."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from course_lib.data import ShapeWorld, WorldConfig
from course_lib.data.datasets import build_tokenizer
from course_lib.data.language import answer_vocabulary
from course_lib.data.regions import ShapeWorldRegions
from course_lib.evaluate import VQAFineTuner
from course_lib.features.text import CLS_ID, MASK_ID, PAD_ID, SEP_ID
from course_lib.fusion.attention_masks import bidirectional_mask, seq2seq_mask, unified_mask
from course_lib.models.registry import build_model
from course_lib.models.unified_vlp import UnifiedVLP, UnifiedVLPConfig, decode_captions
from course_lib.nn import MultiHeadAttention
from course_lib.objectives.mlm import IGNORE_INDEX, mask_target_tokens
from pretrain_helpers import assert_flops_near_6nt, gpu_region_batch, killed_and_resumed

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def source():
    world = ShapeWorld(WorldConfig(min_objects=1, max_objects=3))
    tokenizer = build_tokenizer(world, vocab_size=128, num_scenes=200)
    return ShapeWorldRegions(world, tokenizer, context_length=24, max_regions=5)


@pytest.fixture(scope="module")
def batch(source):
    return source(list(range(6)))


def tiny(**overrides):
    torch.manual_seed(0)
    options = dict(vocab_size=128, context_length=24, max_regions=5)
    options.update(overrides)
    return build_model("unified_vlp", "cpu-tiny", **options).eval()


# --------------------------------------------------------------------------- the two masks


def test_masks_match_hand_built_matrices():
    # Sample 0: [CLS] r1 r2(padding) [SEP] | w1 w2 [SEP] [PAD]; sample 1: no padding. Source = 4 positions.
    key_valid = torch.tensor([[1, 1, 0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    v0 = [1, 1, 0, 1, 1, 1, 1, 0]
    expected_bi0 = torch.tensor([v0] * 8, dtype=torch.bool)
    expected_s2s0 = torch.tensor([
        # keys: CLS r1 r2 SEP w1 w2 SEP PAD
        [1, 1, 0, 1, 0, 0, 0, 0],  # [CLS]: the source only
        [1, 1, 0, 1, 0, 0, 0, 0],  # r1
        [1, 1, 0, 1, 0, 0, 0, 0],  # r2 (padding query: its output is never used)
        [1, 1, 0, 1, 0, 0, 0, 0],  # [SEP]
        [1, 1, 0, 1, 1, 0, 0, 0],  # w1: the source and itself
        [1, 1, 0, 1, 1, 1, 0, 0],  # w2
        [1, 1, 0, 1, 1, 1, 1, 0],  # final [SEP]
        [1, 1, 0, 1, 1, 1, 1, 0],  # [PAD] (never sees another padding key)
    ], dtype=torch.bool)
    expected_s2s1 = torch.tensor([
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(bidirectional_mask(key_valid)[0], expected_bi0)
    s2s = seq2seq_mask(key_valid, 4)
    assert torch.equal(s2s[0], expected_s2s0) and torch.equal(s2s[1], expected_s2s1)
    mixed = unified_mask(key_valid, 4, torch.tensor([False, True]))
    assert torch.equal(mixed[0], expected_bi0) and torch.equal(mixed[1], expected_s2s1)
    assert torch.equal(seq2seq_mask(key_valid, torch.tensor([4, 4])), s2s)  # per-sample source lengths


def test_model_builds_the_masks_for_its_layout(batch):
    model = tiny()
    out = model.encode(batch, mode=torch.tensor([True, False, True, False, True, False]))
    mask = out.extras["attn_mask"]  # (B, N, N), N = 1 + R + 1 + (L - 1)
    B, R, L = 6, batch["region_feats"].shape[1], batch["input_ids"].shape[1]
    assert mask.shape == (B, R + L + 1, R + L + 1)
    key_valid = torch.cat([torch.ones(B, 1, dtype=torch.bool), batch["region_mask"], torch.ones(B, 1, dtype=torch.bool),
                           batch["attention_mask"][:, 1:].bool()], dim=1)
    for b in range(B):
        source = R + 2
        expected = torch.zeros(R + L + 1, R + L + 1, dtype=torch.bool)
        if b % 2 == 0:  # seq2seq, by hand
            for i in range(R + L + 1):
                for j in range(R + L + 1):
                    expected[i, j] = bool(key_valid[b, j]) and (j < source or (i >= source and j <= i))
        else:
            expected[:] = key_valid[b]
        assert torch.equal(mask[b], expected), b


def test_seq2seq_hides_later_words_and_the_caption_from_the_image(batch):
    model = tiny()
    ids = batch["input_ids"].clone()
    lengths = batch["attention_mask"].sum(1)
    t = 3  # change every caption token after position t (the final [SEP] stays)
    changed = ids.clone()
    for b in range(len(ids)):
        for k in range(t + 1, int(lengths[b]) - 1):
            changed[b, k] = 5 + (int(ids[b, k]) + 7) % 100
    assert not torch.equal(changed, ids)
    before, after = model.encode(batch, ids, mode="s2s"), model.encode(batch, changed, mode="s2s")
    torch.testing.assert_close(after.text[:, :t + 1], before.text[:, :t + 1])  # words up to t do not see the change
    torch.testing.assert_close(after.image, before.image)  # the image never sees the caption
    torch.testing.assert_close(after.pooled, before.pooled)  # [CLS] and [SEP] are image-side
    assert not torch.allclose(after.text[:, t + 1:], before.text[:, t + 1:])
    other = torch.roll(ids, 1, dims=0)  # a whole other caption
    other_mask = torch.roll(batch["attention_mask"], 1, dims=0)
    swapped = model.encode({**batch, "attention_mask": other_mask}, other, mode="s2s")
    torch.testing.assert_close(swapped.image, before.image)
    bi_before, bi_after = model.encode(batch, ids, mode="bi"), model.encode(batch, changed, mode="bi")
    assert not torch.allclose(bi_after.image, bi_before.image)  # the bidirectional mask does mix them
    assert not torch.allclose(bi_after.text[:, 1:t + 1], bi_before.text[:, 1:t + 1])


def test_segment_ids_tell_the_mask():
    model = tiny()
    s2s = torch.tensor([True, False])
    seg = model.segment_ids(s2s, source_len=3, text_len=2)
    assert seg.tolist() == [[4, 4, 4, 5, 5], [0, 0, 0, 1, 1]]
    plain = tiny(mode_segments=False).segment_ids(s2s, 3, 2)
    assert plain.tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 1, 1]]


def test_region_slots_get_geometry_not_a_position(batch):
    model = tiny()
    with torch.no_grad():
        s2s = torch.zeros(6, dtype=torch.bool)
        x, _, source = model.embed(batch, batch["input_ids"], s2s)
        moved = dict(batch)
        moved["region_boxes"] = batch["region_boxes"] * 0.5
        y, _, _ = model.embed(moved, batch["input_ids"], s2s)
    assert source == batch["region_feats"].shape[1] + 2
    real = batch["region_mask"][0].nonzero()[0, 0] + 1
    assert not torch.allclose(x[0, real], y[0, real])  # the box changes the region token...
    torch.testing.assert_close(x[:, source:], y[:, source:])  # ...and nothing on the text side


# --------------------------------------------------------------------------- masking and the loss


def test_masking_predicts_caption_tokens_only_with_the_papers_count():
    g = torch.Generator().manual_seed(0)
    words = [1, 2, 3, 6, 7, 10, 17, 20]
    rows = [[CLS_ID] + list(range(5, 5 + n)) + [SEP_ID] + [PAD_ID] * (22 - n) for n in words]
    ids = torch.tensor(rows)
    mask = (ids != PAD_ID).long()
    for _ in range(20):
        masked, labels = mask_target_tokens(ids, mask, 128, generator=g)
        picked = labels != IGNORE_INDEX
        for b, n in enumerate(words):
            assert int(picked[b].sum()) == min(3, max(1, round(0.15 * n)))
        assert not picked[:, 0].any() and not picked[ids == PAD_ID].any()  # never [CLS] or padding
        assert torch.equal(labels[picked], ids[picked])
        assert torch.equal(masked[~picked], ids[~picked])
    big = torch.tensor([[CLS_ID] + list(range(5, 25)) + [SEP_ID]] * 4000)
    masked, labels = mask_target_tokens(big, torch.ones_like(big), 128, generator=g)
    picked = labels != IGNORE_INDEX
    share_mask = (masked[picked] == MASK_ID).float().mean().item()
    share_kept = (masked[picked] == big[picked]).float().mean().item()
    assert abs(share_mask - 0.8) < 0.02 and 0.08 < share_kept < 0.12  # 80% [MASK], 10% kept (+ random hits)
    assert picked[:, -1].any()  # the final [SEP] is a candidate: the generator learns to stop


def test_forward_is_finite_and_trains(batch):
    model = tiny().train()
    out = model(batch)
    assert set(out) == {"loss", "mlm_s2s", "mlm_bi"}
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    for name in ("word_embeddings.weight", "position_embeddings.weight", "segment_embeddings.weight",
                 "region_embedding.content.0.weight", "region_embedding.position.0.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert set(tiny(s2s_prob=1.0, bi_prob=0.0).train()(batch)) == {"loss", "mlm_s2s"}
    assert set(tiny(s2s_prob=0.0, bi_prob=1.0).train()(batch)) == {"loss", "mlm_bi"}


def test_each_batch_holds_both_masks(batch):
    model = tiny()
    torch.manual_seed(3)
    for size in (2, 3, 4):
        for _ in range(30):
            s2s = model.sample_modes(size, "cpu")
            assert s2s.any() and not s2s.all()
    s2s = model.sample_modes(20000, "cpu")
    assert abs(s2s.float().mean().item() - 0.75) < 0.02


def test_grad_checkpointing_gives_the_same_gradients(batch):
    grads = []
    for enable in (False, True):
        model = tiny().train()
        model.set_grad_checkpointing(enable)
        torch.manual_seed(5)  # the same masks and modes
        model(batch)["loss"].backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=0, atol=1e-6, msg=name)


# --------------------------------------------------------------------------- captioning and VQA


class ScriptedHead(torch.nn.Module):
    """An MLM head that writes ``script[b][t]`` at step t and records each step's input length."""

    def __init__(self, script, vocab):
        super().__init__()
        self.script, self.vocab, self.step = script, vocab, 0

    def forward(self, hidden):
        logits = torch.zeros(hidden.shape[0], self.vocab)
        for b, words in enumerate(self.script):
            logits[b, words[min(self.step, len(words) - 1)]] = 1.0
        self.step += 1
        return logits


def test_decoding_goes_left_to_right_and_stops_at_sep(batch):
    model = tiny()
    seen = []
    encode = model._encode

    def spy(b, ids, s2s, return_attention=False):
        seen.append(ids.clone())
        assert s2s.all()  # captions are written under the seq2seq mask
        return encode(b, ids, s2s, return_attention)

    model._encode = spy
    script = [[7, 8, SEP_ID], [9, SEP_ID], [10, 11, 12, SEP_ID], [7, SEP_ID], [8, SEP_ID], [9, SEP_ID]]
    model.mlm_head = ScriptedHead(script, 128)
    ids = model.generate(batch, max_len=10)
    assert len(seen) == 4  # every row wrote [SEP] by step 4: decoding stopped there
    for t, step_ids in enumerate(seen):
        assert step_ids.shape == (6, t + 2)
        assert (step_ids[:, 0] == CLS_ID).all() and (step_ids[:, -1] == MASK_ID).all()  # [CLS] ... [MASK]
        if t:
            assert torch.equal(step_ids[:, 1:-1], ids[:, :t])  # the words written so far, in order
    assert ids.tolist()[0] == [7, 8, SEP_ID, PAD_ID] and ids.tolist()[2] == [10, 11, 12, SEP_ID]
    assert ids.tolist()[1] == [9, SEP_ID, PAD_ID, PAD_ID]  # a finished row is padded


def test_decoding_without_sep_stops_at_max_len(batch, source):
    model = tiny()
    ids = model.generate(batch, max_len=4)
    assert ids.shape[0] == 6 and ids.shape[1] <= 4
    captions = decode_captions(ids, source.tokenizer)
    assert len(captions) == 6 and all(isinstance(c, str) for c in captions)
    regions_only = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "token_box")}
    assert torch.equal(model.generate(regions_only, max_len=4), ids)  # no caption needed
    assert decode_captions(torch.tensor([[7, SEP_ID, 9]]), source.tokenizer) == [source.tokenizer.decode([7]).strip()]
    start = torch.tensor([[CLS_ID, MASK_ID]] * 6)  # where decoding starts: a caption without a word
    out = model.encode({**regions_only, "attention_mask": torch.ones_like(start)}, start, mode="s2s")
    assert out.text.shape == (6, 2, model.config.dim)


def test_decoding_writes_words_and_no_empty_caption(batch):
    model = tiny()
    script = [[PAD_ID, 9, SEP_ID]] + [[SEP_ID, 7, SEP_ID]] * 5  # a special token first; [SEP] first
    model.mlm_head = ScriptedHead(script, 128)
    ids = model.generate(batch, max_len=5)
    assert not torch.isin(ids[:, 0], torch.tensor([PAD_ID, CLS_ID, MASK_ID, SEP_ID])).any()  # a word comes first
    assert (ids == SEP_ID).any(1).all()
    model.mlm_head = ScriptedHead([[SEP_ID]] * 6, 128)
    assert (model.generate(batch, max_len=3, min_len=0) == SEP_ID).all()  # min_len=0: an empty caption is allowed
    with pytest.raises(ValueError, match="min_len must be an int in"):
        model.generate(batch, max_len=3, min_len=4)


def test_vqa_uses_cls_times_sep_and_the_bidirectional_mask(source):
    model = tiny()
    qa = source.questions(range(3))
    out = model.encode(qa)
    R = qa["region_feats"].shape[1]
    hidden = out.extras["hidden"]
    torch.testing.assert_close(out.pooled, hidden[:, 0] * hidden[:, R + 1])
    assert out.extras["attn_mask"][:, 0].sum() > R + 2  # [CLS] sees the question: the bidirectional mask
    answers = answer_vocabulary(source.world.config)
    tuner = VQAFineTuner(model, len(answers))
    logits = tuner.logits(qa)
    assert logits.shape == (len(qa["answers"]), len(answers))
    loss = tuner(qa)["loss"]
    loss.backward()
    assert torch.isfinite(loss) and model.word_embeddings.weight.grad is not None
    assert 0.0 <= tuner.accuracy(qa) <= 1.0


# --------------------------------------------------------------------------- at scale


def test_gpu_base_builds_with_the_papers_sizes():
    model = build_model("unified_vlp", "gpu-base")
    c = model.config
    assert (c.dim, c.layers, c.heads, c.region_feat_dim, c.num_region_classes, c.max_regions) == \
        (768, 12, 12, 2048, 1601, 100)
    assert model.region_embedding.content[0].weight.shape == (2048, 2048)  # fc7-sized, as the paper's
    assert model.region_embedding.position[0].weight.shape == (768, 6 + 1601)
    assert model.segment_embeddings.num_embeddings == 6
    assert 110e6 < sum(p.numel() for p in model.parameters()) < 125e6  # BERT-base + the region MLPs


def test_pretrain_command_runs(tmp_path):
    cmd = [sys.executable, "-m", "course_lib.pretrain", "--model=unified_vlp", "--steps=3", "--global_batch=4",
           "--num_workers=0", f"--out_dir={tmp_path}", "--log_every=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", COURSE_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "unified_vlp @ cpu-tiny" in proc.stdout and "step 3/3" in proc.stdout
    assert (tmp_path / "checkpoint.pt").is_file()


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("overrides, message", [
    (dict(s2s_prob=0.75, bi_prob=0.5), "s2s_prob \\+ bi_prob must be 1"),
    (dict(s2s_prob=1.5, bi_prob=-0.5), "s2s_prob must be a probability"),
    (dict(max_pred=0), "max_pred must be an int >= 1"),
    (dict(mode_segments="yes"), "option 'mode_segments' expects bool"),
    (dict(dim=30, heads=4), "dim=30 must be a multiple of heads=4"),
    (dict(max_regions=0), "max_regions must be an int >= 1"),
])
def test_bad_config_is_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        UnifiedVLPConfig.from_preset("cpu-tiny", **overrides)
    with pytest.raises(ValueError, match="unknown option 'fusion'"):
        UnifiedVLPConfig.from_preset("cpu-tiny", fusion="late")


def test_bad_input_is_named(batch):
    model = tiny()
    with pytest.raises(ValueError, match="mode must be 'bi', 's2s'"):
        model.encode(batch, mode="causal")
    with pytest.raises(ValueError, match="mode as a tensor must be"):
        model.encode(batch, mode=torch.ones(6))
    with pytest.raises(ValueError, match="max_len must be an int in"):
        model.generate(batch, max_len=0)
    with pytest.raises(ValueError, match="max_len must be an int in"):
        model.generate(batch, max_len=24)
    with pytest.raises(ValueError, match="max_regions=3"):
        tiny(max_regions=3).encode(batch)
    with pytest.raises(ValueError, match="start with \\[CLS\\]"):
        model.encode(batch, batch["input_ids"].roll(1, dims=1))
    with pytest.raises(ValueError, match="at least 2 samples"):
        model.train()({k: v[:1] for k, v in batch.items()})
    with pytest.raises(ValueError, match="caption 0 of input_ids is empty"):
        empty = batch["input_ids"].clone()
        empty[0, 1:] = PAD_ID
        empty[0, 1] = SEP_ID
        model({**batch, "input_ids": empty})
    with pytest.raises(ValueError, match="region_mask row 1 has no region"):
        model.generate({**batch, "region_mask": batch["region_mask"].clone().index_fill_(0, torch.tensor([1]), False)})
    with pytest.raises(ValueError, match="region_feats must have shape"):
        model.generate({**batch, "region_feats": batch["region_feats"][..., :10]})
    with pytest.raises(ValueError, match="config must be a UnifiedVLPConfig"):
        UnifiedVLP(object())


def test_attention_mask_argument_of_the_shared_blocks():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4).eval()
    x = torch.randn(2, 5, 16)
    allowed = seq2seq_mask(torch.ones(2, 5, dtype=torch.bool), 2)
    allowed[1, 3] = False  # a query that sees nothing: a zero output, not NaN
    fast, _ = mha(x, attn_mask=allowed)
    slow, attn = mha(x, attn_mask=allowed, return_attention=True)
    torch.testing.assert_close(fast, slow)
    assert torch.isfinite(fast).all() and (attn[~allowed[:, None].expand_as(attn)] == 0).all()
    with pytest.raises(ValueError, match="attn_mask must have shape"):
        mha(x, attn_mask=allowed[:, :4])
    with pytest.raises(ValueError, match="attn_mask must be a bool tensor"):
        mha(x, attn_mask=allowed.float())


def test_gpu_base_reports_parameters_and_flops():
    model = build_model("unified_vlp", "gpu-base", max_regions=36)  # the bottom-up-attention shards' 36 boxes
    c = model.config
    assert_flops_near_6nt(model, gpu_region_batch(c), c.context_length + 36 + 1)


def test_pretrain_resumes_exactly(tmp_path):
    straight, resumed = killed_and_resumed("unified_vlp", tmp_path)
    assert resumed.history.losses == straight.history.losses  # the mask and masking draws resume too
    assert resumed.history.values("mlm_s2s") == straight.history.values("mlm_s2s")
