"""12-in-1's claim on ShapeWorld: one multi-task ViLBERT against one model per task, on every task, over seeds.

For each seed: pretrain ViLBERT (MLM + MRC-kl + ITM, 12-in-1's overlap masking) on the same scenes as
notebook 14, then fine-tune copies of it (``course_lib.evaluate.multitask.compare_multitask``): one on the four
tasks at once (retrieval, VQA, grounding, NLVR-like; round-robin with dynamic stop-and-go) and one per task,
the same iterations. Seed 0 is what the notebook runs live; its numbers must equal the committed ones.

    python benchmarks/vilbert_multitask.py                 # the notebook's protocol, 3 seeds -> results/vilbert_multitask.json
    python benchmarks/vilbert_multitask.py --small --seeds=1 --out=/tmp/x.json   # a few steps (the test)
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date
from pathlib import Path

import torch

from course_lib.utils import git_commit

ROOT = Path(__file__).resolve().parent.parent
# The notebook's RUN["cpu"] (notebooks_src/14_vilbert_12in1.py): change both together.
PROTOCOL = dict(dim=64, heads=4, layers=2, text_only_layers=1, image_dim=64, image_heads=4, bi_dim=64, bi_heads=4,
                mlp_ratio=2.0, pretrain_scenes=1000, pool_scenes=800, train_per_task=400, val_per_task=40,
                test_per_task=60, steps=200, batch_size=64, lr=2e-3, iterations=60, task_batch=64, task_lr=1e-3,
                eval_every=10)
SMALL = dict(PROTOCOL, pretrain_scenes=60, pool_scenes=200, train_per_task=40, val_per_task=10, test_per_task=12,
             steps=3, batch_size=16, iterations=2, task_batch=8, eval_every=1)
MODEL_KEYS = ("dim", "heads", "layers", "text_only_layers", "image_dim", "image_heads", "bi_dim", "bi_heads",
              "mlp_ratio")


def setup(run: dict):
    """``(world, tokenizer, data)``: notebook 14's world (1-2 objects), tokenizer and task data."""
    from course_lib.data import ShapeWorld, WorldConfig
    from course_lib.data.datasets import build_tokenizer
    from course_lib.data.multitask import shapeworld_multitask

    world = ShapeWorld(WorldConfig(min_objects=1, max_objects=2, seed=0))
    tokenizer = build_tokenizer(world, vocab_size=128, num_scenes=300)
    data = shapeworld_multitask(world, tokenizer, 20, 6, run["pretrain_scenes"], run["pool_scenes"],
                                run["train_per_task"], run["val_per_task"], run["test_per_task"])
    return world, tokenizer, data


def pretrain(run: dict, tokenizer, data: dict, seed: int = 0, device=None, **overrides):
    """ViLBERT of ``run``'s sizes pretrained on ``data["pretrain"]`` -> ``(model, history)`` (the notebook's
    section 3 for seed 0)."""
    from course_lib.evaluate.region_tasks import batch_sampler
    from course_lib.models.registry import build_model
    from course_lib.train import TrainConfig, train

    torch.manual_seed(seed)
    model = build_model("vilbert", "cpu-tiny", vocab_size=len(tokenizer), context_length=20,
                        **{k: run[k] for k in MODEL_KEYS}, **overrides)
    history = train(model, batch_sampler(data["pretrain"], run["batch_size"], seed),
                    TrainConfig(steps=run["steps"], lr=run["lr"], warmup_steps=min(20, run["steps"]), seed=seed,
                                progress=False, log_every=0, device=device))
    return model.cpu().eval(), history


def budget(run: dict):
    from course_lib.evaluate.multitask import MultiTaskBudget

    return MultiTaskBudget(iterations=run["iterations"], batch_size=run["task_batch"], lr=run["task_lr"],
                           warmup=min(10, run["iterations"]), eval_every=run["eval_every"])


def one_seed(run: dict, tokenizer, data: dict, seed: int) -> dict:
    from course_lib.evaluate.multitask import compare_multitask

    model, _ = pretrain(run, tokenizer, data, seed)
    return compare_multitask(model, data["train"], data["val"], data["test"], data["num_answers"], budget(run), seed)


def chance(data: dict) -> dict:
    """What a model without information scores on each task's test rows."""
    from course_lib.evaluate import grounding_chance

    test, train = data["test"], data["train"]
    majority = torch.bincount(train["vqa"]["answers"]).argmax()
    true_share = test["nlvr"]["label"].float().mean().item()
    return {"retrieval": 1 / len(test["retrieval"]["input_ids"]),
            "vqa": (test["vqa"]["answers"] == majority).float().mean().item(),
            "grounding": grounding_chance(test["grounding"]), "nlvr": max(true_share, 1 - true_share)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a few steps on a few scenes (for the tests)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vilbert_multitask.json"))
    args = parser.parse_args(argv)
    from course_lib.utils import seed_everything

    seed_everything(0, threads=2)
    run = SMALL if args.small else PROTOCOL
    start = time.perf_counter()
    _, tokenizer, data = setup(run)
    seeds = []
    for seed in range(args.seeds):
        seeds.append(one_seed(run, tokenizer, data, seed))
        print(f"seed {seed}: {json.dumps(seeds[-1])}  ({time.perf_counter() - start:.0f} s)", flush=True)
    tasks = list(seeds[0]["multi"])
    results = {"command": "python benchmarks/vilbert_multitask.py" + (" --small" if args.small else "")
               + f" --seeds={args.seeds}", "commit": git_commit(), "date": date.today().isoformat(),
               "total_seconds": round(time.perf_counter() - start, 1), "protocol": run, "tasks": tasks,
               "multi": {t: [s["multi"][t] for s in seeds] for t in tasks},
               "single": {t: [s["single"][t] for s in seeds] for t in tasks},
               "multi_steps": {t: [s["multi_steps"][t] for s in seeds] for t in tasks},
               "chance": chance(data), "dropped": data["dropped"],
               "rows": {split: {t: len(data[split][t]["input_ids"]) for t in tasks} for split in ("train", "val", "test")}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out} in {results['total_seconds']:.0f} s")
    return results


if __name__ == "__main__":
    main()
