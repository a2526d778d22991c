"""Tokenized data: made once per (data, tokenizer and chat template, lengths), stored as flat arrays in
`${cache_dir}/tokens/<key>.safetensors`, and memory-mapped by every rank, later run and sweep job.

A run holds no Python object per example. A TokenStore is a handful of arrays in that file (token
ids, lengths; for PPO's prompts and for eval, each example as JSON, which rewards and generation
read) that the OS pages in as batches read them; an item (`Tokenized`)
is built when a batch asks for it. The file's key is made from what the data depends on, not from
the data itself (the dataset entries and their files' sizes and modification times or their
`datasets` fingerprints, the seed and eval settings, the tokenizer, template and lengths), so a run
that finds it neither reads nor parses the data. Rank 0 makes the file while the other ranks wait.
"""
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import random
import shutil
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from omegaconf import OmegaConf

from train import data
from train.data import Example, GenerationPrompt, Tokenized, TruncationCounts
from train.distributed import broadcast
from train.errors import DataError, RunError, first_line

log = logging.getLogger(__name__)
SPLITS = ("train", "eval")
FORMAT = 1  # the layout of a tokens file and the making of its items: a change here must change the key


def _offsets(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])


class TokenStore:
    """Tokenized examples as flat arrays: `store[i]` is item i as a `Tokenized`, `store[a:b]` a list.

    Each item has `k` responses (1 for sft and binary, 2 for pairwise, 0 for prompts). Two things are
    attached after loading: `reference`, the cached reference log-probs ((n, columns) float64), and
    the KTO mismatches (`assign_mismatches`)."""

    def __init__(self, arrays: dict, k: int):
        self.arrays, self.k = arrays, k
        self._prompt_at = _offsets(arrays["prompt_lengths"])
        self._response_at = _offsets(arrays["response_lengths"])
        self._example_at = _offsets(arrays["example_lengths"]) if "examples" in arrays else None
        self.desirable = arrays["desirable"].astype(bool) if "desirable" in arrays else None
        self.reference = None
        self.mismatch: Optional[tuple[np.ndarray, np.ndarray]] = None  # (whose first response, its length)

    def __len__(self) -> int:
        return len(self.arrays["prompt_lengths"])

    @property
    def lengths(self) -> np.ndarray:
        """Each item's longest sequence (prompt + its longest response)."""
        responses = np.asarray(self.arrays["response_lengths"]).reshape(len(self), self.k)
        return self.arrays["prompt_lengths"] + (responses.max(1) if self.k else 0)

    def prompt(self, i: int) -> list[int]:
        return self.arrays["prompt_tokens"][self._prompt_at[i]:self._prompt_at[i + 1]].tolist()

    def response(self, i: int, r: int = 0) -> list[int]:
        j = i * self.k + r
        return self.arrays["response_tokens"][self._response_at[j]:self._response_at[j + 1]].tolist()

    def example(self, i: int) -> Optional[Example]:
        if self._example_at is None:
            return None
        return Example(**json.loads(self.arrays["examples"][self._example_at[i]:self._example_at[i + 1]].tobytes()))

    def __getitem__(self, key):
        if isinstance(key, slice):
            return [self[i] for i in range(len(self))[key]]
        i = int(key)
        if not 0 <= i < len(self):
            raise IndexError(i)
        mismatch = None
        if self.mismatch is not None:
            other, length = self.mismatch
            mismatch = self.response(int(other[i]))[:int(length[i])]
        return Tokenized(self.prompt(i), [self.response(i, r) for r in range(self.k)],
                         None if self.desirable is None else bool(self.desirable[i]), mismatch,
                         None if self.reference is None else self.reference[i].tolist(), self.example(i))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def digest(self) -> str:
        """sha256 of every token (and the mismatch pairing): what reference log-probs depend on."""
        h = hashlib.sha256(str(self.k).encode())
        for name in ("prompt_lengths", "prompt_tokens", "response_lengths", "response_tokens"):
            h.update(np.ascontiguousarray(self.arrays[name]).tobytes())
        for array in self.mismatch or ():
            h.update(array.tobytes())
        return h.hexdigest()

    def assign_mismatches(self, seed: int, max_length: int) -> None:
        """Give each binary item a response written for a different prompt (for KTO's KL estimate).

        The pairing is fixed per dataset (a seeded cycle that skips responses to the same prompt), not
        per microbatch, so it works for any microbatch size, including 1, and can be cached."""
        n = len(self)
        prompts = [hash(self.arrays["prompt_tokens"][self._prompt_at[i]:self._prompt_at[i + 1]].tobytes())
                   for i in range(n)]
        order = list(range(n))
        random.Random(seed).shuffle(order)
        other, length = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
        for position, i in enumerate(order):
            for step in range(1, n):
                j = order[(position + step) % n]
                if prompts[j] != prompts[i] or self.prompt(j) != self.prompt(i):
                    other[i], length[i] = j, max_length - int(self.arrays["prompt_lengths"][i])
                    break
            else:
                raise DataError("KTO needs responses to at least two different prompts for its KL estimate")
        self.mismatch = other, length


# ---------------------------------------------------------------------------------- the file

_DTYPES = {np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.uint8): "U8"}


class _Writer:
    """Writes arrays to a safetensors file a piece at a time (each array's pieces go to a file of their
    own, then all are joined), so no array needs to be whole in memory. The file appears whole, or
    not at all."""

    def __init__(self, path: pathlib.Path):
        self.path, self.parts = path, path.with_name(f"{path.name}.part{os.getpid()}")
        shutil.rmtree(self.parts, ignore_errors=True)
        self.parts.mkdir(parents=True)
        self.arrays: dict[str, tuple[np.dtype, int]] = {}

    def add(self, name: str, values, dtype=np.int32) -> None:
        dtype = np.dtype(dtype)
        array = np.asarray(values, dtype=dtype)
        previous = self.arrays.get(name, (dtype, 0))[1]
        self.arrays[name] = dtype, previous + len(array)
        with open(self.parts / name, "ab") as f:
            array.tofile(f)

    def finish(self, metadata: dict) -> None:
        names = sorted(self.arrays, key=lambda n: (-self.arrays[n][0].itemsize, n))  # each array stays aligned
        header, start = {"__metadata__": {k: json.dumps(v) for k, v in metadata.items()}}, 0
        for name in names:
            dtype, count = self.arrays[name]
            end = start + count * dtype.itemsize
            header[name] = {"dtype": _DTYPES[dtype], "shape": [count], "data_offsets": [start, end]}
            start = end
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        part = self.parts / "whole"
        with open(part, "wb") as out:
            out.write(len(text).to_bytes(8, "little") + text)
            for name in names:
                with open(self.parts / name, "rb") as f:
                    shutil.copyfileobj(f, out)
        os.replace(part, self.path)  # whole or not at all: another run may be reading this cache


def _read_file(path: pathlib.Path) -> tuple[dict, dict]:
    """The arrays of a safetensors file, memory-mapped, and its metadata; ValueError if it is not whole."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    metadata = {k: json.loads(v) for k, v in header.pop("__metadata__").items()}
    dtypes = {v: k for k, v in _DTYPES.items()}
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if path.stat().st_size != 8 + size + end:
        raise ValueError(f"{path.stat().st_size} bytes, its header describes {8 + size + end}")
    arrays = {}
    for name, v in header.items():
        (a, b), dtype = v["data_offsets"], dtypes[v["dtype"]]
        arrays[name] = (np.memmap(path, dtype=dtype, mode="r", offset=8 + size + a, shape=((b - a) // dtype.itemsize,))
                        if b > a else np.zeros(0, dtype=dtype))
    return arrays, metadata


def _write_items(writer: _Writer, split: str, items: list[Tokenized], examples: bool) -> None:
    writer.add(f"{split}.prompt_lengths", [len(it.prompt) for it in items])
    writer.add(f"{split}.prompt_tokens", np.fromiter((t for it in items for t in it.prompt), np.int32))
    writer.add(f"{split}.response_lengths", [len(r) for it in items for r in it.responses])
    writer.add(f"{split}.response_tokens", np.fromiter((t for it in items for r in it.responses for t in r), np.int32))
    if examples:
        # default=str: a value JSON has no type for (a date in a parquet column) reaches a reward function as text
        encoded = [json.dumps(dataclasses.asdict(it.example), default=str).encode() for it in items]
        writer.add(f"{split}.example_lengths", [len(e) for e in encoded])
        writer.add(f"{split}.examples", np.frombuffer(b"".join(encoded), np.uint8), np.uint8)
    if items and items[0].desirable is not None:
        writer.add(f"{split}.desirable", [it.desirable for it in items], np.uint8)


@dataclass
class Prepared:
    """A run's data: train and eval items, the prompts evaluation generates from and its scorer."""
    train: TokenStore
    eval: TokenStore
    prompts: list[GenerationPrompt]
    scorer: Optional[Callable]
    truncated: TruncationCounts


def _load(path: pathlib.Path) -> tuple:
    arrays, metadata = _read_file(path)
    stores = []
    for split in SPLITS:
        mine = {name.partition(".")[2]: array for name, array in arrays.items() if name.startswith(f"{split}.")}
        store = TokenStore(mine, metadata["responses"][split])
        examples = (store._example_at[-1], len(mine["examples"])) if store._example_at is not None else (0, 0)
        if (store._prompt_at[-1], store._response_at[-1], examples[0]) != (
                len(mine["prompt_tokens"]), len(mine["response_tokens"]), examples[1]):
            raise ValueError(f"{split}: lengths and tokens disagree")
        stores.append(store)
    prompt_at, text_at = _offsets(arrays["prompts.lengths"]), _offsets(arrays["prompts.text_lengths"])
    prompts = [GenerationPrompt(arrays["prompts.texts"][text_at[i]:text_at[i + 1]].tobytes().decode(),
                                arrays["prompts.tokens"][prompt_at[i]:prompt_at[i + 1]].tolist())
               for i in range(len(prompt_at) - 1)]
    return stores, prompts, TruncationCounts(*metadata["truncated"])


def _make(path: pathlib.Path, cfg, tokenizer, shape: str, eval_shape: Optional[str], keep_examples: bool) -> None:
    """Read, check and tokenize the data a config names, a chunk at a time, into `path`."""
    m = cfg.model
    datasets, test_datasets = _entries(cfg)
    train, evaluation = data.read_splits(datasets, test_datasets, shape, cfg.n_eval_examples, cfg.seed,
                                         cfg.skip_invalid)
    if eval_shape not in (None, shape):
        try:  # e.g. KTO trains on binary feedback but measures reward accuracy on pairs
            _, evaluation = data.read_splits(datasets, test_datasets, eval_shape, cfg.n_eval_examples, cfg.seed,
                                                cfg.skip_invalid)
        except DataError:
            log.info("eval data has no %s records: evaluating on %s", eval_shape, shape)
    random.Random(cfg.seed).shuffle(evaluation)  # once: every eval scores the same subset
    writer, truncated, k = _Writer(path), TruncationCounts(), {}
    examples = {"train": keep_examples, "eval": True}  # eval items are few, and PPO's eval reads them
    try:
        for split in SPLITS:  # every array exists, even for a split with no examples
            _write_items(writer, split, [], examples[split])
        chunks = {"train": data.tokenize_chunks(data.train_examples(train, shape), tokenizer, m.max_length,
                                                m.max_prompt_length, cfg.dataset_num_proc),
                  "eval": [data.tokenize(evaluation[:cfg.n_eval_examples], tokenizer, m.max_length,
                                         m.max_prompt_length)] if evaluation else []}
        for split in SPLITS:
            for items, counts in chunks[split]:
                _write_items(writer, split, items, examples[split])
                k[split] = len(items[0].responses)
                if split == "train":
                    for name in ("prompts", "responses", "total"):
                        setattr(truncated, name, getattr(truncated, name) + getattr(counts, name))
        prompts = (data.generation_prompts(evaluation, tokenizer, cfg.n_eval_generations, m.max_prompt_length)
                   if data.scoring_source(datasets, test_datasets) else [])
        writer.add("prompts.lengths", [len(p.ids) for p in prompts])
        writer.add("prompts.tokens", [t for p in prompts for t in p.ids])
        texts = [p.text.encode() for p in prompts]
        writer.add("prompts.text_lengths", [len(t) for t in texts])
        writer.add("prompts.texts", np.frombuffer(b"".join(texts), np.uint8), np.uint8)
        writer.finish({"responses": {split: k.get(split, 0) for split in SPLITS},
                       "truncated": dataclasses.astuple(truncated)})
    finally:
        shutil.rmtree(writer.parts, ignore_errors=True)


def _entries(cfg) -> tuple[list, Optional[list]]:
    test = OmegaConf.to_container(cfg.test_datasets) if cfg.test_datasets is not None else None
    return OmegaConf.to_container(cfg.datasets), test


def key(cfg, tokenizer, shape: str, eval_shape: Optional[str], keep_examples: bool) -> str:
    """What a run's tokens depend on, found without reading the data: each dataset entry's fingerprint,
    the settings that choose train and eval examples, the tokenizer and chat template, the lengths."""
    datasets, test_datasets = _entries(cfg)
    m = cfg.model
    settings = {"format": FORMAT, "datasets": [data.fingerprint(item) for item in datasets],
                "test_datasets": test_datasets and [data.fingerprint(item) for item in test_datasets],
                "shape": shape, "eval_shape": eval_shape, "keep_examples": keep_examples,
                "n_eval_examples": cfg.n_eval_examples,
                "n_eval_generations": cfg.n_eval_generations, "seed": cfg.seed, "skip_invalid": cfg.skip_invalid,
                "max_length": m.max_length, "max_prompt_length": m.max_prompt_length,
                "eos": tokenizer.eos_token_id, "chat_template": tokenizer.chat_template}
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode())
    return h.hexdigest()[:32]


def prepare(cfg, tokenizer, shape: str, eval_shape: Optional[str], accelerator, keep_examples: bool = False
            ) -> Prepared:
    """The run's data, from the tokens cache (made by rank 0 if it is missing or unreadable). Training
    items carry their examples with `keep_examples` (eval items always do). A mistake in the data stops
    every rank with rank 0's error."""
    path = loaded = error = None
    if accelerator.is_main_process:  # only rank 0 looks at the data, its fingerprints included
        try:
            name = key(cfg, tokenizer, shape, eval_shape, keep_examples)
            path = pathlib.Path(cfg.cache_dir) / "tokens" / f"{name}.safetensors"
            loaded = _load_or_make(path, cfg, tokenizer, shape, eval_shape, keep_examples)
        except RunError as e:  # the other ranks wait for the file: they must hear of it
            error = e
    error, path = broadcast(accelerator, (error, path))
    if error is not None:
        raise error
    accelerator.wait_for_everyone()
    if loaded is None:
        try:
            loaded = _load(path)
        except Exception as e:  # rank 0 wrote it a moment ago
            raise RunError(f"tokens: {path} made by rank 0 can't be read here ({first_line(e)}); is cache_dir on a "
                           f"file system every rank sees?") from None
    (train, evaluation), prompts, truncated = loaded
    if shape == "binary":
        train.assign_mismatches(cfg.seed, cfg.model.max_length)
    source = data.scoring_source(*_entries(cfg))
    return Prepared(train, evaluation, prompts, source and source.scorer, truncated)


def _load_or_make(path: pathlib.Path, cfg, tokenizer, shape: str, eval_shape: Optional[str], keep_examples: bool
                  ) -> tuple:
    if path.exists():
        try:
            loaded = _load(path)
            log.info("tokens: reusing %s", path)
            return loaded
        except Exception as e:  # a truncated or garbled file: whatever parsing it raised
            log.warning("tokens: %s is unreadable (%s): setting it aside and tokenizing again", path, first_line(e))
            os.replace(path, path.with_name(f"{path.name}.corrupt-{time.time_ns()}"))
    path.parent.mkdir(parents=True, exist_ok=True)
    _make(path, cfg, tokenizer, shape, eval_shape, keep_examples)
    loaded = _load(path)
    log.info("tokens: %d examples tokenized, cached in %s", len(loaded[0][0]), path)
    return loaded
