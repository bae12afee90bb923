"""Helper for test_itc_distributed.py: one ContrastiveLoss step on this rank's slice of a batch.

Run by ``python -m torch.distributed.run --standalone --nproc_per_node 2 _itc_ddp_worker.py OUT``
(gloo, CPU); rank 0 saves every variant's loss and gradients to OUT. Imported by the test
for the single-process reference, which calls ``contrastive_step`` without a process group.
"""

import sys

import torch
import torch.distributed as dist
from torch import nn

from course_lib.objectives.itc import ContrastiveLoss

BATCH, IMAGE_DIM, TEXT_DIM, EMBED_DIM = 8, 6, 7, 5
VARIANTS = {  # name -> ContrastiveLoss flags
    "gather_with_grad": dict(gather_with_grad=True, local_loss=False),
    "gather_with_grad_local_loss": dict(gather_with_grad=True, local_loss=True),
    "plain_gather": dict(gather_with_grad=False, local_loss=False),
}


def contrastive_step(flags: dict, rank: int = 0, world_size: int = 1) -> dict:
    """Forward + backward on rows [rank * B/W, (rank + 1) * B/W) of a fixed float64 batch."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(BATCH, IMAGE_DIM, generator=g, dtype=torch.float64)
    texts = torch.randn(BATCH, TEXT_DIM, generator=g, dtype=torch.float64)
    torch.manual_seed(1)
    encoders = nn.ModuleDict({"image": nn.Linear(IMAGE_DIM, EMBED_DIM),
                              "text": nn.Linear(TEXT_DIM, EMBED_DIM)}).double()
    criterion = ContrastiveLoss(init_temperature=0.1, **flags).double()
    rows = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
    image_feats, text_feats = encoders["image"](images[rows]), encoders["text"](texts[rows])
    image_feats.retain_grad()
    text_feats.retain_grad()
    loss = criterion(image_feats, text_feats)
    loss.backward()
    params = dict(encoders.named_parameters(), logit_scale=criterion.logit_scale)
    return {"loss": loss.detach(), "image_feat_grad": image_feats.grad, "text_feat_grad": text_feats.grad,
            "param_grads": {name: p.grad for name, p in params.items()}}


def _gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    results = {}
    for name, flags in VARIANTS.items():
        step = contrastive_step(flags, rank, world_size)
        for grad in step["param_grads"].values():          # what DDP does: average over ranks
            dist.all_reduce(grad)
            grad /= world_size
        results[name] = {
            "losses": _gather_rows(step["loss"].reshape(1)),
            "image_feat_grad": _gather_rows(step["image_feat_grad"]),
            "text_feat_grad": _gather_rows(step["text_feat_grad"]),
            "param_grads": step["param_grads"],
            "world_size": world_size,
        }
    if rank == 0:
        torch.save(results, out_path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
