"""Distributed: the Accelerator, reductions over ranks, FSDP2 sharding (`distributed=fsdp`) and DeepSpeed
ZeRO through accelerate (`distributed=deepspeed`)."""
import contextlib
import os

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object


def _launched_with(variable: str) -> bool:
    """Whether `accelerate launch` set this flag (ACCELERATE_USE_FSDP, ACCELERATE_USE_DEEPSPEED)."""
    return os.environ.get(variable, "").lower() in ("1", "true", "yes")


def make_accelerator(cfg) -> Accelerator:
    """DDP on GPUs, gloo DDP on CPU (under torchrun or `accelerate launch --multi_gpu`), or one process.
    distributed=deepspeed builds its engine in the trainer (`deepspeed_engine`) on this process group."""
    from train.errors import ConfigError
    if _launched_with("ACCELERATE_USE_FSDP"):  # on CPU accelerate's plugin would silently fall back to DDP
        raise ConfigError("launched with accelerate's FSDP plugin (ACCELERATE_USE_FSDP is set): launch with a plain "
                          "multi-GPU config (config/accelerate/multi_gpu.yaml) and set distributed=fsdp to shard the "
                          "model")
    if _launched_with("ACCELERATE_USE_DEEPSPEED") and cfg.distributed != "deepspeed":
        raise ConfigError(f"launched with a DeepSpeed config (ACCELERATE_USE_DEEPSPEED is set) but "
                          f"distributed={cfg.distributed}: set distributed=deepspeed")
    return Accelerator(cpu=not torch.cuda.is_available(), step_scheduler_with_optimizer=False)


def shut_down() -> None:
    """At the end of a process's runs: every rank done, then the process group closed, so that no rank
    exits with the group's threads still running while another is at its last collective (a rank
    aborting at exit with "terminate called without an active exception")."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


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
    if is_deepspeed(model):
        return deepspeed_state_dict(model)
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ------------------------------------------------------------------------------- FSDP2

def is_sharded(module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(module, FSDPModule)


def _ensure_process_group(device) -> None:
    """One process, not started by torchrun: a group of one, on an in-process store (no port to collide
    with another run on the machine)."""
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1,
                                             store=torch.distributed.HashStore())


def shard(model, device, compute_dtype: torch.dtype):
    """FSDP2 (torch's `fully_shard`): each decoder block (the classes the model names in
    `_no_split_modules`) is a unit, then the root. Parameters stay in their loaded dtype (the fp32
    master copy); `compute_dtype` bf16 computes in bf16 and reduces gradients in fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    _ensure_process_group(device)
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
    """No gradient all-reduce inside this block (all but the last microbatch of a step). DeepSpeed's
    engine reduces when it steps (ZeRO-2/3 reduce-scatter as they go, as they must)."""
    if any(is_deepspeed(m) for m in modules):
        yield
    elif any(is_sharded(m) for m in modules):
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


def backward(accelerator, model, loss: torch.Tensor) -> None:
    if is_deepspeed(model):  # accelerate's backward would also step the engine
        model.backward(loss, scale_wrt_gas=False)
    else:
        accelerator.backward(loss)


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
    if isinstance(obj, torch.optim.Optimizer) and is_deepspeed(modules[0]):
        return _deepspeed_optimizer_state(modules[0], obj)
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
    if isinstance(obj, torch.optim.Optimizer) and is_deepspeed(modules[0]):
        _load_deepspeed_optimizer_state(modules[0], obj, state)
    elif isinstance(obj, torch.optim.Optimizer):
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


# ------------------------------------------------------------------------------- DeepSpeed ZeRO
# The engine keeps fp32 master weights and optimizer state in flat partitions; these turn them into
# (and back from) the whole, name-keyed states the other engines save, so checkpoints move between
# DeepSpeed, DDP and FSDP and between world sizes.

def deepspeed_engine(cfg, accelerator, model, optimizer):
    """DeepSpeed's engine over `model` and `optimizer`, on the launcher's process group. The ZeRO stage and
    offload come from the accelerate DeepSpeed config it was launched with (ZeRO-3 if none); the run
    config sets batch sizes, clipping and bf16, which DeepSpeed's config would otherwise."""
    import deepspeed
    from accelerate import DeepSpeedPlugin

    from train.errors import ConfigError
    from train.models import resolve_dtype
    plugin = accelerator.state.deepspeed_plugin or DeepSpeedPlugin(
        zero_stage=None if _launched_with("ACCELERATE_USE_DEEPSPEED") else 3)
    m, world = cfg.model, accelerator.num_processes
    config = plugin.deepspeed_config | dict(
        train_batch_size=m.batch_size, gradient_accumulation_steps=m.gradient_accumulation_steps,
        train_micro_batch_size_per_gpu=m.batch_size // (world * m.gradient_accumulation_steps),
        gradient_clipping=m.max_grad_norm, fp16={"enabled": False},
        bf16={"enabled": accelerator.device.type == "cuda" and resolve_dtype(m.dtype) == torch.bfloat16},
        managed_gradient_accumulation=False,  # backward() accumulates; step() reduces, clips and updates
        zero_allow_untested_optimizer=True)
    if not config.get("zero_optimization", {}).get("stage"):
        raise ConfigError("distributed=deepspeed: the DeepSpeed config has ZeRO stage 0, which is DDP; use "
                          "distributed=ddp, or ZeRO stage 1, 2 or 3")
    auto = [key for key, value in config.items() if value == "auto"]
    auto += [f"zero_optimization.{k}" for k, v in config.get("zero_optimization", {}).items() if v == "auto"]
    if auto:
        raise ConfigError(f"the DeepSpeed config leaves {', '.join(auto)} as auto, which only accelerate's own "
                          f"training loop fills in: give numbers")
    _ensure_process_group(accelerator.device)
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed reads it, as long as the engine runs: a process
    # without a launcher is rank 0
    engine, *_ = deepspeed.initialize(model=model.to(accelerator.device), optimizer=optimizer, config=config,
                                      dist_init_required=False)
    return engine


def is_deepspeed(module) -> bool:
    return type(module).__name__ == "DeepSpeedEngine"


def zero_stage(module) -> int:
    return module.zero_optimization_stage() if is_deepspeed(module) else 0


def _gathered(params: list, modifier_rank=None):
    """ZeRO-3's partitioned parameters gathered whole inside the block (a no-op below stage 3)."""
    import deepspeed
    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def deepspeed_state_dict(engine) -> dict:
    """The whole model's state dict on rank 0 ({} elsewhere), trained parameters from the fp32 master
    copy (what resumes exactly), frozen ones as they are. Collective."""
    from deepspeed.utils import safe_get_full_fp32_param
    whole, rank0 = {}, torch.distributed.get_rank() == 0
    for name, tensor in engine.module.state_dict(keep_vars=True).items():
        value = safe_get_full_fp32_param(tensor) if tensor.requires_grad else None
        if value is None:
            with _gathered([tensor] if hasattr(tensor, "ds_id") else []):
                value = tensor.detach().clone()
        if rank0:
            whole[name] = value.cpu()
    return whole


@contextlib.contextmanager
def writable_weights(model):
    """Inside the block, `unwrapped(model)`'s weights can be loaded whole; on leaving, what was loaded
    is what the engine trains (its partitions and fp32 master copy). Every rank must load the same."""
    if not is_deepspeed(model):
        yield
        return
    from deepspeed.utils import safe_set_full_fp32_param
    params = list(model.module.parameters())
    with _gathered(params, modifier_rank=0):
        yield
        for p in params:
            if p.requires_grad:
                safe_set_full_fp32_param(p, p.data)


def _partitions(engine) -> list:
    """This rank's flat fp32 partitions, which the torch optimizer steps and keys its state by."""
    zero = engine.optimizer
    return getattr(zero, "fp32_partitioned_groups_flat", None) or zero.single_partition_of_fp32_groups


def _deepspeed_optimizer_state(engine, optimizer) -> dict:
    """The state of `optimizer` (the torch optimizer the engine steps over its flat partitions) in torch's
    whole, name-keyed form, as `gather_state` saves it for the other engines. Collective."""
    from deepspeed.utils import safe_get_full_optimizer_state
    flat = [optimizer.state[p] for p in _partitions(engine) if p in optimizer.state]
    keys = [k for k in (flat[0] if flat else {}) if k != "step"]
    names, state = [], {}
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            names.append(f"0.{name}")
            if flat:
                state[f"0.{name}"] = {"step": flat[0]["step"].clone(),
                                      **{k: safe_get_full_optimizer_state(p, k).cpu() for k in keys}}
    groups = [{k: v for k, v in group.items() if k != "params"} | {"params": names}
              for group in optimizer.param_groups[:1]]
    return {"state": state, "param_groups": groups}


def _load_deepspeed_optimizer_state(engine, optimizer, saved: dict) -> None:
    from deepspeed.utils import safe_set_full_optimizer_state
    for group in optimizer.param_groups:
        group.update({k: v for k, v in saved["param_groups"][0].items() if k not in ("params", "fused", "foreach")})
    if not saved["state"]:
        return
    first = next(iter(saved["state"].values()))
    for flat in _partitions(engine):  # a fresh optimizer has no state yet to write into
        optimizer.state[flat].update({k: first[k].clone() if k == "step" else torch.zeros_like(flat) for k in first})
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            for key, value in saved["state"][f"0.{name}"].items():
                if key != "step":
                    safe_set_full_optimizer_state(p, value.to(p.device), key)
