"""Reading webdataset shards into training batches: samples/s and peak memory, with normal captions
and with one huge caption among them (the fault: a 20 MB caption took 9.5 GiB and 65 s per step).

    python benchmarks/bench_shards.py                      # 512 samples at 64 px, a 20 MB caption
    python benchmarks/bench_shards.py --samples=2048 --caption-mb=100

Each case runs in a fresh process, so its peak resident memory (``ru_maxrss``) is its own:
shard reading (``ShardDataset``, one process, no DataLoader workers), decoding, resizing to
``--image-size`` and tokenizing to ``--context-length`` tokens (``ShardBatches``), batch 64.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CORPUS = ["a red circle and a blue square", "two green triangles above a yellow circle", "one large grey square"]


def write(directory: Path, samples: int, caption_mb: float) -> None:
    """``samples`` smooth 64 px images with short captions; sample 0's caption is ``caption_mb`` MB."""
    from course_lib.data.shards import write_shards

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:64, 0:64]

    def sample(i):
        pixels = np.stack([x * 3 + i, y * 3, np.full_like(x, int(rng.integers(256)))], -1).astype(np.uint8)
        caption = CORPUS[i % len(CORPUS)]
        if i == 0 and caption_mb:
            caption = (caption + " ") * int(caption_mb * 1e6 / (len(caption) + 1))
        return {"__key__": f"{i:06d}", "jpg": pixels, "txt": caption}

    write_shards((sample(i) for i in range(samples)), directory, "bench", max_count=256)


def run_case(directory: str, image_size: int, context_length: int, batch: int) -> dict:
    """Read every sample into batches; return samples/s, the slowest batch and the peak RSS."""
    import torch

    from course_lib.data.onthefly import ShardBatches
    from course_lib.data.shards import ShardDataset
    from course_lib.features.text import train_tokenizer

    torch.set_num_threads(1)
    collate = ShardBatches(train_tokenizer(CORPUS), context_length)
    dataset = ShardDataset(directory, image_size=image_size, split_by_node=False, split_by_worker=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, collate_fn=collate)
    started, slowest, count, last = time.perf_counter(), 0.0, 0, time.perf_counter()
    for out in loader:
        now = time.perf_counter()
        slowest, last = max(slowest, now - last), now
        count += len(out["input_ids"])
    seconds = time.perf_counter() - started
    return {"samples": count, "samples_per_s": count / seconds, "slowest_batch_s": slowest,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--caption-mb", type=float, default=20.0)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--context-length", type=int, default=77)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.image_size, args.context_length, args.batch)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cases = (("short captions only", 0.0), (f"one {args.caption_mb:g} MB caption", args.caption_mb))
        for label, megabytes in cases:
            directory = Path(tmp) / f"shards-{megabytes}"
            write(directory, args.samples, megabytes)
            proc = subprocess.run([sys.executable, __file__, f"--case={directory}", f"--image-size={args.image_size}",
                                   f"--context-length={args.context_length}", f"--batch={args.batch}"],
                                  capture_output=True, text=True, check=True)
            rows.append((label, json.loads(proc.stdout.strip().splitlines()[-1])))
    print(f"\n{args.samples} samples, {args.image_size} px, {args.context_length} tokens, batch {args.batch}, 1 thread")
    print(f"{'case':>28} {'samples/s':>10} {'slowest batch':>14} {'peak RSS':>9}")
    for label, r in rows:
        print(f"{label:>28} {r['samples_per_s']:>10,.0f} {r['slowest_batch_s']:>12.2f} s {r['peak_rss_gib']:>7.2f} GiB")
    print("reproduce: python benchmarks/bench_shards.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
