"""Checkpoints: `step-N/` and `FINAL/` directories that can't be half-written and resume exactly.

A checkpoint holds the tokenizer, the weights (config.json, generation_config.json and safetensors,
sharded with an index when large; a LoRA `step-N` holds the PEFT adapter instead and a LoRA `FINAL`
the merged model), the trainer's named states (optimizer.pt, scheduler.pt; v_head.pt for PPO,
reference.safetensors for TR-DPO), metrics.json, trainer_state.json (counters, data position, wandb
id, best checkpoint), rng.pt (Python, NumPy and torch RNG states of every rank), run_config.yaml (the
resolved config) and, last, MANIFEST: every file's size.

Writing goes to `.unfinished/NAME/` in the run dir; each file is flushed to disk, MANIFEST written
and flushed last, and only then is the directory renamed to NAME. Old checkpoints are moved into
`.unfinished/` before they are deleted, so a kill never leaves a partial NAME, and whatever a kill
leaves in `.unfinished/` is removed at the next start: nothing else in the run dir is ever
deleted. A reader accepts a directory only if its MANIFEST is there and every file has the recorded
size, and `read` fails with CheckpointError on anything it cannot parse, so a resume passes over a
truncated or garbled checkpoint to the one before it.
Nothing here unpickles: tensors are safetensors, `.pt` files are loaded with weights_only=True.
"""
import json
import logging
import os
import pathlib
import pickle
import re
import shutil
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from safetensors.torch import load_file

from train.errors import CheckpointError, first_line

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST"
TRAINER_STATE = "trainer_state.json"
UNFINISHED = ".unfinished"  # saves in progress and checkpoints being deleted; only this trainer writes here
SHARDS = "shards"  # checkpoint_format=sharded: torch.distributed.checkpoint files, one per rank
STEP_NAME = re.compile(r"step-(\d+)")
# What trainer_state.json must hold for a run to continue from it.
STATE_KEYS = ("step", "examples", "tokens", "epoch", "batch_index", "batches_per_epoch", "batch_size", "world_size",
              "wandb_run_id", "best", "eval_metrics", "eval_step")


# ------------------------------------------------------------------------------- writing

def _fsync(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _set_aside(directory: pathlib.Path) -> pathlib.Path:
    """Move `directory` into `.unfinished/` (atomic), so deleting it next never leaves a partial NAME."""
    aside = directory.parent / UNFINISHED / f"deleting-{directory.name}"
    aside.parent.mkdir(exist_ok=True)
    os.replace(directory, aside)
    return aside


def _delete_aside(directory: pathlib.Path) -> None:
    aside = _set_aside(directory)
    shutil.rmtree(aside)
    _remove_if_empty(aside.parent)


def _remove_if_empty(directory: pathlib.Path) -> None:
    try:
        directory.rmdir()
    except OSError:
        pass


def unfinished(directory: pathlib.Path, fresh: bool = True) -> pathlib.Path:
    """Where `directory` is written before it is published: `.unfinished/NAME/`, emptied if `fresh`."""
    tmp = directory.parent / UNFINISHED / directory.name
    if fresh:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    return tmp


def write_checkpoint(directory: pathlib.Path, write_files: Callable[[pathlib.Path], None], fresh: bool = True) -> None:
    """Run `write_files(tmp)` into `.unfinished/NAME/` and publish it as `directory` only once complete
    (`fresh=False`: the ranks have already written their shards there).

    On any failure (disk full, permission denied, a bug) the temporary directory is removed, every
    existing checkpoint is left as it was, and CheckpointError says what happened.
    """
    tmp = directory.parent / UNFINISHED / directory.name
    try:
        unfinished(directory, fresh)
        write_files(tmp)
        sizes = {}
        for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
            _fsync(file)
            sizes[str(file.relative_to(tmp))] = file.stat().st_size
        (tmp / MANIFEST).write_text(json.dumps(sizes, indent=1))
        _fsync(tmp / MANIFEST)
        _fsync(tmp)
        if directory.exists():  # e.g. a corrupt step-N passed over on resume and now saved again
            aside = _set_aside(directory)
            os.replace(tmp, directory)
            shutil.rmtree(aside)
        else:
            os.replace(tmp, directory)
        _fsync(directory.parent)
        _remove_if_empty(tmp.parent)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_if_empty(tmp.parent)
        raise CheckpointError(f"could not save {directory}: {type(e).__name__}: {e} "
                              f"(earlier checkpoints are untouched)") from e


def _write(path: pathlib.Path, value) -> None:
    """One named state, in the format its file name says: .pt (torch.save, plain tensors and numbers),
    .safetensors (a dict of tensors), .json, or text."""
    from safetensors.torch import save_file
    if path.suffix == ".pt":
        torch.save(value, path)
    elif path.suffix == ".safetensors":
        # clones: tied weights share storage, which safetensors refuses
        save_file({k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in value.items()}, path)
    elif path.suffix == ".json":
        path.write_text(json.dumps(value, indent=2))
    else:
        path.write_text(value)


def save(directory: pathlib.Path, model, weights: Optional[dict], tokenizer, files: dict) -> None:
    """Write a checkpoint atomically: the weights (`model.save_pretrained` writes `weights`: a transformers
    model gives config.json, generation_config.json and model*.safetensors; a PEFT model its adapter), the
    tokenizer, and `files` (file name -> value: optimizer.pt, trainer_state.json, v_head.pt, ...).
    weights=None: the ranks have written weights and optimizer into SHARDS/ already; config.json only."""
    not_finite = next((k for k, v in (weights or {}).items()
                       if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if not_finite:
        raise CheckpointError(f"not saving {directory}: the weights are not finite ({not_finite} holds NaN or inf); "
                              f"earlier checkpoints are untouched")

    def write_files(tmp: pathlib.Path) -> None:
        if weights is None:
            model.config.save_pretrained(tmp)
        else:
            model.save_pretrained(tmp, state_dict=weights, max_shard_size="5GB")
        tokenizer.save_pretrained(tmp)
        for name, value in files.items():
            _write(tmp / name, value)

    write_checkpoint(directory, write_files, fresh=weights is not None)


# ------------------------------------------------------------------------------- finding

def step_of(directory: pathlib.Path) -> Optional[int]:
    match = STEP_NAME.fullmatch(directory.name)
    return int(match.group(1)) if match else None


def problem(directory: pathlib.Path) -> Optional[str]:
    """Why `directory` is not a complete checkpoint, or None if it is (MANIFEST present, sizes match)."""
    try:
        sizes = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        return "no MANIFEST (incomplete)"
    except (OSError, ValueError) as e:
        return f"unreadable MANIFEST ({e})"
    for name, size in sizes.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, MANIFEST says {size} (truncated?)"
    return None


def step_checkpoints(run_dir: pathlib.Path) -> list[pathlib.Path]:
    """Every `step-N` dir with a MANIFEST, oldest first (whether its files are intact is checked on read)."""
    found = [p for p in run_dir.glob("step-*") if step_of(p) is not None and (p / MANIFEST).is_file()]
    return sorted(found, key=step_of)


def any_checkpoint(run_dir: pathlib.Path) -> bool:
    return (run_dir / "FINAL").exists() or any(step_of(p) is not None for p in run_dir.glob("step-*"))


def resume_candidates(run_dir: pathlib.Path, resume: str) -> list[pathlib.Path]:
    """Checkpoints to try, best first: `resume=auto` gives FINAL (a finished run) or the step-N dirs
    newest first, `resume=<path>` just that one, `resume=never` none (and refuses a used run dir)."""
    if resume == "never":
        if any_checkpoint(run_dir):
            raise CheckpointError(f"resume=never but run dir {run_dir} already holds checkpoints; "
                                  f"use resume=auto, or another exp_name or cache_dir")
        return []
    if resume != "auto":
        return [pathlib.Path(resume)]
    final = run_dir / "FINAL"
    if final.exists():
        why = problem(final)
        if why is None:
            return [final]
        log.warning("ignoring %s: %s", final, why)
    return step_checkpoints(run_dir)[::-1]


def remove_unfinished(run_dir: pathlib.Path) -> None:
    """Delete what an interrupted save or rotation left in `.unfinished/`: never a valid checkpoint."""
    leftovers = run_dir / UNFINISHED
    if leftovers.is_dir():
        log.warning("removing %s: %s, left by an interrupted save", leftovers,
                    ", ".join(sorted(p.name for p in leftovers.iterdir())) or "empty")
        shutil.rmtree(leftovers)


def rotate(run_dir: pathlib.Path, keep_last_n: int, keep: Optional[str] = None) -> None:
    """Delete all but the newest `keep_last_n` complete step-N dirs (-1: keep all), and never `keep`
    (the best one). Called only after the newest is complete, so it never deletes the newest."""
    if keep_last_n < 0:
        return
    complete = [p for p in step_checkpoints(run_dir) if problem(p) is None]
    for old in complete[:-keep_last_n]:
        if old.name != keep:
            log.info("deleting %s (keep_last_n=%d)", old, keep_last_n)
            _delete_aside(old)


# ------------------------------------------------------------------------------- reading

@dataclass
class Snapshot:
    """Everything a checkpoint holds that training needs to continue, read into memory."""
    directory: pathlib.Path
    weights: dict  # full model state dict, or the PEFT adapter's
    adapter: bool
    state: dict  # trainer_state.json
    config: str  # the resolved config it was saved under (yaml)
    files: dict  # every other state by file name: optimizer.pt, scheduler.pt, rng.pt (one dict per rank), ...
    shards: Optional[pathlib.Path] = None  # checkpoint_format=sharded: weights and optimizer are here


def read_weights(directory: pathlib.Path, stem: str) -> dict:
    """Tensors saved by save_pretrained under `stem` (model, adapter_model), sharded with an index or not."""
    index = directory / f"{stem}.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [f"{stem}.safetensors"]
    weights = {}
    for name in files:
        weights.update(load_file(directory / name))
    return weights


def _is_state_file(path: pathlib.Path) -> bool:
    """A named state (optimizer.pt, v_head.pt, reference.safetensors, ...), not weights or tokenizer."""
    return path.suffix == ".pt" or path.suffix == ".safetensors" and not path.name.startswith(("model", "adapter_model"))


def read(directory: pathlib.Path) -> Snapshot:
    """Read a checkpoint in full, or raise CheckpointError naming the file that is wrong."""
    why = problem(directory)
    if why:
        raise CheckpointError(f"{directory}: {why}")
    adapter = (directory / "adapter_model.safetensors").is_file()
    shards = directory / SHARDS if (directory / SHARDS / ".metadata").is_file() else None
    current = directory
    try:
        weights = {} if shards else read_weights(directory, "adapter_model" if adapter else "model")
        files = {}
        for current in sorted(p for p in directory.iterdir() if _is_state_file(p)):
            files[current.name] = torch.load(current, weights_only=True) if current.suffix == ".pt" else load_file(current)
        current = directory / "rng.pt"
        if current.name not in files:
            raise FileNotFoundError("missing")
        current = directory / TRAINER_STATE
        state = json.loads(current.read_text())
        missing = [key for key in STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
        current = directory / "run_config.yaml"
        config = current.read_text()
    except pickle.UnpicklingError:
        raise CheckpointError(f"{current}: unreadable (not plain tensors and numbers; nothing is unpickled)") from None
    except Exception as e:
        raise CheckpointError(f"{current}: unreadable ({type(e).__name__}: {first_line(e)[:200]})") from e
    return Snapshot(directory, weights, adapter, state, config, files, shards)


def read_newest(candidates: list[pathlib.Path]) -> Optional[Snapshot]:
    """The first of `candidates` that reads in full; each unreadable one is reported and passed over.
    If there are candidates and none reads, CheckpointError: starting over would overwrite them."""
    problems = []
    for directory in candidates:
        try:
            return read(directory)
        except CheckpointError as e:
            log.warning("skipping checkpoint %s", e)
            problems.append(str(e))
    if problems:
        raise CheckpointError(f"no checkpoint in {candidates[0].parent} can be read (newest: {problems[0]}); to start "
                              f"over, move them away or choose another exp_name")
    return None


def load_weights(model, weights: dict) -> None:
    """Load a full state dict saved by save_pretrained, which leaves out tied copies (lm_head = embeddings)."""
    from train.distributed import load_model_state
    try:
        missing, unexpected = load_model_state(model, weights)
    except RuntimeError as e:  # shapes differ: another width, depth or vocabulary
        raise CheckpointError(f"checkpoint weights do not fit the model: {first_line(e, 'size mismatch')}") from None
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[k]) for k in weights if k in params}
    untied = [k for k in missing if k not in params or id(params[k]) not in loaded]
    if untied or unexpected:
        raise CheckpointError(f"checkpoint weights do not fit the model: missing {untied[:3]}, "
                              f"unexpected {unexpected[:3]}")


# ------------------------------------------------------------------------------- RNG

def rng_state() -> dict:
    """This process's Python, NumPy and torch (CPU and CUDA) RNG states, as tensors and plain types."""
    import random

    import numpy as np
    version, python, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, torch.tensor(python, dtype=torch.int64), gauss],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np
    version, python, gauss = state["python"]
    random.setstate((version, tuple(python.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
