"""Distributed: the Accelerator, reductions over ranks, and FSDP2 sharding (`distributed=fsdp`)."""
import contextlib
import os

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object


# What `accelerate launch` sets for its own FSDP plugin or a DeepSpeed config: this trainer shards with
# torch's FSDP2 itself (distributed=fsdp), and on CPU accelerate would silently fall back to DDP.
ACCELERATE_ENGINES = {"ACCELERATE_USE_FSDP": "accelerate's FSDP plugin", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed"}


def make_accelerator() -> Accelerator:
    """DDP on GPUs, gloo DDP on CPU (under torchrun or `accelerate launch --multi_gpu`), or one process."""
    from train.errors import ConfigError
    for variable, engine in ACCELERATE_ENGINES.items():
        if os.environ.get(variable, "").lower() in ("1", "true", "yes"):
            raise ConfigError(f"launched with {engine} ({variable} is set): launch with a plain multi-GPU config "
                              f"(config/accelerate/multi_gpu.yaml) and set distributed=fsdp to shard the model")
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


# ------------------------------------------------------------------------------- FSDP2

def is_sharded(module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(module, FSDPModule)


def shard(model, device, compute_dtype: torch.dtype):
    """FSDP2 (torch's `fully_shard`): each decoder block (the classes the model names in
    `_no_split_modules`) is a unit, then the root. Parameters stay in their loaded dtype (the fp32
    master copy); `compute_dtype` bf16 computes in bf16 and reduces gradients in fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    if not torch.distributed.is_initialized():  # one process, not started by torchrun: a group of one,
        # on an in-process store (no port to collide with another run on the machine)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1,
                                             store=torch.distributed.HashStore())
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    for module in list(model.modules())[1:]:
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(model.to(device), mesh=mesh, mp_policy=policy)
    return model


@contextlib.contextmanager
def no_sync(accelerator, modules: list):
    """No gradient all-reduce inside this block (all but the last microbatch of a step)."""
    if any(is_sharded(m) for m in modules):
        for m in modules:
            m.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            for m in modules:
                m.set_requires_gradient_sync(True)
    else:
        with contextlib.ExitStack() as stack:
            for m in modules:
                stack.enter_context(accelerator.no_sync(m))
            yield


def clip_grad_norm(accelerator, params: list, max_norm: float) -> torch.Tensor:
    """Clip to `max_norm`; the total norm over all ranks' shards when the gradients are sharded (DTensors)."""
    from torch.distributed.tensor import DTensor
    if any(isinstance(p, DTensor) for p in params):
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm
    return accelerator.clip_grad_norm_(params, max_norm)


def gather_state(obj, modules: list):
    """A state to save: whole (gathered from every rank's shards, on CPU, on rank 0) for a model or an
    optimizer, keyed by parameter names so it loads on any number of ranks; else `obj.state_dict()`.
    Collective."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if isinstance(obj, torch.optim.Optimizer):
        return get_optimizer_state_dict(torch.nn.ModuleList(modules), obj, options=options)
    if isinstance(obj, torch.nn.Module):
        return get_model_state_dict(obj, options=options)
    return obj.state_dict()


@contextlib.contextmanager
def _own_kernels(optimizer):
    """Keep this run's kernel choice (fused kernels take no sharded parameters) over a loaded checkpoint's."""
    kernels = [{k: group[k] for k in ("fused", "foreach") if k in group} for group in optimizer.param_groups]
    yield
    for group, kernel in zip(optimizer.param_groups, kernels):
        group.update(kernel)


def load_state(obj, state: dict, modules: list) -> None:
    """Load what `gather_state` saved, into sharded or whole modules and optimizers alike."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=any(is_sharded(m) for m in modules))
    if isinstance(obj, torch.optim.Optimizer):
        with _own_kernels(obj):
            if state["state"]:
                set_optimizer_state_dict(torch.nn.ModuleList(modules), obj, optim_state_dict=state, options=options)
            else:  # stateless (plain SGD): torch's loader can't place an empty state; the hyperparameters only
                for group, saved in zip(obj.param_groups, state["param_groups"]):
                    group.update({k: v for k, v in saved.items() if k != "params"})
    elif isinstance(obj, torch.nn.Module) and is_sharded(obj):
        set_model_state_dict(obj, state, options=options)
    else:
        obj.load_state_dict(state)


def load_model_state(model, weights: dict) -> tuple[list, list]:
    """`model.load_state_dict(weights, strict=False)`, or its sharded equivalent: (missing, unexpected)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        return set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    return model.load_state_dict(weights, strict=False)


def my_chunks(items: list, size: int, accelerator, sharded: bool) -> list[tuple[list, bool]]:
    """This rank's share of `items` (every world-th), in chunks of `size`, as (chunk, real) pairs.
    A sharded model runs collectives in every forward, so then every rank runs as many chunks as the
    busiest one: a rank with fewer runs copies of the first item (real=False: drop their results)."""
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = items[rank::world]
    chunks = [(mine[i:i + size], True) for i in range(0, len(mine), size)]
    if sharded and world > 1:
        counts = torch.zeros(world)
        counts[rank] = len(chunks)
        most = int(all_reduce_sum(accelerator, counts).max())
        chunks += [(items[:1], False)] * (most - len(chunks))
    return chunks


def save_shards(path, model, modules: list, optimizer) -> None:
    """checkpoint_format=sharded: every rank writes its own shard of the weights and the optimizer state
    (torch.distributed.checkpoint, in parallel); read back on any number of ranks by `load_shards`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    dcp.save({"model": get_model_state_dict(model),
              "optimizer": get_optimizer_state_dict(torch.nn.ModuleList(modules), optimizer)}, checkpoint_id=path)


def load_shards(path, model, modules: list, optimizer) -> None:
    """Load `save_shards`' files, resharded to this run's ranks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    group = torch.nn.ModuleList(modules)
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(group, optimizer)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    with _own_kernels(optimizer):
        set_optimizer_state_dict(group, optimizer, state["optimizer"])
