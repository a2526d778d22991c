"""Checkpoints: `step-N/` and `FINAL/` directories that transformers loads directly.

Each holds tokenizer files, config.json, generation_config.json, model.safetensors, optimizer.pt,
scheduler.pt and metrics.json. A directory is written under a temporary name, flushed, and renamed
into place, so a `step-N` or `FINAL` name never points at a half-written checkpoint.
"""
import json
import os
import pathlib
import shutil

import torch


def _fsync_tree(path: pathlib.Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(directory: pathlib.Path, accelerator, model, tokenizer, optimizer, scheduler,
                    metrics: dict) -> None:
    """Called on every rank (gathering the weights is collective); rank 0 writes."""
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        tmp = directory.with_name(f".tmp-{directory.name}")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        _fsync_tree(tmp)
        if directory.exists():
            _replace_dir(tmp, directory)
        else:
            os.replace(tmp, directory)
    accelerator.wait_for_everyone()


def _replace_dir(new: pathlib.Path, old: pathlib.Path) -> None:
    """Swap a finished directory in for an existing one; the old one goes only once the new is in place."""
    aside = old.with_name(f".old-{old.name}")
    os.replace(old, aside)
    os.replace(new, old)
    shutil.rmtree(aside)
