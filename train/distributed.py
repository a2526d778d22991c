"""Distributed: the Accelerator, and reductions over ranks."""
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object


def make_accelerator() -> Accelerator:
    """DDP on GPUs, gloo DDP on CPU (under torchrun or `accelerate launch --multi_gpu`), or one process."""
    return Accelerator(cpu=not torch.cuda.is_available(), step_scheduler_with_optimizer=False)


def all_reduce_sum(accelerator: Accelerator, tensor: torch.Tensor) -> torch.Tensor:
    if accelerator.num_processes == 1:
        return tensor
    return accelerator.reduce(tensor.to(accelerator.device), reduction="sum").cpu()


def gather(accelerator: Accelerator, obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if accelerator.num_processes == 1:
        return [obj]
    return gather_object([obj])


def broadcast(accelerator: Accelerator, obj):
    """Rank 0's `obj` on every rank."""
    if accelerator.num_processes == 1:
        return obj
    return broadcast_object_list([obj], from_process=0)[0]
