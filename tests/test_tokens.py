"""Tokenized data (train/tokens.py): made once, stored as arrays, memory-mapped. The stored items are
checked against `tokenize` of the same examples; the cache against what it must and must not depend on;
the memory a cached load takes against the number of examples."""
import json
import pathlib
import random
import tracemalloc
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
from transformers import AutoTokenizer

from conftest import TINY, compose
from train import data, tokens
from train.errors import DataError

ALONE = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None, num_processes=1)


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TINY)


def write(path: pathlib.Path, n: int, start: int = 0) -> str:
    path.write_text("".join(json.dumps({"prompt": f"What is {i} + {i % 7}?", "chosen": f"It is {i + i % 7}.",
                                        "rejected": f"Maybe {i}."}) + "\n" for i in range(start, start + n)))
    return str(path)


def config(tmp_path, *overrides):
    return compose([f"cache_dir={tmp_path / 'cache'}", "n_eval_examples=4", "n_eval_generations=2", *overrides])


def counting(monkeypatch) -> dict:
    """Counts of the data being read (records parsed into examples) and tokenized."""
    calls = {"read": 0, "tokenize": 0}
    for name, key in (("read_splits", "read"), ("tokenize", "tokenize")):
        real = getattr(data, name)
        monkeypatch.setattr(data, name, lambda *a, real=real, key=key, **k: calls.__setitem__(key, calls[key] + 1)
                            or real(*a, **k))
    return calls


def plain(items) -> list:
    return [(it.prompt, it.responses, it.desirable) for it in items]


@pytest.mark.parametrize("shape", ["sft", "pairwise", "binary"])
def test_stored_items_are_the_tokenized_examples(shape, tmp_path, tok, monkeypatch):
    monkeypatch.setattr(data, "TOKENIZE_CHUNK", 7)  # 36 train examples in several chunks
    cfg = config(tmp_path, f"datasets=[{write(tmp_path / 'd.jsonl', 40)}]")
    prepared = tokens.prepare(cfg, tok, shape, None, ALONE)
    train, evaluation, scorer = data.load_splits([cfg.datasets[0]], None, shape, 4, cfg.seed, False)
    random.Random(cfg.seed).shuffle(evaluation)
    expected, counts = data.tokenize(train, tok, cfg.model.max_length, cfg.model.max_prompt_length)
    assert plain(prepared.train) == plain(expected) and prepared.truncated == counts
    assert [it.example for it in prepared.eval] == evaluation[:4], "an eval item carries the example it was made from"
    assert all(it.example is None for it in prepared.train), "only PPO's items keep theirs (its rewards read them)"
    kept = tokens.prepare(cfg, tok, shape, None, ALONE, keep_examples=True)
    assert [it.example for it in kept.train] == train and plain(kept.train) == plain(prepared.train)
    assert plain(prepared.eval) == plain(data.tokenize(evaluation[:4], tok, cfg.model.max_length,
                                                       cfg.model.max_prompt_length)[0])
    assert scorer is prepared.scorer is None and prepared.prompts == []
    assert plain(prepared.train[3:9:2]) == plain(expected[3:9:2]) and len(prepared.train) == len(expected)
    assert isinstance(prepared.train.arrays["prompt_tokens"], np.memmap), "memory-mapped, not read into memory"
    stored = tmp_path / "cache" / "tokens" / f"{tokens.key(cfg, tok, shape, None, False)}.safetensors"
    from safetensors.numpy import load_file
    assert {k: v.tolist() for k, v in load_file(stored).items() if k.startswith("train.")} == {
        f"train.{k}": v.tolist() for k, v in prepared.train.arrays.items()}, "a valid safetensors file"
    assert np.array_equal(prepared.train.lengths, [len(it) for it in expected])


def test_kto_mismatches_pair_each_response_with_another_prompt(tmp_path, tok):
    cfg = config(tmp_path, f"datasets=[{write(tmp_path / 'd.jsonl', 30)}]", "model.max_length=24", "model.max_prompt_length=16")
    store = tokens.prepare(cfg, tok, "binary", None, ALONE).train
    items = list(store)
    order = list(range(len(items)))
    random.Random(cfg.seed).shuffle(order)
    for position, i in enumerate(order):  # the next item in the seeded cycle whose prompt differs
        j = next(order[(position + k) % len(order)] for k in range(1, len(order))
                 if items[order[(position + k) % len(order)]].prompt != items[i].prompt)
        assert items[i].mismatch == items[j].responses[0][:24 - len(items[i].prompt)]
    assert any(items[a].prompt == items[b].prompt for a, b in zip(order, order[1:])), \
        "the seeded cycle has neighbours with one prompt (a chosen and its rejected), which are skipped"
    single = tokens.TokenStore(dict(store.arrays), 1)
    single.arrays["prompt_tokens"] = np.zeros_like(store.arrays["prompt_tokens"])
    with pytest.raises(DataError, match="at least two different prompts"):
        single.assign_mismatches(0, 24)


def test_the_cache_is_found_without_reading_the_data_and_misses_when_an_input_changes(tmp_path, tok, monkeypatch):
    calls = counting(monkeypatch)
    path = write(tmp_path / "d.jsonl", 40)
    first = tokens.prepare(config(tmp_path, f"datasets=[{path}]"), tok, "pairwise", None, ALONE)
    assert calls == {"read": 1, "tokenize": 2}
    again = tokens.prepare(config(tmp_path, f"datasets=[{path}]"), tok, "pairwise", None, ALONE)
    assert calls == {"read": 1, "tokenize": 2}, "a cached run neither reads nor tokenizes"
    assert plain(again.train) == plain(first.train) and plain(again.eval) == plain(first.eval)

    templated = AutoTokenizer.from_pretrained(TINY)
    templated.chat_template = tok.chat_template.replace("<|im_start|>", "<|im_start|> ")
    for overrides, tokenizer in [(["model.max_length=96"], tok), (["model.max_prompt_length=16"], tok), (["seed=1"], tok),
                                 (["n_eval_examples=3"], tok), ([], templated), (["test_datasets=[demo]"], tok)]:
        tokens.prepare(config(tmp_path, f"datasets=[{path}]", *overrides), tokenizer, "pairwise", None, ALONE)
    tokens.prepare(config(tmp_path, f"datasets=[{path}]"), tok, "sft", None, ALONE)
    tokens.prepare(config(tmp_path, f"datasets=[{{path: {path}, n: 30}}]"), tok, "pairwise", None, ALONE)
    assert calls["read"] == 9 and len(list((tmp_path / "cache" / "tokens").glob("*.safetensors"))) == 9
    write(tmp_path / "d.jsonl", 40, start=1)  # the same file, other records
    changed = tokens.prepare(config(tmp_path, f"datasets=[{path}]"), tok, "pairwise", None, ALONE)
    assert calls["read"] == 10 and plain(changed.train) != plain(first.train)


def test_a_library_dataset_misses_when_its_file_changes(tmp_path, tok, monkeypatch):
    calls = counting(monkeypatch)
    path = tmp_path / "d.parquet"
    records = [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(20)]
    datasets.Dataset.from_list(records).to_parquet(str(path))
    first = tokens.prepare(config(tmp_path, f"datasets=[{path}]"), tok, "sft", None, ALONE)
    tokens.prepare(config(tmp_path, f"datasets=[{path}]"), tok, "sft", None, ALONE)
    assert calls["read"] == 1
    datasets.Dataset.from_list(records[::-1]).to_parquet(str(path))
    changed = tokens.prepare(config(tmp_path, f"datasets=[{path}]"), tok, "sft", None, ALONE)
    assert calls["read"] == 2 and sorted(plain(changed.train)) != sorted(plain(first.train))


def test_an_unreadable_tokens_file_is_set_aside_and_made_again(tmp_path, tok, monkeypatch):
    calls = counting(monkeypatch)
    cfg = config(tmp_path, f"datasets=[{write(tmp_path / 'd.jsonl', 40)}]")
    first = plain(tokens.prepare(cfg, tok, "sft", None, ALONE).train)  # read before the file (mapped) is cut
    stored = next((tmp_path / "cache" / "tokens").glob("*.safetensors"))
    stored.write_bytes(stored.read_bytes()[:-10])  # cut short, as by a full disk
    assert plain(tokens.prepare(cfg, tok, "sft", None, ALONE).train) == first and calls["read"] == 2
    assert len(list(stored.parent.glob("*.corrupt-*"))) == 1 and not list(stored.parent.glob("*.part*"))


def test_two_processes_tokenize_to_the_same_store(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(data, "TOKENIZE_CHUNK", 5)
    path = write(tmp_path / "d.jsonl", 40)
    one = tokens.prepare(config(tmp_path / "one", f"datasets=[{path}]"), tok, "pairwise", None, ALONE)
    two = tokens.prepare(config(tmp_path / "two", f"datasets=[{path}]", "dataset_num_proc=2"), tok, "pairwise",
                         None, ALONE)
    assert plain(two.train) == plain(one.train) and plain(two.eval) == plain(one.eval)


def test_generation_prompts_are_stored(tmp_path, tok):
    cfg = config(tmp_path, "datasets=[demo]", "n_eval_generations=3")
    prepared = tokens.prepare(cfg, tok, "pairwise", None, ALONE)
    _, evaluation, scorer = data.load_splits(["demo"], None, "pairwise", 4, cfg.seed, False)
    random.Random(cfg.seed).shuffle(evaluation)
    assert prepared.scorer is scorer is not None
    assert prepared.prompts == data.generation_prompts(evaluation, tok, 3, cfg.model.max_prompt_length)
    assert len(prepared.prompts) == 3 and tokens.prepare(cfg, tok, "pairwise", None, ALONE).prompts == prepared.prompts


def test_a_cached_load_holds_no_python_object_per_example(tmp_path, tok):
    """Loading a cached tokens file costs memory for its index (offsets: 8 bytes per item and array),
    not for the examples: 20x the examples take well under 20x the memory of a small set."""
    def cached_load_peak(n: int) -> int:
        cfg = config(tmp_path / str(n), f"datasets=[{write(tmp_path / f'{n}.jsonl', n)}]")
        tokens.prepare(cfg, tok, "pairwise", None, ALONE)
        tracemalloc.start()
        prepared = tokens.prepare(cfg, tok, "pairwise", None, ALONE)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert len(prepared.train) > 0.8 * n
        return peak
    small, large = cached_load_peak(1000), cached_load_peak(20000)
    per_example = (large - small) / 19000
    assert per_example < 64, f"{per_example:.0f} bytes per example ({small} and {large} bytes at peak)"
