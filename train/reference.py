"""The reference model, and its cached log-probabilities (`cache_reference_logprobs=true`).

The frozen reference model's log-probs depend only on its weights and the tokenized data, so they
are computed once, for train and eval, and stored as safetensors under
`${cache_dir}/reference_logps/<key>.safetensors`, where the key hashes the reference weights and
every token of every example (which covers the data, the chat template and the truncation
settings). Later runs and sweep jobs with the same weights and data reuse the file. Each rank
computes a shard; the shards are summed across ranks, and a value that no rank filled fails loudly.
A cache file that can't be read or lacks entries is set aside (renamed, never deleted) and recomputed.
"""
import copy
import hashlib
import logging
import os
import pathlib
import time
from contextlib import contextmanager

import torch
from safetensors.torch import load_file, save_file

from train.checkpoint import load_weights
from train.distributed import all_reduce_sum, full_state_dict, is_sharded
from train.errors import RunError

log = logging.getLogger(__name__)


def _base_weights(model):
    """(name, tensor) of the state dict without LoRA adapters, named as in the base model: a LoRA run's
    reference is its base model, so it hashes like a full fine-tune from the same weights."""
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" not in name:
            yield name.replace(".base_layer", ""), tensor.detach()


def weights_digest(model) -> str:
    """sha256 over every base weight (names included): the reference log-prob cache's key."""
    h = hashlib.sha256()
    for name, tensor in _base_weights(model):
        h.update(name.encode())
        h.update(tensor.to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def cache_path(cache_dir: str, weights: str, splits: dict) -> pathlib.Path:
    """Where the reference log-probs of these weights and token stores are cached."""
    h = hashlib.sha256(weights.encode())
    for name, store in sorted(splits.items()):
        h.update(f"{name}:{store.digest()}".encode())
    return pathlib.Path(cache_dir) / "reference_logps" / f"{h.hexdigest()[:32]}.safetensors"


def columns(item) -> int:
    """Reference values per item: one per response, plus one for a KTO mismatch."""
    return len(item.responses) + (item.mismatch is not None)


def compute(items: list, columns_fn, collate_fn, batch_size: int, accelerator) -> torch.Tensor:
    """(len(items), k) reference log-probs; each rank computes items[rank::world], then all sum."""
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = list(range(rank, len(items), world))
    values = torch.zeros(len(items), columns(items[0]), dtype=torch.float64)
    filled = torch.zeros(len(items))
    for start in range(0, len(mine), batch_size):
        index = mine[start:start + batch_size]
        values[index] = columns_fn(collate_fn([items[i] for i in index])).double().cpu()
        filled[index] = 1
    values, filled = all_reduce_sum(accelerator, values), all_reduce_sum(accelerator, filled)
    missing = (filled != 1).nonzero().flatten().tolist()
    if missing:
        raise RunError(f"reference log-probs missing for {len(missing)} example(s), e.g. index {missing[0]}")
    return values


def _read(path: pathlib.Path, splits: dict[str, list]) -> dict:
    """The cached tables, or ValueError saying why they are unusable."""
    try:
        tables = load_file(path)
    except Exception as e:  # safetensors raises its own error types for a truncated or garbled file
        raise ValueError(f"unreadable ({type(e).__name__}: {e})") from None
    for name, items in splits.items():
        table = tables.get(name)
        if table is None or tuple(table.shape) != (len(items), columns(items[0])) or torch.isnan(table).any():
            raise ValueError(f"no complete entry for every {name} example")
    return tables


def load_or_compute(path: pathlib.Path, splits: dict[str, list], columns_fn, collate_fn, batch_size: int,
                    accelerator) -> None:
    """Attach cached reference log-probs to every token store (`store.reference`), computing them if needed."""
    tables = None
    if path.exists():
        try:
            tables = _read(path, splits)
            log.info("reference log-probs: reusing %s", path)
        except ValueError as e:
            log.warning("reference log-probs: %s is %s: setting it aside and computing them again", path, e)
        # Every rank has read it before it is moved, and all agree on whether to recompute.
        if all_reduce_sum(accelerator, torch.tensor(float(tables is None))).item():
            tables = None
            if accelerator.is_main_process and path.exists():
                os.replace(path, path.with_name(f"{path.name}.corrupt-{time.time_ns()}"))
    if tables is None:
        log.info("reference log-probs: computing for %s", ", ".join(f"{len(v)} {k}" for k, v in splits.items()))
        tables = {name: compute(items, columns_fn, collate_fn, batch_size, accelerator)
                  for name, items in splits.items()}
        if accelerator.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            save_file(tables, tmp)
            os.replace(tmp, path)
        accelerator.wait_for_everyone()
    for name, store in splits.items():
        store.reference = tables[name]


class Reference:
    """The frozen model a loss compares the policy with: its own copy of the initial policy, or, under
    LoRA, the policy with its adapter switched off (no second copy). TR-DPO mixes the policy into its
    own copy every few steps (`sync`); that copy is then a checkpointed state (`state_dict`)."""

    def __init__(self, policy, use_peft: bool, device):
        self.copy = None if use_peft else copy.deepcopy(policy).requires_grad_(False).eval().to(device)

    @contextmanager
    def model(self, policy):
        """The reference as a model to run: the copy, or `policy` with its adapter off."""
        if self.copy is not None:
            yield self.copy
        else:
            with policy.disable_adapter():
                yield policy

    @torch.no_grad()
    def sync(self, policy, alpha: float) -> None:
        """TR-DPO (Gorbatovski et al. 2024): reference <- alpha * policy + (1 - alpha) * reference."""
        for model in (self.copy, policy):
            if is_sharded(model):  # FSDP2 leaves the root's parameters gathered after a forward
                model.reshard()
        for ref, new in zip(self.copy.parameters(), policy.parameters()):
            ref.mul_(1 - alpha).add_(new.detach(), alpha=alpha)

    def state_dict(self) -> dict:
        return full_state_dict(self.copy)

    def load_state_dict(self, weights: dict) -> None:
        load_weights(self.copy, weights)


def fingerprint(model) -> str:
    """A cheap identity of a model's weights (names, shapes and a strided sample of every tensor): enough to
    tell that a resumed run got another reference or reward model, without hashing billions of numbers."""
    h = hashlib.sha256()
    for name, tensor in _base_weights(model):
        flat = tensor.flatten()
        sample = flat[::max(1, flat.numel() // 4096)].to("cpu", torch.float32).contiguous()
        h.update(f"{name}{tuple(tensor.shape)}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]
