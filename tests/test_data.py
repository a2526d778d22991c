"""Unit tests of train/data.py (loading, checking, shaping, tokenizing, batching) and train/demo.py.

Expected values are computed independently of the code under test: chat texts are written out by
hand in the ChatML format of the shipped tiny tokenizer, held-out sizes and batch partitions are
derived from the documented rules, demo topics are parsed back out of the prompts.
"""
import json
import logging
import random
import re
import sys
import types
from collections import Counter

import pytest
import torch
from transformers import AutoTokenizer

from train import data, demo
from train.data import (Batches, DataError, Example, Tokenized, TruncationCounts, collate, convert_hh,
                        convert_shp, convert_ultrafeedback, generation_prompts, load_examples, load_splits,
                        render, resolve_source, to_examples, tokenize)

TINY = "train/assets/tiny"


# --------------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TINY)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


def chatml(messages, generation_prompt=False):
    """The tiny tokenizer's chat template, written out by hand."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if generation_prompt else "")


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def write_jsonl(path, lines):
    """Each line: a dict (dumped as JSON), a str (written verbatim) or bytes (written verbatim)."""
    chunks = []
    for line in lines:
        if isinstance(line, bytes):
            chunks.append(line)
        elif isinstance(line, str):
            chunks.append(line.encode("utf-8"))
        else:
            chunks.append(json.dumps(line).encode("utf-8"))
    path.write_bytes(b"\n".join(chunks) + b"\n")
    return path


def pair(i):
    return {"prompt": f"question {i}?", "chosen": f"good answer {i}.", "rejected": f"bad answer {i}."}


def sft(i):
    return {"prompt": f"question {i}?", "response": f"answer {i}."}


def load_error(spec, shape="sft", split="train"):
    with pytest.raises(DataError) as info:
        load_examples(str(spec), split, shape, skip_invalid=False)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, f"error message is not one line: {message!r}"
    return message


def prompt_key(ex):
    return json.dumps(ex.prompt, sort_keys=True)


# ----------------------------------------------------------------- 1. errors name file:line

GOOD = {"prompt": "Hi?", "response": "Hello."}


def test_malformed_json_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, '{"prompt": "Hi?", "response": ', GOOD])
    message = load_error(path)
    assert f"{path}:3" in message
    assert "malformed JSON" in message


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_utf8_byte_order_mark_is_not_a_record(tmp_path, suffix):
    text = json.dumps([GOOD, GOOD]) if suffix == ".json" else json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n"
    path = tmp_path / f"d{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert len(load_examples(str(path), "train", "sft", skip_invalid=False)) == 2


def test_pairs_without_a_preference_and_eval_on_train_data_are_reported(tmp_path, caplog):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q?", "chosen": "A.", "rejected": "A."},
                                              {"prompt": "Q?", "chosen": "A.", "rejected": "B."}])
    with caplog.at_level("WARNING"):
        load_splits([str(path)], [str(path)], "pairwise", 1, 0, False)
    assert "1 of 2 training pairs have the same chosen and rejected response" in caplog.text
    assert f"evaluating on training data: {path} in both datasets and test_datasets" in caplog.text


def test_line_numbers_count_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, "", "   ", "{not json}"])
    message = load_error(path)
    assert f"{path}:4" in message and f"{path}:3" not in message


def test_non_utf8_names_line(tmp_path):
    bad = b'{"prompt": "caf\xe9?", "response": "ok"}'  # latin-1, not UTF-8
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, bad, GOOD])
    message = load_error(path)
    assert "UTF-8" in message
    assert f"{path}:2" in message


@pytest.mark.parametrize("record, shape, words", [
    ({"response": "Hello."}, "sft", ["prompt"]),
    ({"prompt": "Hi?"}, "sft", ["response"]),
    ({"prompt": "Hi?", "chosen": "a."}, "pairwise", ["rejected", "missing"]),
    ({"prompt": "Hi?", "response": "   "}, "sft", ["response", "empty"]),
    ({"prompt": "", "response": "Hello."}, "sft", ["prompt", "empty"]),
    ({"prompt": "Hi?", "chosen": 5, "rejected": "b."}, "pairwise", ["chosen", "string", "int"]),
    ({"prompt": "Hi?", "chosen": "a.", "rejected": ["b."]}, "pairwise", ["rejected", "string", "list"]),
    ({"prompt": "Hi?", "response": "a.", "desirable": "yes"}, "binary", ["desirable", "yes"]),
    ({"prompt": "Hi?", "response": "a.", "desirable": 1}, "binary", ["desirable"]),
    ({"prompt": "Hi?", "response": "a.", "desirable": "no"}, "sft", ["desirable"]),
    ({"prompt": [{"role": "robot", "content": "Hi?"}], "response": "a."}, "sft", ["prompt[0]", "role"]),
    ({"prompt": [user("Hi?"), {"role": "user"}], "response": "a."}, "sft", ["prompt[1]"]),
    ({"prompt": [], "response": "a."}, "sft", ["prompt"]),
    ({"prompt": 7, "response": "a."}, "sft", ["prompt"]),
    ({"prompt": [user("Hi?"), assistant("Hello.")], "response": "a."}, "sft", ["user turn"]),
    ({"prompt": [system("Be kind."), assistant("Hello.")], "chosen": "a.", "rejected": "b."}, "pairwise",
     ["user turn"]),
    ({"messages": [system("Be kind."), assistant("Hello.")]}, "sft", ["user turn"]),
    ({"messages": [user("Hi?")]}, "sft", ["response"]),
    ({"prompt": "Hi?", "response": "a."}, "pairwise", ["chosen"]),
    ({"prompt": "Hi?", "response": "a."}, "binary", ["desirable"]),
    (["Hi?", "a."], "sft", ["JSON object"]),
])
def test_bad_record_names_line_and_problem(tmp_path, record, shape, words):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD if shape == "sft" else pair(0), record])
    message = load_error(path, shape)
    assert f"{path}:2" in message
    for word in words:
        assert word in message, (word, message)


def test_json_file_bad_record_is_named(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([pair(0), {"prompt": "Hi?", "chosen": 3, "rejected": "b."}, pair(2)]))
    message = load_error(path, "pairwise")
    assert f"{path}:record 2" in message
    assert "chosen" in message


def test_json_file_malformed_and_not_a_list(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[\n{"prompt": "a", "response": "b"},\n{"prompt": \n]')
    message = load_error(broken)
    assert f"{broken}:" in message and "malformed JSON" in message
    not_list = tmp_path / "obj.json"
    not_list.write_text(json.dumps(GOOD))
    message = load_error(not_list)
    assert str(not_list) in message and "list" in message


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    message = load_error(path)
    assert str(path) in message and "no such file" in message


def test_wrong_file_extension(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text(json.dumps(GOOD) + "\n")
    message = load_error(path)
    assert str(path) in message and ".jsonl" in message


@pytest.mark.parametrize("typo, suggestion", [("dem", "demo"), ("ultrafeedbak", "ultrafeedback"), ("shpp", "shp")])
def test_unknown_dataset_suggests_closest(typo, suggestion):
    message = load_error(typo)
    assert f"'{typo}'" in message
    assert f"did you mean '{suggestion}'" in message


def test_unknown_dataset_without_close_match_lists_names():
    message = load_error("zzzzzzzzzz")
    assert "did you mean" not in message
    for name in data.NAMED:
        assert name in message


def test_unknown_shape_is_rejected():
    with pytest.raises(ValueError, match="shape"):
        to_examples(GOOD, "reward")


# ---------------------------------------------------------------------- 2. skip_invalid

def test_skip_invalid_keeps_good_lines(tmp_path, caplog):
    lines = [pair(0), "{broken", pair(1), b'{"prompt": "\xff"}', {"prompt": "x", "chosen": 1, "rejected": "y"},
             pair(2), {"prompt": [user("q"), assistant("a")], "chosen": "c", "rejected": "r"}, "[1, 2]", pair(3)]
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="train.data"):
        examples = load_examples(str(path), "train", "pairwise", skip_invalid=True)
    assert [ex.chosen for ex in examples] == [f"good answer {i}." for i in range(4)]
    assert [ex.prompt for ex in examples] == [[user(f"question {i}?")] for i in range(4)]
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "skipped 5 invalid" in warning


def test_skip_invalid_json_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([sft(0), {"prompt": "q"}, "text", sft(3), {"response": "r"}]))
    examples = load_examples(str(path), "train", "sft", skip_invalid=True)
    assert [ex.response for ex in examples] == ["answer 0.", "answer 3."]


def test_skip_invalid_still_raises_when_nothing_usable(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["{broken", {"prompt": "q"}, b"\xff\xfe"])
    with pytest.raises(DataError) as info:
        load_examples(str(path), "train", "sft", skip_invalid=True)
    assert str(path) in str(info.value) and "no usable" in str(info.value)


def test_skip_invalid_all_undesirable_for_sft_raises(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "response": "r", "desirable": False}])
    with pytest.raises(DataError, match="no usable sft"):
        load_examples(str(path), "train", "sft", skip_invalid=True)


def test_skip_invalid_does_not_skip_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_examples(str(tmp_path / "nope.jsonl"), "train", "sft", skip_invalid=True)


# --------------------------------------------------------------------------- 3. record shapes

def test_sft_from_prompt_and_response():
    [ex] = to_examples({"prompt": "Hi?", "response": "Hello."}, "sft")
    assert ex.prompt == [user("Hi?")]
    assert ex.response == "Hello." and ex.chosen is None and ex.desirable is None


def test_sft_from_messages_ending_with_assistant():
    messages = [system("Be brief."), user("Hi?"), assistant("Hello."), user("Name?"), assistant("Tiny.")]
    [ex] = to_examples({"messages": messages}, "sft")
    assert ex.prompt == messages[:-1]
    assert ex.response == "Tiny."


def test_messages_extra_keys_are_dropped():
    [ex] = to_examples({"messages": [dict(user("Hi?"), name="bob"), assistant("Yo.")]}, "sft")
    assert ex.prompt == [user("Hi?")]


def test_sft_from_pairwise_uses_chosen_or_response():
    [ex] = to_examples(pair(1), "sft")
    assert ex.response == "good answer 1."
    [ex] = to_examples(dict(pair(1), response="bad answer 1."), "sft")
    assert ex.response == "bad answer 1."


def test_sft_drops_undesirable_binary_records(tmp_path):
    records = [{"prompt": f"q{i}", "response": f"r{i}", "desirable": i % 3 == 0} for i in range(9)]
    assert to_examples(records[1], "sft") == []
    path = write_jsonl(tmp_path / "d.jsonl", records)
    examples = load_examples(str(path), "train", "sft", skip_invalid=False)
    assert [ex.response for ex in examples] == ["r0", "r3", "r6"]


def test_pairwise_shape():
    [ex] = to_examples({"prompt": [system("S"), user("Q")], "chosen": "C", "rejected": "R"}, "pairwise")
    assert (ex.prompt, ex.chosen, ex.rejected, ex.response) == ([system("S"), user("Q")], "C", "R", None)


def test_binary_from_binary_records():
    [good] = to_examples({"prompt": "Q", "response": "A", "desirable": True}, "binary")
    [bad] = to_examples({"prompt": "Q", "response": "B", "desirable": False}, "binary")
    assert (good.response, good.desirable) == ("A", True)
    assert (bad.response, bad.desirable) == ("B", False)
    assert good.desirable is True and bad.desirable is False


def test_binary_from_pairwise_records():
    examples = to_examples(pair(4), "binary")
    assert [(ex.response, ex.desirable) for ex in examples] == [("good answer 4.", True), ("bad answer 4.", False)]
    assert all(ex.prompt == [user("question 4?")] for ex in examples)


def test_multi_turn_prompt_is_kept_in_order(tmp_path):
    prompt = [system("You are terse."), user("One?"), assistant("1."), user("Two?"), assistant("2."), user("Three?")]
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": prompt, "chosen": "3.", "rejected": "4."}])
    for shape, n in (("sft", 1), ("pairwise", 1), ("binary", 2)):
        examples = load_examples(str(path), "train", shape, skip_invalid=False)
        assert len(examples) == n
        assert all(ex.prompt == prompt for ex in examples)


def test_shapes_of_a_mixed_file(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [pair(0), pair(1), pair(2)])
    assert len(load_examples(str(path), "train", "sft", False)) == 3
    assert len(load_examples(str(path), "train", "pairwise", False)) == 3
    assert len(load_examples(str(path), "train", "binary", False)) == 6


# ------------------------------------------------------------------------------ 4. converters

def test_convert_hh_single_turn():
    row = {"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: It is 4.",
           "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: Five."}
    assert convert_hh(row) == {"prompt": [user("What is 2+2?")], "chosen": "It is 4.", "rejected": "Five."}


def test_convert_hh_multi_turn():
    history = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke"
    row = {"chosen": history + "\n\nAssistant: Why did the chicken cross the road?",
           "rejected": history + "\n\nAssistant: No."}
    record = convert_hh(row)
    assert record["prompt"] == [user("Hi there"), assistant("Hello! How can I help?"), user("Tell me a joke")]
    assert record["chosen"] == "Why did the chicken cross the road?"
    assert record["rejected"] == "No."
    [ex] = to_examples(record, "pairwise")
    assert ex.prompt == record["prompt"]


def test_convert_hh_mismatched_prompts_raise():
    row = {"chosen": "\n\nHuman: A?\n\nAssistant: x", "rejected": "\n\nHuman: B?\n\nAssistant: y"}
    with pytest.raises(ValueError, match="different prompts"):
        convert_hh(row)


def test_convert_hh_transcript_without_final_assistant_turn_raises():
    row = {"chosen": "\n\nHuman: A?\n\nAssistant: x\n\nHuman: more?", "rejected": "\n\nHuman: A?\n\nAssistant: y"}
    with pytest.raises(ValueError, match="Assistant"):
        convert_hh(row)


@pytest.mark.parametrize("label, chosen, rejected", [(1, "ref A", "ref B"), (0, "ref B", "ref A")])
def test_convert_shp(label, chosen, rejected):
    row = {"history": "Why is the sky blue?", "human_ref_A": "ref A", "human_ref_B": "ref B", "labels": label}
    record = convert_shp(row)
    assert record == {"prompt": "Why is the sky blue?", "chosen": chosen, "rejected": rejected}
    [ex] = to_examples(record, "pairwise")
    assert ex.prompt == [user("Why is the sky blue?")] and ex.chosen == chosen


def test_convert_ultrafeedback():
    row = {"prompt": "Name a colour.",
           "chosen": [user("Name a colour."), assistant("Blue.")],
           "rejected": [user("Name a colour."), assistant("Seven.")]}
    record = convert_ultrafeedback(row)
    assert record == {"prompt": [user("Name a colour.")], "chosen": "Blue.", "rejected": "Seven."}
    [ex] = to_examples(record, "pairwise")
    assert (ex.prompt, ex.chosen, ex.rejected) == ([user("Name a colour.")], "Blue.", "Seven.")


def test_convert_ultrafeedback_multi_turn_and_mismatch():
    history = [system("S"), user("Q1"), assistant("A1"), user("Q2")]
    row = {"prompt": "Q2", "chosen": history + [assistant("good")], "rejected": history + [assistant("bad")]}
    assert convert_ultrafeedback(row)["prompt"] == history
    row["rejected"] = [user("other"), assistant("bad")]
    with pytest.raises(ValueError, match="different prompts"):
        convert_ultrafeedback(row)


@pytest.fixture
def fake_hub(monkeypatch):
    """A stand-in `datasets` module so that named hub datasets load from memory (no network)."""
    rows = {}
    module = types.ModuleType("datasets")

    def load_dataset(path, split, **kwargs):
        return rows[(path, split)]
    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)
    return rows


def test_hub_source_converts_rows(fake_hub):
    fake_hub[("stanfordnlp/SHP", "train")] = [
        {"history": "Q0", "human_ref_A": "a0", "human_ref_B": "b0", "labels": 1},
        {"history": "Q1", "human_ref_A": "a1", "human_ref_B": "b1", "labels": 0}]
    examples = load_examples("shp", "train", "pairwise", skip_invalid=False)
    assert [(ex.prompt, ex.chosen, ex.rejected) for ex in examples] == [
        ([user("Q0")], "a0", "b0"), ([user("Q1")], "b1", "a1")]
    fake_hub[("HuggingFaceH4/ultrafeedback_binarized", "test_prefs")] = [
        {"prompt": "Q", "chosen": [user("Q"), assistant("c")], "rejected": [user("Q"), assistant("r")]}]
    [ex] = load_examples("ultrafeedback", "test", "pairwise", skip_invalid=False)
    assert (ex.chosen, ex.rejected) == ("c", "r")


HH_GOOD = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
HH_BAD = {"chosen": "\n\nHuman: hi\n\nAssistant:", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}


def test_hub_row_that_fails_conversion_is_a_located_data_error(fake_hub):
    fake_hub[("Anthropic/hh-rlhf", "train")] = [HH_GOOD, HH_BAD, HH_GOOD]
    with pytest.raises(DataError) as info:
        load_examples("hh", "train", "pairwise", skip_invalid=False)
    assert "Anthropic/hh-rlhf" in str(info.value)


def test_hub_row_that_fails_conversion_is_skipped_with_skip_invalid(fake_hub):
    fake_hub[("Anthropic/hh-rlhf", "train")] = [HH_GOOD, HH_BAD, HH_GOOD]
    assert len(load_examples("hh", "train", "pairwise", skip_invalid=True)) == 2


# ------------------------------------------------------------------------------ 5. load_splits

def test_held_out_slice_from_local_file(tmp_path):
    n = 53
    path = write_jsonl(tmp_path / "d.jsonl", [pair(i) for i in range(n)])
    all_prompts = {f"question {i}?" for i in range(n)}
    for n_eval, expected_k in ((100, n // 10), (3, 3), (0, 1)):
        train, evaluation, scorer = load_splits([str(path)], None, "pairwise", n_eval, seed=7, skip_invalid=False)
        assert scorer is None
        assert len(evaluation) == expected_k
        assert len(train) == n - expected_k
        train_prompts = {ex.prompt[0]["content"] for ex in train}
        eval_prompts = {ex.prompt[0]["content"] for ex in evaluation}
        assert not train_prompts & eval_prompts
        assert train_prompts | eval_prompts == all_prompts


def test_held_out_slice_is_at_least_one(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [sft(i) for i in range(5)])  # 5 // 10 == 0
    train, evaluation, _ = load_splits([str(path)], None, "sft", 50, seed=0, skip_invalid=False)
    assert len(evaluation) == 1 and len(train) == 4
    assert {ex.response for ex in train} | {ex.response for ex in evaluation} == {f"answer {i}." for i in range(5)}


def test_held_out_slice_is_deterministic_per_seed(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [sft(i) for i in range(60)])

    def held_out(seed):
        _, evaluation, _ = load_splits([str(path)], None, "sft", 6, seed=seed, skip_invalid=False)
        return [ex.response for ex in evaluation]
    first = held_out(3)
    assert held_out(3) == first
    assert any(held_out(seed) != first for seed in (4, 5, 6)), "the held-out slice ignores the seed"


def test_held_out_slice_per_file(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [sft(i) for i in range(30)])
    b = write_jsonl(tmp_path / "b.jsonl", [sft(100 + i) for i in range(20)])
    train, evaluation, _ = load_splits([str(a), str(b)], None, "sft", 10, seed=1, skip_invalid=False)
    numbers = Counter(int(ex.response.split()[1].rstrip(".")) >= 100 for ex in evaluation)
    assert numbers == {False: 3, True: 2}  # 30 // 10 from a, 20 // 10 from b
    assert len(train) == 45
    assert not {ex.response for ex in train} & {ex.response for ex in evaluation}


def test_pairwise_held_out_prompts_never_trained_on(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [pair(i) for i in range(100)])
    train, evaluation, _ = load_splits([str(path)], None, "pairwise", 10, seed=0, skip_invalid=False)
    assert len(evaluation) == 10
    assert not {prompt_key(ex) for ex in train} & {prompt_key(ex) for ex in evaluation}


def test_binary_from_pairs_held_out_prompts_never_trained_on(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [pair(i) for i in range(100)])
    train, evaluation, _ = load_splits([str(path)], None, "binary", 10, seed=0, skip_invalid=False)
    assert evaluation
    assert not {prompt_key(ex) for ex in train} & {prompt_key(ex) for ex in evaluation}


def test_explicit_test_datasets_are_used_whole(tmp_path):
    train_path = write_jsonl(tmp_path / "train.jsonl", [pair(i) for i in range(40)])
    test_path = write_jsonl(tmp_path / "test.jsonl", [pair(1000 + i) for i in range(7)])
    train, evaluation, scorer = load_splits([str(train_path)], [str(test_path)], "pairwise", 2, seed=0,
                                            skip_invalid=False)
    assert sorted(ex.chosen for ex in train) == sorted(f"good answer {i}." for i in range(40))
    assert sorted(ex.chosen for ex in evaluation) == sorted(f"good answer {1000 + i}." for i in range(7))
    assert scorer is None


def test_demo_split_and_scorer(tmp_path):
    train, evaluation, scorer = load_splits(["demo"], None, "pairwise", 5, seed=0, skip_invalid=False)
    assert len(train) == demo.N_TRAIN and len(evaluation) == demo.N_TEST
    assert scorer is demo.score
    assert [ex.chosen for ex in evaluation] == [r["chosen"] for r in demo.records("test")]
    local = write_jsonl(tmp_path / "d.jsonl", [pair(i) for i in range(10)])
    _, evaluation, scorer = load_splits([str(local)], ["demo"], "sft", 5, seed=0, skip_invalid=False)
    assert scorer is demo.score and len(evaluation) == demo.N_TEST
    _, _, scorer = load_splits(["demo"], [str(local)], "sft", 5, seed=0, skip_invalid=False)
    assert scorer is None  # the scorer comes from the eval sources


def test_demo_shapes_via_load_examples():
    records = demo.records("test")
    sft_examples = load_examples("demo", "test", "sft", skip_invalid=False)
    assert [ex.response for ex in sft_examples] == [r["response"] for r in records]
    binary = load_examples("demo", "test", "binary", skip_invalid=False)
    assert len(binary) == 2 * len(records)
    assert [ex.desirable for ex in binary[:4]] == [True, False, True, False]
    assert binary[0].response == records[0]["chosen"] and binary[1].response == records[0]["rejected"]


def test_resolve_source():
    assert resolve_source("demo").scorer is demo.score
    source = resolve_source("some/where.jsonl")
    assert source.load is None and source.scorer is None


# ------------------------------------------------------------------------------ 6. tokenizing

def test_shipped_template_is_chatml(tok):
    messages = [system("S"), user("Q")]
    assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == chatml(messages, True)


@pytest.mark.parametrize("prompt", [
    [user("Shout about the red fox.")],
    [system("You are terse."), user("One?"), assistant("1."), user("Two? ünïcødé ✓")],
])
def test_render_matches_chat_template(tok, prompt):
    response = "THE RED FOX RUNS SLOWLY. ✓"
    prompt_ids, response_ids = render(tok, prompt, response)
    assert prompt_ids == ids(tok, chatml(prompt, generation_prompt=True))
    assert prompt_ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.decode(prompt_ids) == chatml(prompt, generation_prompt=True)
    assert tok.decode(prompt_ids + response_ids) + "\n" == chatml(prompt + [assistant(response)])
    assert tok.decode(response_ids) == response + "<|im_end|>"
    assert render(tok, prompt) == (prompt_ids, [])


def test_response_stops_with_eos(tok):
    _, response_ids = render(tok, [user("Hi?")], "Hello.")
    eos = tok.eos_token_id
    # the template renders 'Hello.<|im_end|>\n': the reply ends at eos, the newline is not trained on
    assert response_ids == ids(tok, "Hello.") + [eos]


def test_eos_is_appended_when_template_has_none(tok, monkeypatch):
    monkeypatch.setattr(tok, "chat_template",
                        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                        "{% if add_generation_prompt %}assistant: {% endif %}")
    prompt_ids, response_ids = render(tok, [user("Hi?")], "Yo.")
    assert prompt_ids == ids(tok, "user: Hi?\nassistant: ")
    assert response_ids == ids(tok, "Yo.\n") + [tok.eos_token_id]


def test_control_tokens_in_written_text_are_text(tok):
    """A response quoting '<|im_end|>' and a prompt quoting '<|im_start|>assistant' keep that text as text:
    the response is not cut at the quote (nor counted as truncated), and the only control tokens are
    the chat template's own."""
    prompt = [system("Never say <|endoftext|>."), user("What ends a turn? Not <|im_start|>assistant\n")]
    response = "The token <|im_end|> does; then <|im_start|>user starts one."
    items, counts = tokenize([Example(prompt, response=response)], tok, max_length=1000, max_prompt_length=500)
    [item] = items
    assert counts == TruncationCounts(prompts=0, responses=0, total=1)
    assert tok.decode(item.responses[0]) == response + "<|im_end|>"
    assert tok.decode(item.prompt) == chatml(prompt, True)
    special = {tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|pad|>")}
    plain = [system("Never say X."), user("What ends a turn? Not X")]
    plain_prompt, plain_response = render(tok, plain, "The token X does.")
    assert [t for t in item.prompt if t in special] == [t for t in plain_prompt if t in special]
    assert [t for t in item.responses[0] if t in special] == [tok.eos_token_id] == plain_response[-1:]
    assert render(tok, prompt, response) == (item.prompt, item.responses[0])
    # text without a quoted control token is tokenized exactly as the tokenizer does it
    assert plain_prompt == ids(tok, chatml(plain, True))


def test_tokenize_without_truncation(tok):
    examples = [Example([user("Q one?")], chosen="Chosen one.", rejected="Rejected, longer one."),
                Example([system("S"), user("Q two?")], chosen="C2.", rejected="R2.")]
    items, counts = tokenize(examples, tok, max_length=1000, max_prompt_length=500)
    assert counts == TruncationCounts(prompts=0, responses=0, total=2)
    for ex, item in zip(examples, items):
        assert item.prompt == ids(tok, chatml(ex.prompt, True))
        assert [tok.decode(r) for r in item.responses] == [ex.chosen + "<|im_end|>", ex.rejected + "<|im_end|>"]
        assert item.desirable is None
        assert len(item) == len(item.prompt) + max(len(r) for r in item.responses)


def test_tokenize_binary_keeps_desirable(tok):
    examples = [Example([user("Q")], response="A", desirable=True), Example([user("Q")], response="B", desirable=False)]
    items, _ = tokenize(examples, tok, 100, 50)
    assert [it.desirable for it in items] == [True, False]
    assert all(len(it.responses) == 1 for it in items)


def test_tokenize_truncates_prompt_from_the_left(tok):
    long_prompt = [user("first turn " * 30), assistant("ok"), user("the last question?")]
    short_prompt = [user("Hi?")]
    examples = [Example(long_prompt, response="Fine."), Example(short_prompt, response="Yes.")]
    full = ids(tok, chatml(long_prompt, True))
    max_prompt_length = 20
    assert len(full) > max_prompt_length >= len(ids(tok, chatml(short_prompt, True)))
    items, counts = tokenize(examples, tok, max_length=200, max_prompt_length=max_prompt_length)
    assert items[0].prompt == full[-max_prompt_length:]
    assert tok.decode(items[0].prompt).endswith("the last question?<|im_end|>\n<|im_start|>assistant\n")
    assert items[0].responses == [ids(tok, "Fine.") + [tok.eos_token_id]]
    assert items[1].prompt == ids(tok, chatml(short_prompt, True))
    assert counts == TruncationCounts(prompts=1, responses=0, total=2)


def test_tokenize_truncates_responses_to_max_length(tok):
    prompt = [user("Tell me everything.")]
    long, short = "word " * 60, "Short."
    examples = [Example(prompt, chosen=long, rejected=short),  # one response too long
                Example(prompt, response=short),
                Example(prompt, response=long)]
    prompt_len = len(ids(tok, chatml(prompt, True)))
    max_length = prompt_len + 12
    items, counts = tokenize(examples, tok, max_length=max_length, max_prompt_length=prompt_len)
    long_ids = ids(tok, long + "<|im_end|>")
    short_ids = ids(tok, short + "<|im_end|>")
    assert len(long_ids) > 12 >= len(short_ids)
    assert items[0].responses == [long_ids[:12], short_ids]  # the response keeps its beginning
    assert items[1].responses == [short_ids]
    assert items[2].responses == [long_ids[:12]]
    for item in items:
        assert all(len(item.prompt) + len(r) <= max_length for r in item.responses)
    assert counts == TruncationCounts(prompts=0, responses=2, total=3)


def test_tokenize_counts_both_truncations(tok):
    prompt = [user("context " * 40)]
    examples = [Example(prompt, response="answer " * 40), Example([user("Hi")], response="Hello")]
    items, counts = tokenize(examples, tok, max_length=30, max_prompt_length=10)
    assert len(items[0].prompt) == 10 and len(items[0].responses[0]) == 20
    assert counts == TruncationCounts(prompts=1, responses=1, total=2)


# ------------------------------------------------------------------------------ 7. collate

PAD = 0


def test_collate_sft_labels_and_padding():
    items = [Tokenized([11, 12, 13], [[21, 22]]), Tokenized([14], [[23, 24, 25, 26, 27, 28]]),
             Tokenized([15, 16], [[29]])]
    batch = collate(items, PAD)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "n"} and batch["n"] == len(items)
    width = max(len(it.prompt) + len(it.responses[0]) for it in items)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, width)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    for row, it in enumerate(items):
        seq = it.prompt + it.responses[0]
        expected_ids = seq + [PAD] * (width - len(seq))
        expected_labels = [-100] * len(it.prompt) + it.responses[0] + [-100] * (width - len(seq))
        expected_mask = [1] * len(seq) + [0] * (width - len(seq))
        assert batch["input_ids"][row].tolist() == expected_ids
        assert batch["labels"][row].tolist() == expected_labels
        assert batch["attention_mask"][row].tolist() == expected_mask


def test_collate_pads_only_to_longest_in_batch(tok):
    examples = [Example([user("Hi")], response="Yo"), Example([user("Hello there, how are you?")], response="Fine")]
    items, _ = tokenize(examples, tok, 500, 250)
    longest = max(len(it.prompt) + len(it.responses[0]) for it in items)
    batch = collate(items, tok.pad_token_id)
    assert batch["input_ids"].shape[1] == longest < 250
    assert batch["attention_mask"].sum(1).tolist() == [len(it.prompt) + len(it.responses[0]) for it in items]
    assert collate(items[:1], tok.pad_token_id)["input_ids"].shape[1] == len(items[0].prompt) + len(items[0].responses[0])


def test_collate_labels_are_positional_when_pad_is_eos():
    eos = 3  # models.load_tokenizer uses eos as pad when a tokenizer has none
    items = [Tokenized([5, 6], [[7, eos]]), Tokenized([5], [[7, 8, 9, eos]])]
    batch = collate(items, pad_id=eos)
    assert batch["labels"][0].tolist() == [-100, -100, 7, eos, -100]
    assert batch["labels"][1].tolist() == [-100, 7, 8, 9, eos]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 1, 0]


def test_collate_pairwise_chosen_then_rejected():
    items = [Tokenized([1, 2], [[10, 11], [12]]), Tokenized([3], [[20, 21, 22], [23, 24, 25, 26]])]
    batch = collate(items, PAD)
    n = len(items)
    assert batch["input_ids"].shape[0] == 2 * n
    rows = [it.prompt + it.responses[0] for it in items] + [it.prompt + it.responses[1] for it in items]
    width = max(map(len, rows))
    assert batch["input_ids"].shape[1] == width
    assert [r[:len(seq)] for r, seq in zip(batch["input_ids"].tolist(), rows)] == rows
    responses = [it.responses[0] for it in items] + [it.responses[1] for it in items]
    prompts = [it.prompt for it in items] * 2
    for row, (p, r) in enumerate(zip(prompts, responses)):
        labels = batch["labels"][row].tolist()
        assert labels == [-100] * len(p) + r + [-100] * (width - len(p) - len(r))
    assert "desirable" not in batch


def test_collate_binary_carries_desirable():
    items = [Tokenized([1], [[2]], True), Tokenized([1], [[3, 4]], False), Tokenized([5], [[6]], True)]
    batch = collate(items, PAD)
    assert batch["desirable"].tolist() == [True, False, True]
    assert batch["desirable"].dtype == torch.bool


# ------------------------------------------------------------------------------ 8. Batches

def make_batches(n=40, batch_size=8, accumulation=2, world_size=2, rank=0, seed=0):
    return Batches(list(range(n)), batch_size, accumulation, world_size, rank, seed)


def test_batches_deterministic_and_seeded():
    a, b = make_batches(seed=1), make_batches(seed=1)
    assert a.global_batch(0, 0) == b.global_batch(0, 0)
    assert a.microbatches(3, 2) == b.microbatches(3, 2)
    assert make_batches(seed=2).global_batch(0, 0) != a.global_batch(0, 0)
    assert a.global_batch(1, 0) != a.global_batch(0, 0)
    epoch0 = [a.global_batch(0, i) for i in range(a.per_epoch)]
    epoch1 = [a.global_batch(1, i) for i in range(a.per_epoch)]
    assert epoch0 != epoch1


def test_batches_ranks_and_microbatches_partition_the_global_batch():
    world, accumulation, batch_size = 2, 2, 8
    ranks = [make_batches(n=44, batch_size=batch_size, accumulation=accumulation, world_size=world, rank=r, seed=5)
             for r in range(world)]
    assert all(b.microbatch_size == batch_size // (world * accumulation) for b in ranks)
    for epoch in (0, 1):
        for index in range(ranks[0].per_epoch):
            global_batch = ranks[0].global_batch(epoch, index)
            assert ranks[1].global_batch(epoch, index) == global_batch
            pieces = [mb for b in ranks for mb in b.microbatches(epoch, index)]
            assert len(pieces) == world * accumulation
            assert all(len(mb) == batch_size // (world * accumulation) for mb in pieces)
            flat = [x for mb in pieces for x in mb]
            assert len(flat) == len(set(flat)) == batch_size
            assert set(flat) == set(global_batch)
        # the ranks see different examples within every step
        r0 = {x for i in range(ranks[0].per_epoch) for mb in ranks[0].microbatches(epoch, i) for x in mb}
        r1 = {x for i in range(ranks[1].per_epoch) for mb in ranks[1].microbatches(epoch, i) for x in mb}
        assert not r0 & r1


@pytest.mark.parametrize("n, batch_size", [(40, 8), (44, 8), (47, 4), (8, 8)])
def test_batches_every_epoch_is_a_permutation(n, batch_size):
    b = make_batches(n=n, batch_size=batch_size, accumulation=1, world_size=1, seed=3)
    assert b.per_epoch == n // batch_size
    for epoch in range(3):
        seen = [x for i in range(b.per_epoch) for x in b.global_batch(epoch, i)]
        assert all(len(b.global_batch(epoch, i)) == batch_size for i in range(b.per_epoch))
        assert len(seen) == len(set(seen)) == b.per_epoch * batch_size
        assert set(seen) <= set(range(n))
        if n % batch_size == 0:
            assert sorted(seen) == list(range(n))


@pytest.mark.parametrize("grouped", [False, True])
def test_batches_order_is_the_seeded_shuffle_and_length_groups(grouped, monkeypatch):
    """The epoch's order, computed here as plainly as possible: a seeded shuffle; with group_by_length,
    each run of GROUP_BATCHES batches sorted by length (stably), then the batches shuffled."""
    monkeypatch.setattr(Batches, "GROUP_BATCHES", 3)
    items = [Tokenized([i] * (i % 7 + 1), [[2] * (i % 5)]) for i in range(100)]  # distinct, lengths repeat
    b = Batches(items, 4, 1, 1, 0, seed=9, group_by_length=grouped)
    for epoch in (0, 2):
        rng = random.Random(9 * 1_000_003 + epoch)
        order = list(range(100))
        rng.shuffle(order)
        if grouped:
            order = [i for g in range(0, 100, 12) for i in sorted(order[g:g + 12], key=lambda i: len(items[i]))]
        batches = [order[k:k + 4] for k in range(0, 100, 4)]
        if grouped:
            rng.shuffle(batches)
        assert [[items.index(x) for x in b.global_batch(epoch, i)] for i in range(b.per_epoch)] == batches


def test_batches_not_divisible_is_a_clear_error():
    with pytest.raises(ValueError) as info:
        make_batches(batch_size=6, accumulation=2, world_size=2)
    message = str(info.value)
    assert "6" in message and "2 x 2" in message and "divisible" in message


def test_batches_too_few_examples():
    with pytest.raises(ValueError, match="less than one batch"):
        make_batches(n=7, batch_size=8)
    make_batches(n=8, batch_size=8)  # exactly one batch is fine


# ------------------------------------------------------------------------ 9. generation_prompts

def test_generation_prompts_distinct_and_at_most_n(tok):
    prompts = [[user(f"Q{i}?")] for i in range(5)] + [[system("S"), user("Q0?")]]
    examples = []
    for p in prompts:  # each prompt twice, as binary examples from pairs are
        examples += [Example(p, response="a", desirable=True), Example(p, response="b", desirable=False)]
    out = generation_prompts(examples, tok, n=100, max_prompt_length=500)
    assert len(out) == len(prompts)
    assert [g.ids for g in out] == [ids(tok, chatml(p, True)) for p in prompts]
    assert [g.text for g in out] == [p[-1]["content"] for p in prompts]
    first3 = generation_prompts(examples, tok, n=3, max_prompt_length=500)
    assert [g.ids for g in first3] == [g.ids for g in out[:3]]
    assert generation_prompts(examples, tok, n=0, max_prompt_length=500) == []  # n_eval_generations=0: none


def test_generation_prompts_keep_last_tokens(tok):
    prompt = [user("background " * 30 + "Shout about the red fox.")]
    [g] = generation_prompts([Example(prompt, response="x")], tok, n=5, max_prompt_length=16)
    assert g.ids == ids(tok, chatml(prompt, True))[-16:]
    assert g.text.endswith("Shout about the red fox.")


# ------------------------------------------------------------------------------ 10. demo

DEMO_PROMPT = re.compile(r"^(Shout|Whisper) about the (\w+) (\w+)\.$")


@pytest.fixture(scope="module")
def demo_splits():
    return {split: demo.records(split) for split in ("train", "test")}


def topics(records):
    return {DEMO_PROMPT.match(r["prompt"]).group(2, 3) for r in records}


def test_demo_records_deterministic(demo_splits):
    for split, records in demo_splits.items():
        assert demo.records(split) == records
    assert len(demo_splits["train"]) == demo.N_TRAIN and len(demo_splits["test"]) == demo.N_TEST
    assert demo_splits["train"][:50] != demo_splits["test"][:50]


def test_demo_topics_disjoint(demo_splits):
    train, test = topics(demo_splits["train"]), topics(demo_splits["test"])
    assert train and test
    assert not train & test
    assert all(a in demo.ADJECTIVES and n in demo.NOUNS for a, n in train | test)


def test_demo_records_well_shaped(demo_splits):
    for records in demo_splits.values():
        instructions = Counter(DEMO_PROMPT.match(r["prompt"]).group(1) for r in records)
        assert set(instructions) == {"Shout", "Whisper"}
        for r in records:
            instruction, adjective, noun = DEMO_PROMPT.match(r["prompt"]).groups()
            shouted = r["chosen"] if instruction == "Shout" else r["rejected"]
            whispered = r["rejected"] if instruction == "Shout" else r["chosen"]
            assert shouted == whispered.upper() and whispered == whispered.lower()
            assert whispered.startswith(f"the {adjective} {noun} ")


def test_demo_score_chosen_and_rejected(demo_splits):
    for records in demo_splits.values():
        for r in records:
            assert demo.score(r["prompt"], r["chosen"]) == {"well_formed": True, "follows_rule": True}
            assert demo.score(r["prompt"], r["rejected"]) == {"well_formed": True, "follows_rule": False}


@pytest.mark.parametrize("response", [
    "the red fox runs",                  # too short
    "the red fox runs slowly",           # no full stop
    "the blue fox runs slowly.",         # wrong topic
    "the red dog runs slowly.",          # wrong topic
    "the red fox flies slowly.",         # unknown verb
    "the red fox runs very slowly.",     # too long
    "a red fox runs slowly.",
    "",
    "THE RED FOX RUNS NOWHERE.",
])
def test_demo_score_malformed(response):
    for prompt in ("Shout about the red fox.", "Whisper about the red fox."):
        assert demo.score(prompt, response) == {"well_formed": False, "follows_rule": False}


def test_demo_score_case_rule():
    assert demo.score("Whisper about the red fox.", "the red fox runs slowly.")["follows_rule"] is True
    assert demo.score("Whisper about the red fox.", "The red fox runs slowly.") == {"well_formed": True,
                                                                                    "follows_rule": False}
    assert demo.score("Shout about the red fox.", "THE RED FOX RUNS SLOWLY.")["follows_rule"] is True
    assert demo.score("Shout about the red fox.", "THE RED FOX RUNS SLOWLy.") == {"well_formed": True,
                                                                                  "follows_rule": False}


def test_demo_score_rejects_non_demo_prompt():
    with pytest.raises(ValueError):
        demo.score("Sing about the red fox.", "the red fox runs slowly.")


def test_demo_unknown_split():
    with pytest.raises(ValueError, match="split"):
        demo.records("validation")


def test_demo_sft_response_is_chosen_or_rejected_evenly(demo_splits):
    for records in demo_splits.values():
        assert all(r["response"] in (r["chosen"], r["rejected"]) for r in records)
        chosen = sum(r["response"] == r["chosen"] for r in records) / len(records)
        assert 0.4 <= chosen <= 0.6


def test_binary_from_messages_takes_the_final_assistant_turn():
    record = {"messages": [user("Q?"), assistant("A.")], "desirable": False}
    [ex] = to_examples(record, "binary")
    assert (ex.prompt, ex.response, ex.desirable) == ([user("Q?")], "A.", False)
