"""OHEM under DDP: the spawned ranks import only this module (not the test module and its data
stack), which keeps the two-process test short."""
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from segkit.training.losses import SegmentationLoss

# Each half has fewer than min_kept pixels below thresh (min_kept decides), the whole batch more.
OHEM = {"thresh": 0.3, "min_kept": 80}
WEIGHTS = [1.0, 2.0, 0.5, 1.5]


def ddp_batch():
    """A 1x1 conv (the model) and a batch of 4 with ignored pixels in two images."""
    torch.manual_seed(0)
    model = nn.Conv2d(3, 4, 1)
    x = torch.randn(4, 3, 8, 8)
    target = torch.randint(0, 4, (4, 8, 8))
    target[1, :3] = 255
    target[2, :, :5] = 255
    return model, x, target


def loss_and_grads(model, x, target):
    model.zero_grad()
    loss = SegmentationLoss(class_weights=WEIGHTS, ohem=OHEM)(model(x), target)[0]
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def ohem_worker(rank, world_size, port, out_dir):
    """Rank r trains on images 2r, 2r + 1 of the batch; saves its loss and the averaged gradients."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    try:
        model, x, target = ddp_batch()
        half = slice(2 * rank, 2 * rank + 2)
        loss, grads = loss_and_grads(DistributedDataParallel(model), x[half], target[half])
        torch.save({"loss": loss, "grads": grads}, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
