"""Optimization: the optimizer a config names, its learning-rate schedule, and the run's step count."""
import inspect
import math

import torch


def count_steps(cfg, batches_per_epoch: int) -> int:
    """Optimizer steps in the run (rollouts, for PPO): n_examples worth of batches if set, else n_epochs epochs."""
    if cfg.n_examples is not None:
        return cfg.n_examples // cfg.model.batch_size
    return cfg.n_epochs * batches_per_epoch


def lr_lambda(total_steps: int, warmup: float, schedule: str):
    """Linear warmup over the first `warmup` fraction of steps, then the schedule down towards 0."""
    warmup_steps = round(warmup * total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "linear":
            return 1.0 - progress
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor


def make_optimizer(cfg, params, sharded: bool = False) -> torch.optim.Optimizer:
    """`cfg.optimizer` (a torch.optim class that config.OPTIMIZERS allows) over `params`: tensors, or
    parameter groups (dicts) that may set their own `lr` and carry their own `max_grad_norm`.
    `sharded`: the parameters are FSDP2's DTensors, which the fused kernels do not take."""
    optimizer_class = getattr(torch.optim, cfg.optimizer)
    accepted = inspect.signature(optimizer_class).parameters
    options = {"weight_decay": cfg.weight_decay} if "weight_decay" in accepted else {}
    # The fused kernel (Adam, AdamW, SGD, Adagrad) is several times faster, on CPU too.
    if "fused" in accepted and not sharded:
        options["fused"] = True
    return optimizer_class(params, lr=cfg.lr, **options)
