"""ERNIE-ViL's claim (Yu et al. 2021, Table 5), tested on ShapeWorld: scene-graph prediction against
plain random MLM, at equal steps, on the fine-grained tasks.

Two arms of the same model (``build_model("ernie_vil", ...)``), pretrained for the same number of steps
on the same scenes and captions, then fine-tuned the same way (``course_lib.evaluate.fine_grained``):

- ``sgp``: ERNIE-ViL, random MLM + object, attribute and relation prediction (30% of each kind of
  node masked, BERT's 80/10/10), MRC-kl, ITM;
- ``mlm``: the same with ``object_weight=attribute_weight=relation_weight=0``: plain random MLM (15%),
  MRC-kl, ITM (ViLBERT).

Scores: VQA accuracy per question type after VQA fine-tuning (chance: the type's most frequent
training answer), near-miss ranking per kind (object, attribute, relation; chance 0.5) and retrieval
R@1 after ITM fine-tuning. Several seeds; mean ± standard deviation.

    python benchmarks/ernie_vil_claim.py                  # 2 arms x 3 seeds (~10 min on 1 idle core)
    python benchmarks/ernie_vil_claim.py --seeds 5
    python benchmarks/ernie_vil_claim.py --small --out /tmp/claim.json   # a few steps (the test suite)

Writes the results (every seed's scores, the chance levels, the protocol, the command, the commit) as
JSON to ``--out`` (default ``benchmarks/results/ernie_vil_claim.json``, which notebook 16 loads) and
prints a markdown table.
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
sys.path.insert(0, str(ROOT / "benchmarks"))
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "ernie_vil_claim.json"
SGP_OFF = dict(object_weight=0.0, attribute_weight=0.0, relation_weight=0.0)
ARMS = {"sgp": ("ERNIE-ViL: MLM + scene-graph prediction", {}), "mlm": ("plain random MLM (ViLBERT)", SGP_OFF)}
# The protocol: notebook 16's cpu scale.
FULL = dict(steps=400, batch_size=64, lr=2e-3, warmup_steps=20, retrieval_steps=60, vqa_steps=200,
            finetune_batch_size=64, train_scenes=2000, val_scenes=200, qa_scenes=600, retrieval_pairs=100, seeds=3)
SMALL = dict(FULL, steps=4, retrieval_steps=3, vqa_steps=3, finetune_batch_size=16, batch_size=16, train_scenes=48,
             val_scenes=24, qa_scenes=24, retrieval_pairs=8, seeds=2)
WORLD = dict(min_objects=2, max_objects=2, seed=0)
MODEL_SIZE = dict(layers=1, text_only_layers=0, image_dim=64, bi_dim=64, mlp_ratio=2.0)
CONTEXT, MAX_REGIONS, VOCAB = 20, 4, 192


def build_data(protocol: dict):
    """(tokenizer, FineGrainedData) of the protocol's world."""
    from course_lib.data import ShapeWorld, WorldConfig
    from course_lib.data.datasets import build_tokenizer
    from course_lib.evaluate.fine_grained import shapeworld_fine_grained_tasks

    world = ShapeWorld(WorldConfig(**WORLD))
    tokenizer = build_tokenizer(world, vocab_size=VOCAB, num_scenes=300)
    data = shapeworld_fine_grained_tasks(world, tokenizer, CONTEXT, MAX_REGIONS, protocol["train_scenes"],
                                         protocol["val_scenes"], protocol["qa_scenes"], protocol["retrieval_pairs"])
    return tokenizer, data


def pretrained(overrides: dict, seed: int, vocab_size: int, data, protocol: dict):
    """ERNIE-ViL with ``overrides``, pretrained on ``data.pretrain`` for the protocol's steps -> (model, history)."""
    from course_lib.evaluate.region_tasks import batch_sampler
    from course_lib.models.registry import build_model
    from course_lib.train import TrainConfig, train

    torch.manual_seed(seed)
    model = build_model("ernie_vil", "cpu-tiny", vocab_size=vocab_size, context_length=CONTEXT, **MODEL_SIZE,
                        **overrides)
    history = train(model, batch_sampler(data.pretrain, protocol["batch_size"], seed),
                    TrainConfig(steps=protocol["steps"], lr=protocol["lr"],
                                warmup_steps=min(protocol["warmup_steps"], protocol["steps"]), seed=seed,
                                progress=False, log_every=0, device="cpu"))
    return model.cpu().eval(), history


def score(model, data, protocol: dict, seed: int) -> dict:
    from course_lib.evaluate.fine_grained import fine_grained_scores
    from course_lib.evaluate.region_tasks import FinetuneBudget

    budget = FinetuneBudget(retrieval_steps=protocol["retrieval_steps"], vqa_steps=protocol["vqa_steps"],
                            batch_size=protocol["finetune_batch_size"], lr=protocol["lr"], warmup_steps=10)
    return fine_grained_scores(model, data, budget, seed=seed, device="cpu")


def markdown(results: dict) -> str:
    """One row per score, one column per arm (mean ± std over the seeds), and the chance level."""
    names = list(results["chance"])
    arms = results["arms"]
    out = ["| score | " + " | ".join(a["name"] for a in arms) + " | chance |", "|---|" + "---|" * (len(arms) + 1)]
    for name in names:
        out.append(f"| {name} | " + " | ".join(mean_spread(a["scores"][name]) for a in arms)
                   + f" | {results['chance'][name]:.3f} |")
    return "\n".join(out)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="a few steps on a few scenes (tests)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per arm (default 3; --small: 2)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    protocol = dict(SMALL if args.small else FULL)
    if args.seeds is not None:
        if args.seeds < 1:
            parser.error("--seeds must be >= 1")
        protocol["seeds"] = args.seeds
    torch.set_num_threads(args.threads)
    from course_lib.evaluate.fine_grained import fine_grained_chance

    start = time.perf_counter()
    tokenizer, data = build_data(protocol)
    results = {"claim": "scene-graph prediction beats plain random MLM on the fine-grained tasks (Yu et al. 2021, "
                        "Table 5)",
               "protocol": protocol, "world": WORLD, "model_size": MODEL_SIZE, "chance": fine_grained_chance(data),
               "near_misses": {k: int((data.near_kinds == i).sum()) for i, k in enumerate(("object", "attribute",
                                                                                          "relation"))},
               "arms": []}
    for arm, (name, overrides) in ARMS.items():
        scores: dict[str, list[float]] = {}
        losses: dict[str, list[float]] = {}
        for seed in range(protocol["seeds"]):
            model, history = pretrained(overrides, seed, len(tokenizer), data, protocol)
            for key in ("mlm", "object", "attribute", "relation", "itm", "mrckl"):
                if history.values(key):
                    losses.setdefault(key, []).append(history.mean_last(20, key))
            for key, value in score(model, data, protocol, seed).items():
                scores.setdefault(key, []).append(value)
            print(f"{arm} seed {seed}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in scores.items()), flush=True)
        results["arms"].append({"arm": arm, "name": name, "overrides": overrides, "scores": scores,
                                "final_losses": losses})
    results.update(command="python " + " ".join(shlex.quote(a) for a in ["benchmarks/ernie_vil_claim.py",
                                                                          *(argv if argv is not None else sys.argv[1:])]),
                   commit=git_commit(), date=datetime.date.today().isoformat(), machine=platform.machine(),
                   threads=args.threads, total_seconds=round(time.perf_counter() - start, 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
