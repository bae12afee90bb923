"""Pixel-BERT's random pixel sampling (Huang et al. 2020, section 3.3), and Pixel-BERT against a region
model, reproduced on ShapeWorld.

The claims: sampling 100 cells of the feature map per image in pretraining (every cell at fine-tuning and
test time) (a) improves the downstream tasks and (b) speeds training, against the same model pretrained
on every cell; and (c) what losing the detector costs or gains: Pixel-BERT against VisualBERT (notebook
10) over the same scenes, the same pretraining budget and the same fine-tuning
(``course_lib.evaluate.region_tasks``: retrieval after ITM fine-tuning, VQA). Grounding by region scoring
needs detected boxes: it is scored for VisualBERT only. A "no pretraining" line fine-tunes Pixel-BERT
from random weights. Time per pretraining step is measured in the running process, on one thread, the lines
one after the other for each seed: it depends on the machine. Seeds can run side by side in separate
processes (``--seeds 1 --first_seed S``) and be merged (``--merge``), as the committed results were.

    python benchmarks/pixel_bert_sampling.py                  # 4 lines x 3 seeds (~10 min, 1 quiet core)
    python benchmarks/pixel_bert_sampling.py --seeds 1 --lines sampled,all_cells
    python benchmarks/pixel_bert_sampling.py --small --out /tmp/pixel.json   # a few steps (the test suite)

Writes every seed's scores and times, the protocol, the command and the commit as JSON to ``--out``
(default ``benchmarks/results/pixel_bert_sampling.json``, which notebook 21 loads) and prints a markdown
table, mean ± standard deviation over the seeds.
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

import torch

from course_lib.utils import git_commit, mean_spread

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "pixel_bert_sampling.json"
TASKS = ("retrieval R@1", "VQA", "grounding")
# line: (name, model, overrides, pretrained)
LINES = {
    "sampled": ("Pixel-BERT, 100 of 256 cells sampled (the paper)", "pixel_bert", dict(num_samples=100), True),
    "all_cells": ("Pixel-BERT, every cell (no sampling)", "pixel_bert", dict(num_samples=0), True),
    "visualbert": ("VisualBERT, detected regions (notebook 10)", "visualbert", {}, True),
    "none": ("Pixel-BERT, no pretraining", "pixel_bert", dict(num_samples=100), False),
}
PAPER_SOURCE = ("Huang et al., Pixel-BERT (arXiv:2004.00849), ablation study: random pixel sampling in "
                "pretraining improves VQA and retrieval, and makes pretraining cheaper")

# The protocol: notebook 21's cpu scale (notebook 10's world and model sizes).
FULL = dict(steps=300, batch_size=64, lr=2e-3, warmup_steps=20, retrieval_steps=60, vqa_steps=150, grounding_steps=30,
            finetune_batch_size=64, train_scenes=2000, val_scenes=200, qa_scenes=600, retrieval_pairs=50,
            grounding_scenes=1000, seeds=3, lines=list(LINES))
SMALL = dict(FULL, steps=4, retrieval_steps=2, vqa_steps=2, grounding_steps=2, finetune_batch_size=8, batch_size=8,
             train_scenes=32, val_scenes=16, qa_scenes=16, retrieval_pairs=8, grounding_scenes=32, seeds=2,
             lines=list(LINES))
WORLD = dict(min_objects=1, max_objects=2, seed=0)
MODEL_SIZE = dict(layers=1, dim=64, heads=4, mlp_ratio=2.0)
CONTEXT, MAX_REGIONS, VOCAB = 20, 4, 128


def build_data(protocol: dict):
    """(tokenizer, RegionTaskData) of the protocol's world: region batches that also carry the images."""
    from course_lib.data import ShapeWorld, WorldConfig
    from course_lib.data.datasets import build_tokenizer
    from course_lib.evaluate.region_tasks import shapeworld_region_tasks

    world = ShapeWorld(WorldConfig(**WORLD))
    tokenizer = build_tokenizer(world, vocab_size=VOCAB, num_scenes=300)
    data = shapeworld_region_tasks(world, tokenizer, CONTEXT, MAX_REGIONS, protocol["train_scenes"],
                                   protocol["val_scenes"], protocol["qa_scenes"], protocol["retrieval_pairs"],
                                   protocol["grounding_scenes"])
    return tokenizer, data


def build(line: str, seed: int, vocab_size: int):
    from course_lib.models.registry import build_model

    _, name, overrides, _ = LINES[line]
    torch.manual_seed(seed)
    return build_model(name, "cpu-tiny", vocab_size=vocab_size, context_length=CONTEXT, **MODEL_SIZE, **overrides)


def pretrain(model, data, protocol: dict, seed: int) -> float:
    """Pretrain ``model`` on ``data.pretrain`` for the protocol's steps; returns seconds per step."""
    from course_lib.evaluate.region_tasks import batch_sampler
    from course_lib.train import TrainConfig, train

    start = time.perf_counter()
    train(model, batch_sampler(data.pretrain, protocol["batch_size"], seed),
          TrainConfig(steps=protocol["steps"], lr=protocol["lr"], warmup_steps=min(protocol["warmup_steps"],
                      protocol["steps"]), seed=seed, progress=False, log_every=0, device="cpu"))
    return (time.perf_counter() - start) / protocol["steps"]


def score(model, data, protocol: dict, seed: int, grounding: bool) -> dict:
    from course_lib.evaluate.region_tasks import FinetuneBudget, finetune_grounding, finetune_retrieval, finetune_vqa

    budget = FinetuneBudget(retrieval_steps=protocol["retrieval_steps"], vqa_steps=protocol["vqa_steps"],
                            grounding_steps=protocol["grounding_steps"], batch_size=protocol["finetune_batch_size"],
                            lr=protocol["lr"], warmup_steps=10)
    out = {"retrieval R@1": finetune_retrieval(model, data, budget, seed, "cpu")["R@1"],
           "VQA": finetune_vqa(model, data, budget, seed, "cpu")}
    out["grounding"] = finetune_grounding(model, data, budget, seed, "cpu") if grounding else None
    return out


def markdown(results: dict) -> str:
    out = ["| line | retrieval R@1 | VQA | grounding acc@0.5 | ms / pretraining step |", "|---|---|---|---|---|"]
    for row in results["rows"]:
        ms = [1000 * t for t in row["seconds_per_step"]] if row["seconds_per_step"] else []
        out.append(f"| {row['name']} | " + " | ".join(mean_spread(row["scores"][t]) for t in TASKS)
                   + f" | {mean_spread(ms, 1) if ms else 'n/a'} |")
    c = results["chance"]
    out.append(f"| *chance* | *{c['retrieval R@1']:.3f}* | *{c['VQA']:.3f}* | *{c['grounding']:.3f}* | |")
    return "\n".join(out)


def run(protocol: dict, command: str, out: Path | None) -> dict:
    from course_lib.evaluate.region_tasks import chance_levels

    torch.set_num_threads(1)
    begin = time.perf_counter()
    tokenizer, data = build_data(protocol)
    rows = {line: {"line": line, "name": LINES[line][0], "model": LINES[line][1], "overrides": LINES[line][2],
                   "pretrained": LINES[line][3], "scores": {t: [] for t in TASKS}, "seconds_per_step": []}
            for line in protocol["lines"]}
    for seed in range(protocol.get("first_seed", 0), protocol.get("first_seed", 0) + protocol["seeds"]):
        for line in protocol["lines"]:  # arms interleaved: the machine's load hits each alike
            model = build(line, seed, len(tokenizer))
            if LINES[line][3]:
                rows[line]["seconds_per_step"].append(pretrain(model, data, protocol, seed))
            scores = score(model.eval(), data, protocol, seed, grounding=LINES[line][1] != "pixel_bert")
            for t in TASKS:
                rows[line]["scores"][t].append(scores[t])
            print(f"seed {seed} {line}: {scores} | {time.perf_counter() - begin:.0f} s", flush=True)
    results = {"protocol": protocol, "world": WORLD, "model_size": MODEL_SIZE, "context_length": CONTEXT,
               "max_regions": MAX_REGIONS, "tasks": list(TASKS), "rows": list(rows.values()),
               "chance": chance_levels(data), "paper_source": PAPER_SOURCE, "command": command,
               "commit": git_commit(), "date": datetime.date.today().isoformat(), "machine": platform.processor()
               or platform.machine(), "threads": 1, "total_seconds": time.perf_counter() - begin}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")
    return results


def merge(parts: list[dict]) -> dict:
    """One result from runs of the same protocol on other seeds (processes run side by side): every row's
    per-seed lists concatenated in the order given; the run time is the longest part's."""
    first = parts[0]
    strip = [{k: v for k, v in p["protocol"].items() if k not in ("seeds", "first_seed")} for p in parts]
    if any(s != strip[0] for s in strip):
        raise ValueError("the parts were run with different protocols")
    out = dict(first, rows=[dict(row, scores={t: [x for p in parts for x in p["rows"][i]["scores"][t]] for t in TASKS},
                                 seconds_per_step=[x for p in parts for x in p["rows"][i]["seconds_per_step"]])
                            for i, row in enumerate(first["rows"])])
    out["protocol"] = dict(first["protocol"], seeds=sum(p["protocol"]["seeds"] for p in parts), first_seed=0)
    out["total_seconds"] = max(p["total_seconds"] for p in parts)
    out["command"] = " && ".join(p["command"] for p in parts)
    out["paper_source"] = PAPER_SOURCE
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="a few steps on a few scenes (the test suite)")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--lines", default=None, help=f"comma-separated, from {','.join(LINES)}")
    parser.add_argument("--first_seed", type=int, default=0, help="run seeds first_seed ... first_seed + seeds - 1")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--merge", nargs="+", default=None,
                        help="merge the JSON results of runs of other seeds (same protocol) into --out and exit")
    args = parser.parse_args(argv)
    if args.merge:
        results = merge([json.loads(Path(f).read_text()) for f in args.merge])
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
        print(markdown(results))
        return results
    protocol = dict(SMALL if args.small else FULL)
    if args.first_seed:
        protocol["first_seed"] = args.first_seed
    if args.seeds is not None:
        if args.seeds < 1:
            parser.error("--seeds must be >= 1")
        protocol["seeds"] = args.seeds
    if args.lines:
        lines = args.lines.split(",")
        unknown = [x for x in lines if x not in LINES]
        if unknown:
            parser.error(f"unknown lines {unknown}; valid lines are {list(LINES)}")
        protocol["lines"] = lines
    command = "python benchmarks/pixel_bert_sampling.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    results = run(protocol, command.strip(), Path(args.out))
    print(markdown(results))
    print(f"reproduce: {results['command']}")
    return results


if __name__ == "__main__":
    main()
