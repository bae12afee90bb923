"""Calibration of ShapeWorld's difficulty against the cpu-tiny model size: how well a tiny two-tower
(CLIP-style) model retrieves held-out scenes after a fixed CPU training budget.

    python benchmarks/calibrate_two_tower.py [--steps 220] [--vision vit] [--captions description] [--threads 2]

Trains course_lib's CLIP at the cpu-tiny preset (ViT with 4 px patches + a 2-layer causal text
transformer, width 64) on 20,000 training scenes, then ranks 1,000 held-out (val) scenes against their
descriptions. A retrieved image is a hit when its description equals the query's (two scenes can
share one). Prints recall, the chance level, the training wall time and steps/s.
"""

import argparse
import os
import platform
import time

import torch

from course_lib.data import ShapeWorld, WorldConfig
from course_lib.data.datasets import Collator, ImageTextDataset, StepBatches, build_tokenizer
from course_lib.evaluate import chance_recall_at_k, recall_at_k
from course_lib.features.text import encode
from course_lib.models.clip import CLIP, CLIPConfig
from course_lib.train import TrainConfig, train
from course_lib.utils import seed_everything


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=220)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--vision", default="vit", choices=["vit", "cnn"])
    parser.add_argument("--captions", default="description", choices=["description", "grammar"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    seed_everything(args.seed, threads=args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    world = ShapeWorld(WorldConfig())
    tokenizer = build_tokenizer(world)
    train_set = ImageTextDataset(world, "train", size=20000, captions=args.captions)
    val_set = ImageTextDataset(world, "val", size=1000)
    model = CLIP(CLIPConfig.from_preset("cpu-tiny", vocab_size=len(tokenizer), vision=args.vision))
    batches = StepBatches(train_set, Collator(tokenizer, caption="random"), args.batch_size, seed=args.seed)
    config = TrainConfig(steps=args.steps, lr=args.lr, warmup_steps=args.steps // 10, weight_decay=0.1,
                         progress=False, log_every=0, seed=args.seed)
    start = time.perf_counter()
    train(model, batches, config)
    seconds = time.perf_counter() - start

    model.eval()
    descriptions = [s.description for s in val_set.scenes]
    tokens = encode(tokenizer, descriptions)
    sim = model.similarity(val_set.all_images(), tokens["input_ids"], tokens["attention_mask"])
    positives = torch.tensor([[a == b for b in descriptions] for a in descriptions])
    recall = recall_at_k(sim, positives, ks=(1, 5))
    chance = chance_recall_at_k(positives, k=(1, 5))
    print(f"machine: {platform.machine()}, {args.threads} threads, torch {torch.__version__}")
    print(f"CLIP cpu-tiny ({args.vision}), captions={args.captions}, batch {args.batch_size}, lr {args.lr}, "
          f"seed {args.seed}: {args.steps} steps in {seconds:.1f} s ({args.steps / seconds:.2f} steps/s)")
    for key in ("t2i_R@1", "t2i_R@5", "i2t_R@1", "i2t_R@5"):
        print(f"  {key}: {recall[key]:.3f}   (chance {chance[key]:.4f})")
    print(f"reproduce: python benchmarks/calibrate_two_tower.py --steps {args.steps} --vision {args.vision} "
          f"--captions {args.captions} --threads {args.threads} --seed {args.seed}")


if __name__ == "__main__":
    main()
