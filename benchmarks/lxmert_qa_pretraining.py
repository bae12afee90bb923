"""LXMERT's finding that image QA as a pretraining task helps VQA (Tan & Bansal 2019, Table 4), on ShapeWorld.

Two arms, the same model and the same pretraining sentences (the captions *and* the questions of the
pretraining scenes; without the QA loss the questions are still sentences for MLM and matching), the same
number of steps:

- ``with QA``: every task, the QA loss on the matched questions;
- ``without QA``: ``qa_weight=0.0``.

Then the same VQA fine-tuning for both (``VQAFineTuner``: a fresh ``VQAHead`` on the pooled output, as
LXMERT drops its pretraining answer head) on the questions of *other* training scenes, scored on the
questions of the validation scenes: the QA pretraining scenes, the fine-tuning scenes and the evaluated
scenes are three disjoint sets of images. Chance is the majority answer of the fine-tuning questions.
Two fine-tuning learning rates, each the same for both arms: the course's shared budget (``lr``, the
pretraining rate, as ``course_lib.evaluate.region_tasks`` fine-tunes every system) and half of it
(``finetune_lr_low``: LXMERT's ratio, pretraining at 1e-4 and VQA at 5e-5). For the QA arm the
pretraining answer head is also scored as it is, before any fine-tuning (``qa_head``).

    python benchmarks/lxmert_qa_pretraining.py                 # 2 arms x 3 seeds (~10 min on 1 core of a busy machine)
    python benchmarks/lxmert_qa_pretraining.py --small --out /tmp/qa.json   # a few steps (the test suite)

Writes every seed's accuracy, the protocol, the command and the commit to ``--out`` (default
``benchmarks/results/lxmert_qa_pretraining.json``, which notebook 15 loads) and prints a markdown table,
mean ± standard deviation over the seeds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from course_lib.utils import git_commit, mean_spread

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "lxmert_qa_pretraining.json"
ARMS = {"with QA": {}, "without QA": {"qa_weight": 0.0}}
PAPER_SOURCE = ("Tan & Bansal, LXMERT (EMNLP 2019, arXiv:1908.07490), Table 4: pretraining with the image-QA "
                "loss beats pretraining as long without it, on VQA and GQA after fine-tuning")

# The protocol: notebook 15's cpu scale.
FULL = dict(steps=400, batch_size=64, lr=2e-3, finetune_lr_low=1e-3, warmup_steps=20, vqa_steps=150,
            finetune_batch_size=64,
            pretrain_scenes=2000, finetune_scenes=800, val_scenes=300, seeds=3)
SMALL = dict(FULL, steps=4, vqa_steps=3, batch_size=16, finetune_batch_size=16, pretrain_scenes=40,
             finetune_scenes=24, val_scenes=16, seeds=1)
WORLD = dict(min_objects=1, max_objects=2, seed=0)
MODEL = dict(dim=64, heads=4, text_layers=2, image_layers=1, layers=1, mlp_ratio=2.0)
CONTEXT, MAX_REGIONS, VOCAB = 20, 4, 128


def build_data(protocol: dict):
    """``(tokenizer, pretraining pool, RegionTaskData)``: the pool holds the captions and questions of
    training scenes ``[F, F + P)``; VQA fine-tunes on the questions of training scenes ``[0, F)`` and
    is scored on those of validation scenes ``[0, V)``."""
    from course_lib.data import ShapeWorld, WorldConfig
    from course_lib.data.datasets import build_tokenizer
    from course_lib.data.language import answer_vocabulary
    from course_lib.data.regions import ShapeWorldRegions
    from course_lib.evaluate.region_tasks import RegionTaskData
    from course_lib.models.lxmert import qa_pretraining_pool

    world = ShapeWorld(WorldConfig(**WORLD))
    tokenizer = build_tokenizer(world, vocab_size=VOCAB, num_scenes=300)
    train = ShapeWorldRegions(world, tokenizer, CONTEXT, max_regions=MAX_REGIONS, split="train")
    val = ShapeWorldRegions(world, tokenizer, CONTEXT, max_regions=MAX_REGIONS, split="val")
    F_, P = protocol["finetune_scenes"], protocol["pretrain_scenes"]
    pool = qa_pretraining_pool(train, range(F_, F_ + P))
    data = RegionTaskData(pretrain=pool, val=None, retrieval=None, qa_train=train.questions(range(F_)),
                          qa_val=val.questions(range(protocol["val_scenes"])), ground_train=None, ground_val=None,
                          num_answers=len(answer_vocabulary(world.config)))
    return tokenizer, pool, data


def pretrained(overrides: dict, seed: int, vocab_size: int, pool: dict, num_answers: int, protocol: dict):
    """LXMERT with ``overrides`` pretrained on ``pool`` for the protocol's steps."""
    from course_lib.evaluate.region_tasks import batch_sampler
    from course_lib.models.registry import build_model
    from course_lib.train import TrainConfig, train

    torch.manual_seed(seed)
    model = build_model("lxmert", "cpu-tiny", vocab_size=vocab_size, context_length=CONTEXT,
                        num_qa_answers=num_answers, **MODEL, **overrides)
    history = train(model, batch_sampler(pool, protocol["batch_size"], seed),
                    TrainConfig(steps=protocol["steps"], lr=protocol["lr"],
                                warmup_steps=min(protocol["warmup_steps"], protocol["steps"]), seed=seed,
                                progress=False, log_every=0, device="cpu"))
    return model.cpu().eval(), history


MEASURES = ("vqa", "vqa_low_lr")  # fine-tuned at lr, at finetune_lr_low


def vqa_accuracy(model, data, protocol: dict, seed: int, lr: float) -> float:
    """VQA accuracy on the validation questions after the protocol's fine-tuning of a copy of ``model``
    at learning rate ``lr``."""
    from course_lib.evaluate.region_tasks import FinetuneBudget, finetune_vqa

    budget = FinetuneBudget(vqa_steps=protocol["vqa_steps"], batch_size=protocol["finetune_batch_size"],
                            lr=lr, warmup_steps=10)
    return finetune_vqa(model, data, budget, seed=seed, device="cpu")


@torch.no_grad()
def qa_head_accuracy(model, data) -> float:
    """The pretraining answer head's accuracy on the validation questions, without fine-tuning."""
    return (model.qa_head(model.encode(data.qa_val).pooled).argmax(-1) == data.qa_val["answers"]).float().mean().item()


def markdown(results: dict) -> str:
    p = results["protocol"]
    out = [f"| pretraining | VQA, fine-tuned at lr {p['lr']:g} | VQA, fine-tuned at lr {p['finetune_lr_low']:g} | "
           "pretraining QA head, not fine-tuned |", "|---|---|---|---|"]
    for row in results["rows"]:
        head = mean_spread(row["qa_head"]) if row["qa_head"] else "(no QA head trained)"
        out.append(f"| {row['arm']} | {mean_spread(row['vqa'])} | {mean_spread(row['vqa_low_lr'])} | {head} |")
    out.append(f"| *chance (majority answer)* | *{results['chance']:.3f}* | *{results['chance']:.3f}* | "
               f"*{results['chance']:.3f}* |")
    return "\n".join(out)


def run(protocol: dict, out: Path, command: str, log=print) -> dict:
    start = time.perf_counter()
    tokenizer, pool, data = build_data(protocol)
    majority = torch.bincount(data.qa_train["answers"], minlength=data.num_answers).argmax()
    results = {"command": command, "date": datetime.date.today().isoformat(), "commit": git_commit(),
               "machine": f"{platform.machine()}, {platform.processor() or platform.system()}, "
                          f"{torch.get_num_threads()} thread(s), torch {torch.__version__}",
               "protocol": protocol, "world": WORLD, "model": MODEL, "paper_source": PAPER_SOURCE,
               "pool": {"sentences": len(pool["input_ids"]), "questions": int((pool["answers"] >= 0).sum())},
               "chance": round((data.qa_val["answers"] == majority).float().mean().item(), 5), "rows": []}
    for arm, overrides in ARMS.items():
        row = {"arm": arm, "overrides": overrides, "vqa": [], "vqa_low_lr": [], "qa_head": [], "final_losses": [],
               "seconds": 0.0}
        for seed in range(protocol["seeds"]):
            t0 = time.perf_counter()
            model, history = pretrained(overrides, seed, len(tokenizer), pool, data.num_answers, protocol)
            row["final_losses"].append(round(float(np.mean(history.losses[-20:])), 4))
            for measure, lr in zip(MEASURES, (protocol["lr"], protocol["finetune_lr_low"])):
                row[measure].append(round(float(vqa_accuracy(model, data, protocol, seed, lr)), 5))
            if model.config.qa_weight > 0:
                row["qa_head"].append(round(qa_head_accuracy(model, data), 5))
            row["seconds"] += time.perf_counter() - t0
            log(f"{arm} seed {seed}: VQA {row['vqa'][-1]:.3f}, at the low lr {row['vqa_low_lr'][-1]:.3f} "
                f"({time.perf_counter() - t0:.1f} s)")
        row["seconds"] = round(row["seconds"], 1)
        results["rows"].append(row)
    results["total_seconds"] = round(time.perf_counter() - start, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    return results


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a few steps on a few scenes (the test suite)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per arm (full: 3, small: 1)")
    parser.add_argument("--steps", type=int, default=None, help="pretraining steps (full: 600)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (COURSE_THREADS overrides)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="where the JSON results go")
    args = parser.parse_args(argv)
    from course_lib.utils import seed_everything

    seed_everything(0, threads=args.threads)
    protocol = dict(SMALL if args.small else FULL)
    for name in ("seeds", "steps"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                parser.error(f"--{name} must be >= 1, got {value}")
            protocol[name] = value
    command = "python benchmarks/lxmert_qa_pretraining.py " + " ".join(shlex.quote(a) for a in argv)
    results = run(protocol, Path(args.out), command.strip())
    print()
    print(markdown(results))
    print(f"\nmean ± standard deviation over {protocol['seeds']} seeds; {results['total_seconds']:.0f} s; "
          f"results in {args.out}")
    print(f"reproduce: {results['command']}")
    return results


if __name__ == "__main__":
    main()
