"""CLIP's design choices measured on ShapeWorld (notebook 22): the temperature clamp, the batch size
(the number of negatives) at equal samples seen, prompt templates, zero-shot against a linear probe,
and attribute binding on held-out colour-shape pairs and on swapped captions.

Each study line trains ``course_lib.models.clip.CLIP`` with ``course_lib.models.clip.fit`` on the same
number of image-caption pairs, over several seeds, and scores it with ``course_lib.evaluate.zero_shot``:

- ``batch``: batch size 16, 64, 256, each for 12,800 pairs (800, 200, 50 steps; same learning rate);
  the batch-16 lines (notebook 22's own run) are also scored for the template sets and the linear probe;
- ``clamp``: batch 16 with the logit scale learning at lr 0.1 (50x the rest), with and without CLIP's
  clamp of the scale at 100.

    python benchmarks/clip_studies.py                     # the full study: 5 lines x 3 seeds (~10 min, 1 core)
    python benchmarks/clip_studies.py --small --out /tmp/clip.json   # a few steps (the test suite)

Writes every seed's scores, the scale curves, the protocol, the command and the commit as JSON to
``--out`` (default ``benchmarks/results/clip_studies.json``, which notebook 22 loads) and prints the
tables, mean ± standard deviation over the seeds.
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
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "clip_studies.json"

# The protocol: notebook 22's cpu scale.
HELD_OUT = (("red", "circle"), ("green", "square"), ("blue", "triangle"))
WORLD = dict(image_size=32, held_out=HELD_OUT, seed=0)
MODEL = dict(patch_size=8, vision_layers=1, text_layers=1, context_length=24)  # on top of preset cpu-tiny
FULL = dict(samples=12800, batch_size=16, lr=2e-3, weight_decay=0.1, warmup=0.1, train_scenes=6000,
            val_scenes=1500, compositional_scenes=1000, retrieval_scenes=500, batch_sizes=(16, 64, 256),
            scale_lr=0.1, seeds=3)
SMALL = dict(FULL, samples=256, train_scenes=300, val_scenes=200, compositional_scenes=150, retrieval_scenes=100,
             batch_sizes=(16, 32), batch_size=16, seeds=2)
CURVE_EVERY = 5  # steps between stored points of the logit-scale curves


def build_data(protocol: dict) -> dict:
    """The protocol's world, tokenizer and datasets (rendered once, shared by every line)."""
    from course_lib.data import ShapeWorld, WorldConfig
    from course_lib.data.datasets import ImageTextDataset, build_tokenizer

    world = ShapeWorld(WorldConfig(**WORLD))
    tokenizer = build_tokenizer(world)
    sets = {split: ImageTextDataset(world, split, size=protocol[f"{name}_scenes"], captions="description")
            for split, name in (("train", "train"), ("val", "val"), ("compositional", "compositional"))}
    return {"world": world, "tokenizer": tokenizer, **sets}


def train_line(data: dict, protocol: dict, seed: int, batch_size: int, clamp: bool = True,
               scale_lr: float | None = None):
    """One CLIP trained on ``protocol["samples"]`` pairs at ``batch_size`` -> ``(model, records)``."""
    from course_lib.data.datasets import Collator, StepBatches
    from course_lib.models.clip import CLIP, CLIPConfig, fit

    torch.manual_seed(seed)
    config = CLIPConfig.from_preset("cpu-tiny", vocab_size=len(data["tokenizer"]), clamp_logit_scale=clamp, **MODEL)
    model = CLIP(config)
    steps = max(1, protocol["samples"] // batch_size)
    batches = StepBatches(data["train"], Collator(data["tokenizer"], max_length=MODEL["context_length"],
                                                  caption="first"), batch_size, seed=seed)
    records = fit(model, batches, steps, lr=protocol["lr"], warmup=int(protocol["warmup"] * steps),
                  weight_decay=protocol["weight_decay"], logit_scale_lr=scale_lr)
    return model, records


def evaluate(model, data: dict, protocol: dict, templates: bool = False) -> dict:
    """Retrieval (val and compositional), binding on swapped captions, and with ``templates`` the
    zero-shot accuracy of every template set and the linear probe."""
    from course_lib.evaluate.zero_shot import (TEMPLATES, attribute_swap, binding_accuracy, description_retrieval,
                                               embed_images, linear_probe, single_object_set, zero_shot_accuracy,
                                               zero_shot_weights)

    world, tokenizer, n = data["world"], data["tokenizer"], protocol["retrieval_scenes"]
    scores = {}
    for split in ("val", "compositional"):
        images = data[split].all_images()[:n]
        recall, _ = description_retrieval(model, tokenizer, images, [s.description for s in data[split].scenes[:n]])
        scores[f"{split} t2i R@1"], scores[f"{split} i2t R@1"] = recall["t2i_R@1"], recall["i2t_R@1"]
    swaps = [(i, attribute_swap(s)) for i, s in enumerate(data["val"].scenes)]
    swaps = [(i, text) for i, text in swaps if text is not None]
    keep = [i for i, _ in swaps]
    scores["binding"] = binding_accuracy(model, tokenizer, data["val"].all_images()[keep],
                                         [data["val"].scenes[i].description for i in keep], [t for _, t in swaps])
    if templates:
        classes = [(c, s) for c in world.config.colors for s in world.config.shapes]  # class id order
        sets = {split: single_object_set(data[split]) for split in ("train", "val", "compositional")}
        emb = {split: (embed_images(model, images), labels) for split, (images, labels) in sets.items()}
        for name, template_set in TEMPLATES.items():
            weights = zero_shot_weights(model, tokenizer, classes, template_set)
            for split in ("val", "compositional"):
                scores[f"zero-shot {split} [{name}]"] = zero_shot_accuracy(*emb[split][:1], weights, emb[split][1])
        logits = linear_probe(*emb["train"], emb["val"][0], len(classes))
        scores["linear probe val"] = (logits.argmax(1) == emb["val"][1]).float().mean().item()
    return scores


def chance(data: dict, protocol: dict) -> dict:
    """Chance levels of every score: random rankings, the majority class, a coin for binding."""
    from course_lib.evaluate import chance_recall_at_k
    from course_lib.evaluate.zero_shot import single_object_set

    out, n = {}, protocol["retrieval_scenes"]
    for split in ("val", "compositional"):
        descriptions = [s.description for s in data[split].scenes[:n]]
        positives = torch.tensor([[a == b for b in descriptions] for a in descriptions])
        c = chance_recall_at_k(positives, k=1)
        out[f"{split} t2i R@1"], out[f"{split} i2t R@1"] = c["t2i_R@1"], c["i2t_R@1"]
        labels = single_object_set(data[split])[1]
        out[f"majority class {split}"] = labels.bincount().max().item() / len(labels)
    out["binding"] = 0.5
    out["uniform guess (18 classes)"] = 1 / data["world"].num_classes
    return out


def lines(protocol: dict) -> list[dict]:
    """The study lines: (study, name, batch size, clamp, scale lr, scored for templates?)."""
    rows = [dict(study="batch", name=f"batch {b}", batch_size=b, clamp=True, scale_lr=None,
                 templates=b == protocol["batch_size"]) for b in protocol["batch_sizes"]]
    for clamp in (True, False):
        rows.append(dict(study="clamp", name=f"scale lr {protocol['scale_lr']}, " + ("clamp at 100" if clamp else "no clamp"),
                         batch_size=protocol["batch_size"], clamp=clamp, scale_lr=protocol["scale_lr"], templates=False))
    return rows


def run(protocol: dict, out: Path, command: str, log=print) -> dict:
    start = time.perf_counter()
    data = build_data(protocol)
    results = {"command": command, "date": datetime.date.today().isoformat(), "commit": git_commit(),
               "machine": f"{platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}",
               "protocol": protocol, "world": {**WORLD, "held_out": [list(p) for p in HELD_OUT]}, "model": MODEL,
               "chance": chance(data, protocol), "rows": []}
    for line in lines(protocol):
        row = {**line, "scores": {}, "final_scale": [], "max_scale": [], "diverged": [], "scale_curves": [],
               "seconds": 0.0}
        for seed in range(protocol["seeds"]):
            t0 = time.perf_counter()
            model, records = train_line(data, protocol, seed, line["batch_size"], line["clamp"], line["scale_lr"])
            diverged = not np.isfinite(records[-1]["loss"])
            row["diverged"].append(bool(diverged))
            scales = [r["scale"] for r in records]
            row["final_scale"].append(round(scales[-1], 4))
            row["max_scale"].append(round(max(scales), 4))
            row["scale_curves"].append([round(s, 4) for s in scales[::CURVE_EVERY]])
            scores = {} if diverged else evaluate(model, data, protocol, templates=line["templates"])
            for key, value in scores.items():
                row["scores"].setdefault(key, []).append(round(float(value), 5))
            row["scores"].setdefault("final loss", []).append(round(float(np.mean([r["loss"] for r in records[-10:]])), 5))
            row["seconds"] += time.perf_counter() - t0
            log(f"{line['name']} seed {seed}: scale {scales[-1]:.1f}, " + ", ".join(
                f"{k} {v[-1]:.3f}" for k, v in row["scores"].items() if "[" not in k) + f" ({time.perf_counter() - t0:.1f} s)")
        row["seconds"] = round(row["seconds"], 1)
        results["rows"].append(row)
    results["total_seconds"] = round(time.perf_counter() - start, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    return results


def markdown(results: dict) -> str:
    """One table per study, mean ± std over the seeds, chance levels in the last line."""
    keys = ["val t2i R@1", "compositional t2i R@1", "binding", "final loss"]
    out = []
    for study in ("batch", "clamp"):
        rows = [r for r in results["rows"] if r["study"] == study]
        extra = ["final 1/τ"] if study == "clamp" else []
        out += [f"| {study} line | " + " | ".join(keys + extra) + " |", "|---" * (len(keys) + len(extra) + 1) + "|"]
        for r in rows:
            cells = [mean_spread(r["scores"][k]) if k in r["scores"] else "–" for k in keys]
            if extra:
                cells.append(mean_spread(r["final_scale"]))
            out.append(f"| {r['name']} | " + " | ".join(cells) + " |")
        c = results["chance"]
        out.append("| chance | " + " | ".join(f"{c[k]:.3f}" if k in c else "–" for k in keys) + " |" + " |" * len(extra))
        out.append("")
    main = next(r for r in results["rows"] if r["templates"])
    out += ["| scored on the batch-%d lines | val (seen classes) | compositional (held-out classes) |"
            % main["batch_size"], "|---|---|---|"]
    for key in main["scores"]:
        if key.startswith("zero-shot val ["):
            name = key[len("zero-shot val "):]
            out.append(f"| zero-shot {name} | {mean_spread(main['scores'][key])} | "
                       f"{mean_spread(main['scores']['zero-shot compositional ' + name])} |")
    out.append(f"| linear probe | {mean_spread(main['scores']['linear probe val'])} | – |")
    c = results["chance"]
    out.append(f"| majority class | {c['majority class val']:.3f} | {c['majority class compositional']:.3f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a few steps on a few scenes (the test suite)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per line (full: 3, small: 2)")
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
    command = "python benchmarks/clip_studies.py " + " ".join(shlex.quote(a) for a in argv)
    results = run(protocol, Path(args.out), command.strip())
    print()
    print(markdown(results))
    print(f"\nmean ± standard deviation over {protocol['seeds']} seeds; {results['total_seconds']:.0f} s; "
          f"results in {args.out}")
    return results


if __name__ == "__main__":
    main()
