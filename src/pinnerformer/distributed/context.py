"""Training on several processes with torchrun: gloo on CPU, NCCL on GPU.

Every rank holds the whole model and builds the same global batch plan from (seed, epoch, step); it encodes its own
contiguous share of the batch's examples. What the loss needs from the whole batch is either the same on every
rank by construction (the queries' labels, the negative pool drawn once per step from the step's seed, log Q, the
masks, the count-min sketch updated with the whole batch's positives) or gathered:

    item embeddings   each rank embeds its share of the batch's distinct item ids, and the shares are gathered with
                      the autograd-aware all-gather (`torch.distributed.nn.functional.all_gather`): a plain
                      `all_gather` returns tensors without a gradient path, and the other ranks' gradients for those
                      items would be silently lost
    the loss          each rank's loss is its share of the whole batch's loss (same denominator), so the shares add
                      up to the one-process loss
    gradients         summed over ranks after backward (one all-reduce per parameter), so every rank steps with
                      the gradient of the whole batch; the optimiser then runs identically everywhere

Validation, checkpoints, logs and TensorBoard run on rank 0; its validation numbers are broadcast, so every rank
takes the same early-stopping decision. A collective that waits longer than `timeout_s` (a dead rank) fails the
job; torchrun then stops the other ranks and exits non-zero; `--resume` continues from the last checkpoint with any
number of ranks.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pinnerformer.errors import PinnerformerError


@dataclass
class DistContext:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, n: int) -> slice:
        """This rank's contiguous share of n units (n a multiple of the world size)."""
        per = n // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def all_reduce_grads(self, model: torch.nn.Module) -> None:
        """Sum every parameter's gradient over the ranks (a rank's loss is its share of the batch's loss)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()
                 if p.requires_grad]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        at = 0
        for p, g in zip([p for p in model.parameters() if p.requires_grad], grads):
            n = g.numel()
            p.grad = flat[at:at + n].view_as(p).clone()
            at += n

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        out = values.detach().clone()
        dist.all_reduce(out)
        return out

    def broadcast(self, obj):
        """rank 0's object, on every rank."""
        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_embeddings(self, embed, ids: torch.Tensor) -> torch.Tensor:
        """embed(ids) for ids that are the same on every rank: each rank embeds its share, the shares are
        all-gathered with the autograd-aware all-gather, so each item's gradient reaches the rank that embedded
        it (summed over every rank's loss)."""
        from torch.distributed.nn.functional import all_gather

        n = len(ids)
        per = -(-n // self.world)  # ceil
        mine = ids[self.rank * per:(self.rank + 1) * per]
        pad = per - len(mine)
        if pad:  # equal sizes for the collective: padded with the first id, dropped after the gather
            mine = torch.cat([mine, ids[:1].expand(pad)]) if n else torch.zeros(pad, dtype=ids.dtype,
                                                                                  device=ids.device)
        parts = all_gather(embed(mine))
        return torch.cat(parts)[:n]

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def from_environment(device_name: str = "auto", timeout_s: float = 300.0) -> DistContext | None:
    """The process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), or None when this
    process runs alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    try:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=dt.timedelta(seconds=timeout_s))
    except Exception as e:  # noqa: BLE001 - a rendezvous that fails is the user's setup: say it plainly
        raise PinnerformerError(f"rank {rank} of {world}: could not join the process group: {e}") from None
    return DistContext(rank, world, device)
