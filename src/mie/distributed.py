"""Several processes, one per GPU (or CPU process), started by ``torchrun``:

    torchrun --nproc_per_node 4 -m mie.cli train --config configs/cremad.yaml --root DIR --out runs/x

What differs from one process, for every method alike:
- each rank trains on its own shard of every epoch's shuffled training set (``train.batch_size``
  is per rank);
- every optimizer a method builds averages its parameters' gradients over the ranks just before
  each step; SAM's first pass therefore uses the rank's own gradient (no communication), its second
  pass's gradient is averaged, and GM's ∇W·T (linear in ∇W) commutes with the averaging;
- BatchNorm running statistics are averaged over the ranks after each epoch, so the ranks hold
  identical models;
- evaluation and the passes methods make between epochs (MIE's covariances, MSLR's validation)
  run on the whole split in every rank, so their results agree without communication (MIE's
  covariances taken from the training steps, ``gm_statistics="steps"``, are gathered over the
  ranks); rank 0 alone writes files and shows progress.
"""
import os

import torch
import torch.distributed as dist


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def start(device):
    """Join torchrun's process group when WORLD_SIZE > 1; returns the device this rank uses
    (cuda:LOCAL_RANK when ``device`` is CUDA)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def stop():
    """Leave the process group, if this process joined one: all ranks first meet at a barrier, so that
    none tears its connections down while another still has gloo work in flight (which can abort
    the other process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def average_gradients_before_step(optimizer):
    """Make ``optimizer.step()`` first replace each gradient by its mean over the ranks."""
    def hook(opt, args, kwargs):
        grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])      # one collective for all of them
        dist.all_reduce(flat)
        flat.div_(world_size())
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
    return optimizer.register_step_pre_hook(hook)


@torch.no_grad()
def average_buffers(model):
    """Floating-point buffers (BatchNorm running mean and variance) averaged over the ranks."""
    n = world_size()
    for b in model.buffers():
        if b.is_floating_point():
            dist.all_reduce(b)
            b.div_(n)


def from_rank0(obj):
    """Rank 0's ``obj`` (a picklable value, e.g. a metrics dict) in every rank, so that all ranks
    take the same decisions (best checkpoint) even where GPU arithmetic differs in the last bit."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
