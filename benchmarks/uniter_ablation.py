"""UNITER's objective ablation (Chen et al. 2020, Table 2), reproduced on ShapeWorld.

Each line of the paper's table is one ``build_model("uniter", ...)`` override: the same model, the
same number of pretraining steps (the tasks share them, drawn per batch from the mix), then the same
downstream fine-tuning for every line (``course_lib.evaluate.region_tasks``: retrieval after ITM
fine-tuning, VQA, grounding by region scoring), over several seeds. Line 1 ("None") is fine-tuned from
random weights. The paper's numbers (UNITER-base, COCO + VG) are printed beside ours.

    python benchmarks/uniter_ablation.py                  # the full table: 9 lines x 5 seeds (~20 min, 1 core)
    python benchmarks/uniter_ablation.py --seeds 3 --lines L6,L11
    python benchmarks/uniter_ablation.py --small --out /tmp/ablation.json   # a few steps (the test suite)

Writes the results (every seed's scores, the protocol, the command, the commit) as JSON to ``--out``
(default ``benchmarks/results/uniter_ablation.json``, which notebook 12 loads) and prints a markdown
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

import numpy as np
import torch

from course_lib.utils import git_commit, mean_spread

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "uniter_ablation.json"
TASKS = ("retrieval R@1", "VQA", "grounding")
ALIGNMENT = "alignment"  # share of shape words whose heaviest transport mass is on their own region (not in the sum)

# The paper's Table 2 (UNITER-base, pretrained on COCO + Visual Genome): its line number, the
# objectives, and what our override of build_model("uniter") is. "All MRM" is MRC-kl + MRFR (line 10).
NO_REGION_TASKS = dict(mrfr_weight=0.0, mrckl_weight=0.0, mrc_weight=0.0, wra_weight=0.0)
LINES = {
    "L1": ("None (no pretraining)", None),
    "L5": ("MLM", dict(NO_REGION_TASKS, itm_weight=0.0)),
    "L6": ("MLM + ITM", dict(NO_REGION_TASKS)),
    "L7": ("MLM + ITM + MRC", dict(NO_REGION_TASKS, mrc_weight=1.0)),
    "L8": ("MLM + ITM + MRFR", dict(NO_REGION_TASKS, mrfr_weight=1.0)),
    "L9": ("MLM + ITM + MRC-kl", dict(NO_REGION_TASKS, mrckl_weight=1.0)),
    "L10": ("MLM + ITM + MRC-kl + MRFR (all MRM)", dict(wra_weight=0.0)),
    "L11": ("MLM + ITM + MRC-kl + MRFR + WRA", {}),
    "L12": ("L10 without conditional masking", dict(wra_weight=0.0, conditional_masking=False)),
}
# Table 2's columns: Meta-Sum, VQA test-dev, IR (Flickr30K val, mean of R@1/5/10), TR (likewise),
# NLVR2 dev, RefCOCO+ val^d (detected boxes).
PAPER_COLUMNS = ("Meta-Sum", "VQA", "IR", "TR", "NLVR2", "RefCOCO+")
PAPER = {
    "L1": (314.34, 67.03, 61.74, 65.55, 51.02, 68.73),
    "L5": (386.10, 71.29, 77.88, 89.25, 74.79, 72.89),
    "L6": (393.04, 71.55, 81.64, 91.12, 75.98, 72.75),
    "L7": (393.97, 71.46, 81.39, 91.45, 76.18, 73.49),
    "L8": (396.24, 71.73, 81.76, 92.31, 76.21, 74.23),
    "L9": (397.09, 71.63, 82.10, 92.57, 76.28, 74.51),
    "L10": (399.97, 71.92, 83.73, 92.87, 76.93, 74.52),
    "L11": (400.93, 72.47, 83.72, 93.03, 76.91, 74.80),
    "L12": (396.51, 71.68, 82.31, 92.08, 76.15, 74.29),
}
PAPER_SOURCE = "Chen et al., UNITER (ECCV 2020, arXiv:1909.11740v3), Table 2, lines 1 and 5-12"

# The protocol: notebook 12's cpu scale (notebook 10's world and sizes).
FULL = dict(steps=600, batch_size=64, lr=2e-3, warmup_steps=20, retrieval_steps=80, vqa_steps=300, grounding_steps=30,
            finetune_batch_size=64, train_scenes=3000, val_scenes=300, qa_scenes=1000, retrieval_pairs=100,
            grounding_scenes=1000, seeds=5, lines=list(LINES))
SMALL = dict(FULL, steps=6, retrieval_steps=3, vqa_steps=3, grounding_steps=3, finetune_batch_size=16, batch_size=16,
             train_scenes=64, val_scenes=24, qa_scenes=24, retrieval_pairs=8, grounding_scenes=48, seeds=2,
             lines=["L1", "L6", "L11"])
WORLD = dict(min_objects=1, max_objects=2, seed=0)
MODEL_SIZE = dict(layers=1, dim=64, heads=4, mlp_ratio=2.0)
CONTEXT, MAX_REGIONS, VOCAB = 20, 4, 128


def build_data(protocol: dict):
    """(tokenizer, RegionTaskData) of the protocol's world."""
    from course_lib.data import ShapeWorld, WorldConfig
    from course_lib.data.datasets import build_tokenizer
    from course_lib.evaluate.region_tasks import shapeworld_region_tasks

    world = ShapeWorld(WorldConfig(**WORLD))
    tokenizer = build_tokenizer(world, vocab_size=VOCAB, num_scenes=300)
    data = shapeworld_region_tasks(world, tokenizer, CONTEXT, MAX_REGIONS, protocol["train_scenes"],
                                   protocol["val_scenes"], protocol["qa_scenes"], protocol["retrieval_pairs"],
                                   protocol["grounding_scenes"])
    return tokenizer, data


def pretrained(overrides: dict | None, seed: int, vocab_size: int, data, protocol: dict):
    """UNITER with ``overrides`` pretrained on ``data.pretrain`` for the protocol's steps (or, with
    ``overrides=None``, left at its random initialisation: line 1)."""
    from course_lib.evaluate.region_tasks import batch_sampler
    from course_lib.models.registry import build_model
    from course_lib.train import TrainConfig, train

    torch.manual_seed(seed)
    model = build_model("uniter", "cpu-tiny", vocab_size=vocab_size, context_length=CONTEXT, **MODEL_SIZE,
                        **(overrides or {}))
    if overrides is not None:
        train(model, batch_sampler(data.pretrain, protocol["batch_size"], seed),
              TrainConfig(steps=protocol["steps"], lr=protocol["lr"], warmup_steps=min(protocol["warmup_steps"],
                          protocol["steps"]), seed=seed, progress=False, log_every=0, device="cpu"))
    return model.cpu().eval()


def score(model, data, protocol: dict, seed: int) -> dict:
    from course_lib.evaluate.region_tasks import FinetuneBudget, downstream_scores

    budget = FinetuneBudget(retrieval_steps=protocol["retrieval_steps"], vqa_steps=protocol["vqa_steps"],
                            grounding_steps=protocol["grounding_steps"], batch_size=protocol["finetune_batch_size"],
                            lr=protocol["lr"], warmup_steps=10)
    return downstream_scores(model, data, budget, seed=seed, device="cpu")


def alignment(model, data) -> tuple[float, float]:
    """``(share, chance)``: IPOT plans between the pretrained model's fused words and regions on the
    validation scenes; the share of shape words whose heaviest mass is on their own object's region,
    in the images with two regions or more (with one, the choice is forced)."""
    from course_lib.evaluate import plan_alignment

    plans = model.transport_plans(data.val)
    return plan_alignment(plans, data.val["token_box"], data.val["region_mask"], min_regions=2)


def meta_sum(scores: dict) -> list[float]:
    """Per seed: the sum of the three scores in percent (our Meta-Sum)."""
    return [100 * sum(values) for values in zip(*(scores[t] for t in TASKS))]


def markdown(results: dict) -> str:
    """The table: our mean ± std per task and their sum, and the paper's columns."""
    head = ("| line | objectives | retrieval R@1 | VQA | grounding acc@0.5 | sum (%) | WRA alignment | paper: Meta-Sum "
            "| VQA | IR | TR | RefCOCO+ |")
    out = [head, "|---|---|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    for row in results["rows"]:
        paper = dict(zip(PAPER_COLUMNS, row["paper"]))
        ours = " | ".join(mean_spread(row["scores"][t]) for t in TASKS)
        ms = meta_sum(row["scores"])
        out.append(f"| {row['line']} | {row['name']} | {ours} | {np.mean(ms):.1f} ± {np.std(ms):.1f} | "
                   f"{mean_spread(row['scores'][ALIGNMENT])} | {paper['Meta-Sum']:.2f} | {paper['VQA']:.2f} | {paper['IR']:.2f} | {paper['TR']:.2f} | "
                   f"{paper['RefCOCO+']:.2f} |")
    chance = results["chance"]
    out.append(f"| | *chance* | *{chance['retrieval R@1']:.3f}* | *{chance['VQA']:.3f} (majority)* | "
               f"*{chance['grounding']:.3f}* | | *{chance[ALIGNMENT]:.3f}* | | | | | |")
    return "\n".join(out)


def run(protocol: dict, out: Path, command: str, log=print) -> dict:
    from course_lib.evaluate.region_tasks import chance_levels

    unknown = [line for line in protocol["lines"] if line not in LINES]
    if unknown:
        raise ValueError(f"unknown lines {unknown}; valid lines are {list(LINES)}")
    start = time.perf_counter()
    tokenizer, data = build_data(protocol)
    results = {"command": command, "date": datetime.date.today().isoformat(), "commit": git_commit(),
               "machine": f"{platform.machine()}, {platform.processor() or platform.system()}, "
                          f"{torch.get_num_threads()} thread(s), torch {torch.__version__}",
               "protocol": {k: v for k, v in protocol.items() if k != "lines"}, "world": WORLD, "model": MODEL_SIZE,
               "chance": {**chance_levels(data), ALIGNMENT: None}, "paper_source": PAPER_SOURCE, "paper_columns": list(PAPER_COLUMNS),
               "rows": []}
    for line in protocol["lines"]:
        name, overrides = LINES[line]
        row = {"line": line, "name": name, "overrides": overrides, "paper": list(PAPER[line]),
               "scores": {t: [] for t in (*TASKS, ALIGNMENT)}, "seconds": 0.0}
        for seed in range(protocol["seeds"]):
            t0 = time.perf_counter()
            model = pretrained(overrides, seed, len(tokenizer), data, protocol)
            share, results["chance"][ALIGNMENT] = alignment(model, data)
            row["scores"][ALIGNMENT].append(round(share, 5))
            for task, value in score(model, data, protocol, seed).items():
                row["scores"][task].append(round(float(value), 5))
            row["seconds"] += time.perf_counter() - t0
            log(f"{line} seed {seed}: " + ", ".join(f"{t} {row['scores'][t][-1]:.3f}" for t in (*TASKS, ALIGNMENT))
                + f" ({time.perf_counter() - t0:.1f} s)")
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
    parser.add_argument("--seeds", type=int, default=None, help="seeds per line (full: 5, small: 2)")
    parser.add_argument("--lines", default=None, help=f"comma-separated, from {','.join(LINES)}")
    parser.add_argument("--steps", type=int, default=None, help="pretraining steps (full: 600)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (COURSE_THREADS overrides)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="where the JSON results go")
    args = parser.parse_args(argv)
    from course_lib.utils import seed_everything

    seed_everything(0, threads=args.threads)
    protocol = dict(SMALL if args.small else FULL)
    if args.seeds is not None:
        if args.seeds < 1:
            parser.error(f"--seeds must be >= 1, got {args.seeds}")
        protocol["seeds"] = args.seeds
    if args.steps is not None:
        if args.steps < 1:
            parser.error(f"--steps must be >= 1, got {args.steps}")
        protocol["steps"] = args.steps
    if args.lines:
        protocol["lines"] = [line.strip() for line in args.lines.split(",") if line.strip()]
        unknown = [line for line in protocol["lines"] if line not in LINES]
        if unknown:
            parser.error(f"unknown lines {unknown}; valid lines are {','.join(LINES)}")
    command = "python benchmarks/uniter_ablation.py " + " ".join(shlex.quote(a) for a in argv)
    results = run(protocol, Path(args.out), command.strip())
    print()
    print(markdown(results))
    print(f"\nmean ± standard deviation over {protocol['seeds']} seeds; {results['total_seconds']:.0f} s; "
          f"results in {args.out}")
    print(f"reproduce: {results['command']}")
    return results


if __name__ == "__main__":
    main()
