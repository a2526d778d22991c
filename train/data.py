"""Data: load records, check them, shape them for a loss, tokenize, and batch them per rank.

Record shapes (one JSON object per line in a .jsonl file, or a list of them in a .json file):
    sft:      {"prompt": P, "response": str}   or {"messages": [..., {"role": "assistant", ...}]}
    pairwise: {"prompt": P, "chosen": str, "rejected": str}
    binary:   {"prompt": P, "response": str, "desirable": bool}
    prompt:   {"prompt": P, ...}   (PPO's online rollouts; any record above serves, and its other
              fields go to a reward function)
P is a string (one user turn) or a list of {"role", "content"} messages ending with a user turn.
A loss asks for one shape; pairwise records also serve SFT (the chosen response, or `response`
when present) and binary losses (chosen desirable, rejected undesirable); binary records serve SFT
with their desirable responses.

Records are read when asked for (a JSONL file is an index of its lines; a `datasets` table is
memory-mapped Arrow), so a dataset of any size is made into examples a chunk at a time; train/tokens.py
stores their tokens.

Truncation: a prompt longer than model.max_prompt_length keeps its last tokens (the turn nearest
the response); a response is then cut so prompt + response fit in model.max_length. Both are
counted and reported. Batches are padded only to their longest sequence.
"""
import codecs
import json
import logging
import os
import pathlib
import random
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from train import demo
from train.errors import DataError, first_line

log = logging.getLogger(__name__)
ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    prompt: list  # chat messages, the last one the user's
    response: Optional[str] = None  # sft and binary
    chosen: Optional[str] = None  # pairwise
    rejected: Optional[str] = None
    desirable: Optional[bool] = None  # binary
    fields: Optional[dict] = None  # prompt: the record's other fields


@dataclass
class Source:
    """Where records come from: a named dataset, JSON files, or anything the `datasets` library reads
    (parquet, arrow, CSV, a saved dataset dir, a hub id); and who judges generations."""
    name: str
    load: Optional[Callable[[str], list]] = None  # split -> (location, raw row) pairs; None: JSON `files`
    convert: Optional[Callable[[dict], dict]] = None  # raw row -> record in our format
    scorer: Optional[Callable[[str, str], dict]] = None  # (prompt text, generation) -> {metric: bool}
    scores: tuple = ()  # the metric names the scorer returns
    splits: bool = False  # has a test split of its own (else eval holds out a slice)
    files: tuple = ()  # JSON files (.jsonl, .json), read with line-numbered errors
    fingerprint: Optional[Callable[[str], str]] = None  # split -> what its records depend on (not `files`)


@dataclass
class Entry:
    """One entry of `datasets` / `test_datasets`: a source, with optional column renames and a share of
    the mixture (`n` examples, or a `fraction` of the source's; more than all repeats it)."""
    spec: str
    column_map: dict = field(default_factory=dict)
    n: Optional[int] = None
    fraction: Optional[float] = None


ENTRY_KEYS = ("path", "column_map", "n", "fraction")


def entry(item) -> Entry:
    """`item` (a string, or a dict with `path` and ENTRY_KEYS) as an Entry; DataError if malformed."""
    if isinstance(item, str):
        return Entry(item)
    if not isinstance(item, dict) or not isinstance(item.get("path"), str):
        raise DataError(f"{item!r}: a dataset is a string, or {{path: ..., column_map: {{...}}, n: or fraction: ...}}")
    unknown = set(item) - set(ENTRY_KEYS)
    if unknown:
        raise DataError(f"{item['path']}: unknown key(s) {sorted(unknown)}; a dataset entry takes {', '.join(ENTRY_KEYS)}")
    columns = item.get("column_map") or {}
    if not isinstance(columns, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in columns.items()):
        raise DataError(f"{item['path']}: column_map maps the dataset's column names to ours, e.g. "
                        f"{{question: prompt, answer: response}}")
    n, fraction = item.get("n"), item.get("fraction")
    if n is not None and fraction is not None:
        raise DataError(f"{item['path']}: give n or fraction, not both")
    if n is not None and not (isinstance(n, int) and n > 0) or fraction is not None and not (
            isinstance(fraction, (int, float)) and fraction > 0):
        raise DataError(f"{item['path']}: n must be a positive whole number and fraction a positive number")
    return Entry(item["path"], dict(columns), n, fraction)


# ---------------------------------------------------------------- public formats -> our records

def _split_hh_transcript(text: str) -> tuple[list, str]:
    """Anthropic HH-RLHF: '\\n\\nHuman: ...\\n\\nAssistant: ...' -> (prompt messages, final reply)."""
    turns = []
    for chunk in text.split("\n\nHuman: ")[1:]:
        human, _, assistant = chunk.partition("\n\nAssistant: ")
        turns.append({"role": "user", "content": human.strip()})
        if assistant:
            turns.append({"role": "assistant", "content": assistant.strip()})
    if len(turns) < 2 or turns[-1]["role"] != "assistant":
        raise ValueError("HH transcript does not end with an Assistant turn")
    return turns[:-1], turns[-1]["content"]


def convert_hh(row: dict) -> dict:
    prompt, chosen = _split_hh_transcript(row["chosen"])
    rejected_prompt, rejected = _split_hh_transcript(row["rejected"])
    if rejected_prompt != prompt:
        raise ValueError("HH chosen and rejected transcripts have different prompts")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def convert_shp(row: dict) -> dict:
    """Stanford SHP: labels == 1 means human_ref_A is preferred."""
    a, b = row["human_ref_A"], row["human_ref_B"]
    chosen, rejected = (a, b) if row["labels"] == 1 else (b, a)
    return {"prompt": row["history"], "chosen": chosen, "rejected": rejected}


def convert_ultrafeedback(row: dict) -> dict:
    """UltraFeedback binarized: chosen/rejected are full conversations; the last turn is the reply."""
    chosen, rejected = row["chosen"], row["rejected"]
    if chosen[:-1] != rejected[:-1]:
        raise ValueError("UltraFeedback chosen and rejected conversations have different prompts")
    return {"prompt": chosen[:-1], "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"]}


def _hub(name: str, path: str, convert: Callable, splits: dict) -> Source:
    def table(split: str):
        import datasets  # deferred: slow to import, and only needed for hub datasets
        try:
            return datasets.load_dataset(path, split=splits[split])
        except Exception as e:  # offline, not in the cache, no access: whatever the hub client raises
            raise DataError(f"dataset '{name}': cannot load {path}[{splits[split]}] from the Hugging Face hub "
                            f"({type(e).__name__}: {first_line(e)[:200]})") from None
    return Source(name, lambda split: _Rows([table(split)], f"{path}[{splits[split]}]"), convert, splits=True,
                  fingerprint=lambda split: table(split)._fingerprint)


def _digest(value) -> str:
    import hashlib
    return hashlib.sha256(repr(value).encode()).hexdigest()


NAMED = {
    "demo": Source("demo", lambda split: [(f"demo[{split}]:{i}", r) for i, r in enumerate(demo.records(split))],
                   scorer=demo.score, scores=demo.SCORES, splits=True,
                   fingerprint=lambda split: _digest(demo.records(split))),
    "hh": _hub("hh", "Anthropic/hh-rlhf", convert_hh, {"train": "train", "test": "test"}),
    "shp": _hub("shp", "stanfordnlp/SHP", convert_shp, {"train": "train", "test": "test"}),
    "ultrafeedback": _hub("ultrafeedback", "HuggingFaceH4/ultrafeedback_binarized", convert_ultrafeedback,
                          {"train": "train_prefs", "test": "test_prefs"}),
}


# ---------------------------------------------------------------------------- local files

class Malformed(ValueError):
    """A record that is not valid JSON or UTF-8: it stands in its place, to be reported (or skipped)
    with its location like any other invalid record."""


def _parse(location: str, raw: bytes) -> tuple:
    try:
        return location, json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return location, Malformed("not valid UTF-8")
    except json.JSONDecodeError as e:
        return location, Malformed(f"malformed JSON ({e.msg})")


class _Lines:
    """A .jsonl file's non-blank lines as (location, record) pairs, each read and parsed when it is asked
    for: a file of any size costs an index (three numbers a line), not a Python object a record."""

    def __init__(self, path: pathlib.Path):
        bounds, numbers, position = [], [], 0
        self.file = open(path, "rb")
        for number, line in enumerate(self.file, start=1):
            if line.strip():
                bounds.append((position, len(line)))
                numbers.append(number)
            position += len(line)
        self.path, self.bounds, self.numbers = path, np.array(bounds, np.int64).reshape(-1, 2), np.array(numbers)

    def __len__(self) -> int:
        return len(self.numbers)

    def __getitem__(self, i: int) -> tuple:
        start, size = self.bounds[i]
        raw = os.pread(self.file.fileno(), int(size), int(start))
        return _parse(f"{self.path}:{self.numbers[i]}", raw.removeprefix(codecs.BOM_UTF8))  # some editors write a BOM

    def __del__(self):
        self.file.close()


def _read_json(path: pathlib.Path) -> list:
    """A .json file's records (a list of them, read whole) as (location, record) pairs."""
    raw = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        records = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 at byte {e.start}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: a .json file must hold a list of records")
    return [(f"{path}:record {i + 1}", r) for i, r in enumerate(records)]


class _Rows:
    """(location, row) pairs over rows read on demand: a `datasets` Dataset (memory-mapped Arrow), the
    parts of a file glob, or a subset of another table in a given order (`indices`)."""

    def __init__(self, parts: list, label: str = "", indices=None):
        self.parts, self.label, self.indices = parts, label, indices
        self.starts = np.cumsum([0] + [len(part) for part in parts])  # and the end of the last

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else int(self.starts[-1])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(len(self))[i]]
        if not 0 <= i < len(self):
            raise IndexError(i)
        i = int(self.indices[i]) if self.indices is not None else int(i)
        part = int(np.searchsorted(self.starts, i, side="right")) - 1
        row = self.parts[part][i - int(self.starts[part])]
        return (f"{self.label} row {i}", row) if self.label else row


def _subset(table, indices) -> _Rows:
    """The rows of `table` at `indices`, in that order."""
    return _Rows([table], indices=np.asarray(indices, dtype=np.int64))


JSON_SUFFIXES = (".jsonl", ".json")
LIBRARY_FORMATS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}  # read by the datasets library
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+(:[\w.-]+)?(@[\w.-]+)?")  # org/name[:config][@split]


def check_source(spec: str) -> Source:
    """The source `spec` names, if it is a named dataset, existing data files, a dataset dir or a hub id;
    else DataError. (A hub id is only looked up when loaded.)"""
    source = resolve_source(spec)
    path = pathlib.Path(spec)
    if source.files and not all(pathlib.Path(f).is_file() for f in source.files):
        raise DataError(f"{spec}: {'a directory, not a data file' if path.is_dir() else 'no such file'}")
    return source


def resolve_source(spec: str) -> Source:
    if spec in NAMED:
        return NAMED[spec]
    import glob
    path = pathlib.Path(spec)
    files = sorted(glob.glob(spec)) if glob.has_magic(spec) else [spec]
    suffixes = {pathlib.Path(f).suffix for f in files}
    known = (*JSON_SUFFIXES, *LIBRARY_FORMATS)
    if glob.has_magic(spec) and not files:
        raise DataError(f"{spec}: no file matches")
    if path.is_dir() and path.suffix not in JSON_SUFFIXES:
        return _library(spec, lambda datasets: _load_directory(datasets, path))
    if suffixes <= set(JSON_SUFFIXES):
        return Source(spec, files=tuple(files))
    if len(suffixes) == 1 and suffixes <= set(LIBRARY_FORMATS):
        builder = LIBRARY_FORMATS[suffixes.pop()]
        return _library(spec, lambda datasets: datasets.load_dataset(builder, data_files=files, split="train"))
    if path.exists() or path.suffix or glob.has_magic(spec):
        raise DataError(f"{spec}: data files must end in {', '.join(known)} (one format per dataset)")
    if HUB_ID.fullmatch(spec):
        return _library(spec, lambda datasets: _load_hub(datasets, spec))
    import difflib
    close = difflib.get_close_matches(spec, NAMED, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise DataError(f"dataset '{spec}': not a named dataset{hint}, a data file ({', '.join(known)}), a dataset "
                    f"dir, nor a hub id (org/name[:config][@split]); named: {', '.join(NAMED)}")


def _library(spec: str, read: Callable) -> Source:
    """A source read through the datasets library (`read(datasets)` gives the Dataset, memory-mapped
    Arrow); its fingerprint is the library's own."""
    def table():
        import datasets  # deferred: slow to import
        datasets.disable_progress_bars()  # a run's output is its own log: one line per problem
        try:
            return read(datasets)
        except DataError:
            raise
        except Exception as e:  # a missing file, unreadable data, offline and not cached: what the library raises
            raise DataError(f"{spec}: cannot load ({type(e).__name__}: {first_line(e)[:200]})") from None

    def load(_split: str) -> _Rows:
        rows = table()
        return _Rows([rows], f"{spec}[{rows.split or 'train'}]")
    return Source(spec, load=load, fingerprint=lambda _split: table()._fingerprint)


def _load_directory(datasets, path: pathlib.Path):
    """A `save_to_disk` dir (its train split, if it holds several), or a dir of data files (a hub repo's
    snapshot, say) read as the hub would."""
    if any((path / name).exists() for name in ("state.json", "dataset_dict.json")):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise DataError(f"{path}: a saved dataset with splits {sorted(loaded)} and no train split")
            loaded = loaded["train"]
        return loaded
    return datasets.load_dataset(str(path), split="train")


def _load_hub(datasets, spec: str):
    """`org/name[:config][@split]` from the hub; under HF_HUB_OFFLINE=1, from the repo's snapshot in the
    hub cache (what a download, `huggingface-cli download --repo-type dataset` included, leaves there)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    where = name
    if constants.HF_HUB_OFFLINE:
        try:
            where = snapshot_download(name, repo_type="dataset", local_files_only=True)
        except LocalEntryNotFoundError:
            raise DataError(f"dataset '{spec}': not in the Hugging Face cache ({constants.HF_HUB_CACHE}), and "
                            f"HF_HUB_OFFLINE=1 keeps it from being downloaded") from None
    return datasets.load_dataset(where, config or None, split=split or "train")


# ------------------------------------------------------------------------ record checking

def _text(record: dict, key: str) -> str:
    value = record.get(key)
    if value is None:
        raise ValueError(f"missing field '{key}'")
    if not isinstance(value, str):
        raise ValueError(f"field '{key}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"field '{key}' is empty")
    return value


def _messages(value, key: str) -> list:
    if not isinstance(value, list) or not value:
        raise ValueError(f"field '{key}' must be a string or a non-empty list of messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"{key}[{i}] must be {{'role': one of {ROLES}, 'content': str}}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _prompt(record: dict) -> tuple[list, Optional[str]]:
    """The prompt messages, and the response when `messages` ends with an assistant turn."""
    if "prompt" in record:
        value = record["prompt"]
        if isinstance(value, str):
            return [{"role": "user", "content": _text(record, "prompt")}], None
        return _messages(value, "prompt"), None
    if "messages" in record:
        messages = _messages(record["messages"], "messages")
        if messages[-1]["role"] == "assistant":
            return messages[:-1], messages[-1]["content"]
        return messages, None
    raise ValueError("missing field 'prompt' (or 'messages')")


# The columns a record may come with, as a user reads them (ours and TRL's dataset formats).
SHAPE_COLUMNS = ("prompt + response", "prompt + completion", "messages", "prompt + chosen + rejected",
                 "chosen + rejected (conversations sharing the prompt)", "prompt + completion + label",
                 "prompt + response + desirable", "prompt")


def standardize(record, column_map: dict = None):
    """A record in any of SHAPE_COLUMNS' forms (after `column_map` renames its columns) in ours: TRL's
    prompt/completion (a string, or one assistant message) is prompt/response, its `label` is
    `desirable`; conversational chosen/rejected become their assistant reply, the prompt being the
    explicit one or, if there is none, the turns both conversations share."""
    if not isinstance(record, dict):
        return record
    out = dict(record)
    for column, ours in (column_map or {}).items():
        if column not in out:
            raise ValueError(f"column '{column}' (column_map) is not in the record, which has {sorted(out)}")
        out[ours] = out.pop(column)
    if "completion" in out and "response" not in out:
        out["response"] = _reply(out.pop("completion"), "completion")
        if "label" in out and "desirable" not in out:
            out["desirable"] = out.pop("label")
    if isinstance(out.get("chosen"), list) and isinstance(out.get("rejected"), list):
        chosen, rejected = out["chosen"], out["rejected"]
        if "prompt" not in out:  # an implicit prompt
            shared = 0
            while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
                shared += 1
            out["prompt"], chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        out["chosen"], out["rejected"] = _reply(chosen, "chosen"), _reply(rejected, "rejected")
    return out


def _reply(value, key: str):
    """A completion: a string, or the one assistant message that follows the prompt."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) and value[0].get("role") == "assistant":
        return value[0].get("content")
    if isinstance(value, list):
        raise ValueError(f"field '{key}' must be a string or one assistant message after the prompt")
    return value


def to_examples(record, shape: str) -> list[Example]:
    """One record -> the examples it gives for a data shape; ValueError says what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    prompt, final_turn = _prompt(record)
    if not prompt or prompt[-1]["role"] != "user":
        raise ValueError("the prompt must end with a user turn")
    has_pair = "chosen" in record or "rejected" in record
    if shape == "prompt":
        return [Example(prompt, fields={k: v for k, v in record.items() if k not in ("prompt", "messages")})]
    if shape == "sft":
        if "response" in record or final_turn is not None:
            if "desirable" in record and not _flag(record):
                return []  # undesirable binary feedback is not a demonstration
            return [Example(prompt, response=final_turn if final_turn is not None else _text(record, "response"))]
        if has_pair:
            return [Example(prompt, response=_text(record, "chosen"))]
        raise ValueError("missing field 'response' (or 'chosen')")
    if shape == "pairwise":
        return [Example(prompt, chosen=_text(record, "chosen"), rejected=_text(record, "rejected"))]
    if shape == "binary":
        if "desirable" in record:
            response = final_turn if final_turn is not None else _text(record, "response")
            return [Example(prompt, response=response, desirable=_flag(record))]
        if has_pair:
            return [Example(prompt, response=_text(record, "chosen"), desirable=True),
                    Example(prompt, response=_text(record, "rejected"), desirable=False)]
        raise ValueError("missing field 'desirable' (or 'chosen' and 'rejected')")
    raise ValueError(f"unknown data shape '{shape}'")


def _flag(record: dict) -> bool:
    value = record["desirable"]
    if not isinstance(value, bool):
        raise ValueError(f"field 'desirable' must be true or false, got {value!r}")
    return value


class _Reader:
    """Reads one dataset entry's records, raising DataError or (with skip_invalid) counting what it skips."""

    def __init__(self, item, skip_invalid: bool):
        self.entry = entry(item)
        self.spec, self.source, self.skip_invalid = self.entry.spec, resolve_source(self.entry.spec), skip_invalid
        self.skipped: list[str] = []

    def records(self, split: str):
        """(location, raw record) pairs of a split (a source without splits is one split: all of it), as a
        sequence that reads each when it is asked for."""
        if self.source.load is not None:
            return self.source.load(split)
        for f in self.source.files:
            if not pathlib.Path(f).is_file():
                raise DataError(f"{f}: no such file")
        return _Rows([_read_json(pathlib.Path(f)) if f.endswith(".json") else _Lines(pathlib.Path(f))
                      for f in self.source.files])

    def examples(self, located, shape: str) -> list[Example]:
        """The examples of some records; an invalid one raises DataError, or with skip_invalid is counted."""
        out = []
        for number, (location, record) in enumerate(located):
            try:
                if isinstance(record, Malformed):
                    raise record
                if self.source.convert is not None:
                    record = self.source.convert(record)
                record = standardize(record, self.entry.column_map)
                if number == 0 and isinstance(record, dict) and not {"prompt", "messages", "chosen"} & set(record):
                    raise DataError(f"{self.spec}: columns {sorted(record)} fit no record shape (one of: "
                                    f"{'; '.join(SHAPE_COLUMNS)}); rename them with column_map, e.g. datasets=[{{path: "
                                    f"{self.spec}, column_map: {{question: prompt, answer: response}}}}]")
                out.extend(to_examples(record, shape))
            except DataError:
                raise
            except (ValueError, KeyError, TypeError) as e:
                problem = f"missing field {e}" if isinstance(e, KeyError) else str(e)
                if not self.skip_invalid:
                    raise DataError(f"{location}: {problem}") from None
                self.skipped.append(f"{location}: {problem}")
        return out

    def finish(self, count: int, shape: str) -> None:
        """After all of a split's records: report what was skipped; none usable is an error."""
        if self.skipped:
            log.warning("%s: skipped %d invalid record(s) (skip_invalid=true); first: %s",
                        self.spec, len(self.skipped), self.skipped[0])
            self.skipped = []
        if not count:
            raise DataError(f"{self.spec}: no usable {shape} examples")

    def all_examples(self, located, shape: str) -> list[Example]:
        out = self.examples(located, shape)
        self.finish(len(out), shape)
        return out

    def share(self, located, seed: int):
        """The entry's share of a mixture: `n` records, or a `fraction` of them, drawn by seed (all of them,
        then a draw from another pass, when the share is larger)."""
        if self.entry.n is None and self.entry.fraction is None:
            return located
        n = self.entry.n if self.entry.n is not None else round(self.entry.fraction * len(located))
        rng, chosen = random.Random(seed), []
        while len(chosen) < n:
            chosen.extend(rng.sample(range(len(located)), min(len(located), n - len(chosen))))
        log.info("%s: %d of its %d records in the mixture", self.spec, n, len(located))
        return _subset(located, chosen)


def load_examples(item, split: str, shape: str, skip_invalid: bool) -> list[Example]:
    """All examples of one source and split, checked; errors name file:line and the problem."""
    reader = _Reader(item, skip_invalid)
    return reader.all_examples(reader.records(split), shape)


def read_splits(datasets: list, test_datasets: Optional[list], shape: str, n_eval: int, seed: int,
                skip_invalid: bool) -> tuple[list, list]:
    """The training records of each entry (unread: see `train_examples`) and the eval examples.

    With test_datasets unset, named datasets give their test split and any other source gives up a
    held-out slice of its records (n_eval, at most a tenth) that training never sees: the slice is
    cut before records become examples, so no prompt is on both sides. Entries with `n` or `fraction`
    then contribute that share of their training records to the mixture.
    """
    train, evaluation = [], []
    for item in datasets:
        reader = _Reader(item, skip_invalid)
        located = reader.records("train")
        if test_datasets is None:
            if reader.source.splits:
                evaluation.extend(reader.all_examples(reader.records("test"), shape))
            else:
                order = list(range(len(located)))
                random.Random(seed).shuffle(order)
                k = max(1, min(n_eval, len(located) // 10))
                evaluation.extend(reader.all_examples(_subset(located, order[:k]), shape))
                located = _subset(located, order[k:])
        train.append((reader, reader.share(located, seed)))
    for item in test_datasets or []:
        evaluation.extend(load_examples(item, "test", shape, skip_invalid))
    overlap = {entry(item).spec for item in datasets} & {entry(item).spec for item in test_datasets or []}
    if overlap:
        log.warning("evaluating on training data: %s in both datasets and test_datasets", ", ".join(sorted(overlap)))
    return train, evaluation


TOKENIZE_CHUNK = 8192  # records made into examples and tokenized at a time


def train_examples(train: list, shape: str):
    """`read_splits`' training records as examples, TOKENIZE_CHUNK records at a time."""
    identical = total = 0
    for reader, located in train:
        count = 0
        for start in range(0, len(located), TOKENIZE_CHUNK):
            examples = reader.examples(located[start:start + TOKENIZE_CHUNK], shape)
            count += len(examples)
            identical += sum(ex.chosen is not None and ex.chosen == ex.rejected for ex in examples)
            if examples:
                yield examples
        reader.finish(count, shape)
        total += count
    if identical:
        log.warning("%d of %d training pairs have the same chosen and rejected response: they carry no preference",
                    identical, total)


def load_splits(datasets: list, test_datasets: Optional[list], shape: str, n_eval: int, seed: int,
                skip_invalid: bool) -> tuple[list, list, Optional[Callable]]:
    """`read_splits` with the training examples read: (train examples, eval examples, the scorer of
    `scoring_source`)."""
    train, evaluation = read_splits(datasets, test_datasets, shape, n_eval, seed, skip_invalid)
    source = scoring_source(datasets, test_datasets)
    return [ex for chunk in train_examples(train, shape) for ex in chunk], evaluation, source and source.scorer


def scoring_source(datasets: list, test_datasets: Optional[list]) -> Optional[Source]:
    """The first eval source whose generations a scorer judges (named datasets with a task), if any."""
    sources = [resolve_source(entry(item).spec) for item in (test_datasets if test_datasets is not None else datasets)]
    return next((s for s in sources if s.scorer is not None), None)


def fingerprint(item) -> dict:
    """What a dataset entry's records depend on, found without reading them: the entry, and its files'
    paths, sizes and modification times, or its source's own fingerprint of each split."""
    e = entry(item)
    source = resolve_source(e.spec)
    if source.files:
        content = [(os.path.abspath(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in source.files]
    else:
        content = [source.fingerprint(split) for split in (("train", "test") if source.splits else ("train",))]
    return {"entry": [e.spec, e.column_map, e.n, e.fraction], "content": content}


# ------------------------------------------------------------------------------- tokenizing

@dataclass
class Tokenized:
    prompt: list[int]
    responses: list[list[int]]  # sft/binary: [response]; pairwise: [chosen, rejected]
    desirable: Optional[bool] = None
    mismatch: Optional[list[int]] = None  # binary: another prompt's response, for KTO's KL estimate
    reference: Optional[list[float]] = None  # cached reference log-probs: one per response, then the mismatch
    example: Optional[Example] = None  # what it was made from (PPO's rewards read its prompt and fields)

    def __len__(self) -> int:
        return len(self.prompt) + max((len(r) for r in self.responses), default=0)


@dataclass
class TruncationCounts:
    prompts: int = 0
    responses: int = 0
    total: int = 0


def _texts(tokenizer, prompt: list, responses: list[str]) -> tuple[str, list[str]]:
    """The prompt's text (with the generation prompt), and for each response whatever the chat
    template adds after the prompt: tokenized on their own, no token straddles the boundary."""
    prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    suffixes = []
    for response in responses:
        full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)
        suffixes.append(full[len(prompt_text):] if full.startswith(prompt_text) else response)
    return prompt_text, suffixes


def _end_at_eos(ids: list[int], eos: int) -> list[int]:
    """The reply ends at the end-of-turn token: the model learns to stop, and whatever the template
    puts after it (ChatML's newline) is not trained on."""
    return ids[:ids.index(eos) + 1] if eos in ids else ids + [eos]


def _special_tokens(tokenizer) -> dict[str, int]:
    return {token.content: i for i, token in tokenizer.added_tokens_decoder.items() if token.special}


def encode(tokenizer, texts: list[str], written: list[list[str]]) -> list[list[int]]:
    """Token ids of chat-template texts; `written[i]` are the strings in texts[i] that people wrote (the
    message contents). Inside those, a control token's text ('<|im_end|>', '</s>') is text: a response
    quoting it must not end the turn there. One batched call; only texts quoting a control token are
    encoded again, token by token."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    specials = _special_tokens(tokenizer)
    quoted = re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True)))) if specials else None
    for i, (text, strings) in enumerate(zip(texts, written)):
        if quoted and any(quoted.search(string) for string in strings):
            ids[i] = _encode_quoting(tokenizer, text, strings, set(specials.values()))
    return ids


def _encode_quoting(tokenizer, text: str, strings: list[str], special_ids: set) -> list[int]:
    """`text`'s ids with each control token that lies inside one of `strings` encoded as plain text."""
    spans, position = [], 0
    for string in strings:
        start = text.find(string, position)
        if start < 0:
            raise DataError(f"a message quotes a control token ({string[:60]!r}...) and the chat template does not "
                            f"copy messages verbatim, so it can't be kept as text; remove it from the data")
        spans.append((start, start + len(string)))
        position = start + len(string)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for token, (a, b) in zip(encoded["input_ids"], encoded["offset_mapping"]):
        if token in special_ids and any(start <= a and b <= end for start, end in spans):
            out.extend(tokenizer(text[a:b], add_special_tokens=False, split_special_tokens=True)["input_ids"])
        else:
            out.append(token)
    return out


def _contents(messages: list) -> list[str]:
    return [m["content"] for m in messages]


def render(tokenizer, prompt: list, response: Optional[str] = None) -> tuple[list[int], list[int]]:
    """Prompt token ids (with the generation prompt) and the response's ids up to its end token."""
    prompt_text, suffixes = _texts(tokenizer, prompt, [] if response is None else [response])
    ids = encode(tokenizer, [prompt_text, *suffixes], [_contents(prompt), *([[response]] if suffixes else [])])
    return ids[0], _end_at_eos(ids[1], tokenizer.eos_token_id) if suffixes else []


def tokenize(examples: list[Example], tokenizer, max_length: int, max_prompt_length: int
             ) -> tuple[list[Tokenized], TruncationCounts]:
    counts = TruncationCounts(total=len(examples))
    responses = [[ex.chosen, ex.rejected] if ex.chosen is not None else [ex.response] if ex.response is not None
                 else [] for ex in examples]
    rendered = [_texts(tokenizer, ex.prompt, r) for ex, r in zip(examples, responses)]
    # One batched call each: much faster than a tokenizer call per text.
    prompt_ids = encode(tokenizer, [p for p, _ in rendered], [_contents(ex.prompt) for ex in examples])
    suffixes = [t for _, ts in rendered for t in ts]
    suffix_ids = iter(encode(tokenizer, suffixes, [[r] for rs in responses for r in rs]) if suffixes else [])
    out = []
    for ex, prompt, (_, suffixes) in zip(examples, prompt_ids, rendered):
        responses = [_end_at_eos(next(suffix_ids), tokenizer.eos_token_id) for _ in suffixes]
        if len(prompt) > max_prompt_length:
            prompt = prompt[-max_prompt_length:]
            counts.prompts += 1
        room = max_length - len(prompt)
        if any(len(r) > room for r in responses):
            responses = [r[:room] for r in responses]
            counts.responses += 1
        out.append(Tokenized(prompt, responses, ex.desirable, example=ex))
    return out, counts


def tokenize_chunks(chunks, tokenizer, max_length: int, max_prompt_length: int, num_proc: int = 1):
    """`tokenize` of each chunk of examples, in order; in `num_proc` forked processes, a few chunks in
    flight at a time (one chunk's texts and items per process, not the whole dataset's)."""
    if num_proc <= 1:
        yield from (tokenize(chunk, tokenizer, max_length, max_prompt_length) for chunk in chunks)
        return
    import collections
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # each process is one tokenizer thread; no fork warning
    with ProcessPoolExecutor(num_proc, mp_context=multiprocessing.get_context("fork")) as pool:
        pending = collections.deque()
        for chunk in chunks:
            pending.append(pool.submit(tokenize, chunk, tokenizer, max_length, max_prompt_length))
            if len(pending) > 2 * num_proc:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


@dataclass
class GenerationPrompt:
    text: str  # the last user turn, as the dataset's scorer reads it
    ids: list[int]


def generation_prompts(examples: list[Example], tokenizer, n: int, max_prompt_length: int) -> list[GenerationPrompt]:
    """The first n distinct prompts of the eval examples, tokenized for generation."""
    seen, out = set(), []
    for ex in examples:
        if len(out) >= n:
            break
        key = repr(ex.prompt)
        if key in seen:
            continue
        seen.add(key)
        out.append(GenerationPrompt(ex.prompt[-1]["content"], render(tokenizer, ex.prompt)[0][-max_prompt_length:]))
    return out


# -------------------------------------------------------------------------------- batching

@dataclass
class Batches:
    """Deterministic per-rank batching.

    Each epoch is a seeded permutation of the examples, cut into global batches of `batch_size`
    (an incomplete last batch is dropped, so every rank does the same number of steps). A global
    batch is `accumulation` microbatches per rank; rank r takes its own slice of each one.
    With `group_by_length`, each run of GROUP_BATCHES batches of the permutation is sorted by
    length before it is cut, and the batches then shuffled: sequences in a batch have similar
    lengths, so little compute goes to padding. Any (epoch, batch index) can be produced without
    reading the batches before it.
    """
    items: list  # a TokenStore, or any list
    batch_size: int
    accumulation: int
    world_size: int
    rank: int
    seed: int
    group_by_length: bool = False
    microbatch_size: int = field(init=False)
    GROUP_BATCHES = 32

    def __post_init__(self):
        per_step = self.world_size * self.accumulation
        if self.batch_size % per_step:
            raise DataError(f"model.batch_size={self.batch_size} is not divisible by ranks x "
                            f"gradient_accumulation_steps = {self.world_size} x {self.accumulation}")
        self.microbatch_size = self.batch_size // per_step
        if len(self.items) < self.batch_size:
            raise DataError(f"{len(self.items)} training examples is less than one batch "
                            f"(model.batch_size={self.batch_size})")
        self._epoch_batches: tuple[int, np.ndarray] = (-1, np.zeros((0, 0), dtype=np.int64))

    @property
    def per_epoch(self) -> int:
        return len(self.items) // self.batch_size

    def _batches(self, epoch: int) -> np.ndarray:
        """(batches, batch_size) indices of this epoch's global batches: an array, not Python ints."""
        if self._epoch_batches[0] != epoch:
            rng = random.Random(self.seed * 1_000_003 + epoch)
            order = list(range(len(self.items)))
            rng.shuffle(order)
            order = np.array(order[:self.per_epoch * self.batch_size], dtype=np.int64)
            if self.group_by_length:
                group = self.GROUP_BATCHES * self.batch_size
                lengths = getattr(self.items, "lengths", None)  # a TokenStore's, without building its items
                lengths = np.asarray(lengths if lengths is not None else [len(item) for item in self.items])
                for g in range(0, len(order), group):
                    part = order[g:g + group]
                    order[g:g + group] = part[np.argsort(lengths[part], kind="stable")]
            batches = order.reshape(self.per_epoch, self.batch_size)
            if self.group_by_length:
                shuffled = list(range(self.per_epoch))
                rng.shuffle(shuffled)
                batches = batches[shuffled]
            self._epoch_batches = (epoch, batches)
        return self._epoch_batches[1]

    def global_batch(self, epoch: int, index: int) -> list:
        return [self.items[i] for i in self._batches(epoch)[index]]

    def microbatches(self, epoch: int, index: int) -> list[list]:
        """This rank's microbatches of global batch `index` of `epoch`."""
        batch = self.global_batch(epoch, index)
        if self.group_by_length:  # neighbours in length share a microbatch
            batch = sorted(batch, key=len)
        m = self.microbatch_size
        return [batch[(a * self.world_size + self.rank) * m:(a * self.world_size + self.rank + 1) * m]
                for a in range(self.accumulation)]


def collate(items: list[Tokenized], pad_id: int) -> dict:
    """Right-padded input_ids, attention_mask and labels (-100 on prompt and padding).

    Pairwise items give 2n rows: the n chosen sequences, then the n rejected ones, so one forward
    pass serves both. Binary items carry `desirable`, and with mismatches a `kl` batch of
    (prompt, other response) rows; cached reference log-probs come as `reference_logps` (n, k).
    """
    n_responses = len(items[0].responses)
    rows = [(it.prompt, it.responses[k]) for k in range(n_responses) for it in items]
    width = max(len(p) + len(r) for p, r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, response) in enumerate(rows):
        seq = prompt + response
        input_ids[i, :len(seq)] = torch.tensor(seq)
        labels[i, len(prompt):len(seq)] = torch.tensor(response, dtype=torch.long)
        attention_mask[i, :len(seq)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "n": len(items)}
    if items[0].desirable is not None:
        batch["desirable"] = torch.tensor([it.desirable for it in items])
    if items[0].reference is not None:
        batch["reference_logps"] = torch.tensor([it.reference for it in items], dtype=torch.float64)
    if items[0].mismatch is not None:
        batch["kl"] = collate([Tokenized(it.prompt, [it.mismatch]) for it in items], pad_id)
    return batch
