"""Helper for test_pretrain.py: ``course_lib.pretrain`` runs under torchrun, their state saved.

    python -m torch.distributed.run --nproc_per_node 2 tests/_ddp_pretrain_worker.py OUT_DIR --key=value ...

Every process runs ``pretrain`` once per entry of ``VARIANTS`` (gloo on CPU, one process group
for all of them); rank 0 saves each run's losses, the parameter gradients of its last step
(DDP-averaged) and the parameters after that step to ``OUT_DIR/<variant>.pt``.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from course_lib.pretrain import parse_args, pretrain

# name -> (model options, batch options). 2 processes, global batch 8: 4 samples per process, or
# 2 per micro-batch x 2 accumulation steps. The second uses the CNN image tower: at initialisation
# the ViT's class token hardly depends on the image, all embeddings nearly coincide and the
# gradient is a small residual of cancelling terms, which float32 rounding of 2-sample
# micro-batches perturbs by ~1e-4 (1e-12 in float64); mean-pooled CNN features are well conditioned.
VARIANTS = {"micro4": ([], ["--micro_batch=4"]),
            "cnn_micro2_accum2": (["--model.vision=cnn"], ["--micro_batch=2"])}


def run_state(result) -> dict:
    """What the test compares: losses, last-step gradients, parameters after the last step."""
    named = dict(result.model.named_parameters())
    return {"losses": result.history.losses,
            "grads": {name: p.grad.detach().clone() for name, p in named.items()},
            "params": {name: p.detach().clone() for name, p in named.items()}}


def main(out_dir: str, argv: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # kept across the runs: pretrain() leaves a group it did not create
    for name, (model_args, batch_args) in VARIANTS.items():
        result = pretrain(parse_args([*argv, *model_args, *batch_args, f"--out_dir={Path(out_dir) / name}"]))
        if dist.get_rank() == 0:
            torch.save({**run_state(result), "world_size": dist.get_world_size()}, Path(out_dir) / f"{name}.pt")
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
