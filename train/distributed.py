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


def full_state_dict(model) -> dict:
    """The whole model's state dict, on CPU, on rank 0 (other ranks get an empty dict), gathered from
    every rank when the weights are sharded (FSDP, FSDP2); wrapper prefixes such as DDP's `module.`
    removed. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
