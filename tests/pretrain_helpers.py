"""Shared by the system tests: a pretraining run killed and resumed through ``course_lib.pretrain``,
and a gpu-base-sized region batch for FLOP counts."""

from __future__ import annotations

import pytest
import torch


class Killed(Exception):
    pass


def killed_and_resumed(model: str, tmp_path, *extra: str):
    """``(straight, resumed)``: 4 steps of ``--model=model`` on ShapeWorld, and the same run killed right
    after its step-2 checkpoint and resumed (``PretrainResult``s). One CPU thread."""
    from course_lib.pretrain import parse_args, pretrain

    args = [f"--model={model}", "--steps=4", "--checkpoint_every=2", "--global_batch=8", "--num_workers=0",
            "--log_every=1", f"--tokenizer={tmp_path / 'tokenizer'}", *extra]

    def kill_after_step_2(step, history):
        if step == 2:
            raise Killed

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        straight = pretrain(parse_args(args + [f"--out_dir={tmp_path / 'straight'}"]))
        with pytest.raises(Killed):
            pretrain(parse_args(args + [f"--out_dir={tmp_path / 'killed'}"]), callback=kill_after_step_2)
        resumed = pretrain(parse_args(args + [f"--out_dir={tmp_path / 'killed'}", "--resume=True"]))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.isfinite(torch.tensor(straight.history.losses)))
    return straight, resumed


def gpu_region_batch(config, regions: int = 36, batch_size: int = 2) -> dict:
    """A random region batch at ``config``'s sizes (text full length, ``[CLS] ... [SEP]``)."""
    from course_lib.features.text import CLS_ID, SEP_ID

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, config.vocab_size, (batch_size, config.context_length), generator=g)
    ids[:, 0], ids[:, -1] = CLS_ID, SEP_ID
    return {"input_ids": ids, "attention_mask": torch.ones(batch_size, config.context_length, dtype=torch.long),
            "region_feats": torch.randn(batch_size, regions, config.region_feat_dim, generator=g),
            "region_boxes": torch.tensor([0.1, 0.1, 0.5, 0.5]).expand(batch_size, regions, 4).clone(),
            "region_mask": torch.ones(batch_size, regions, dtype=torch.bool),
            "region_labels": torch.randint(0, config.num_region_classes - 1, (batch_size, regions), generator=g)}


def assert_flops_near_6nt(model, batch: dict, tokens: int) -> float:
    """The training FLOPs per sample ``course_lib.pretrain`` reports for ``batch`` are 6 N T (N the
    transformer layers' parameters, T the sequence length) plus attention and the heads: within
    [0.8, 3] x 6 N T. Returns them."""
    from course_lib.flops import model_flops_per_sample

    with torch.no_grad():
        flops = model_flops_per_sample(model, batch)
    layers = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n)
    assert 0.8 * 6 * layers * tokens < flops < 3 * 6 * layers * tokens
    return flops
