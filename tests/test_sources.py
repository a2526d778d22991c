"""Data from anywhere (train/data.py): every source kind the `datasets` library reads, TRL's dataset
formats, column_map and mixtures. Each is checked against the same records written as our own JSONL,
down to the token ids, so a format is right when it trains on exactly what ours would."""
import json
import os
import pathlib
import subprocess
import sys

import datasets
import pytest
from transformers import AutoTokenizer

from train.data import DataError, load_examples, load_splits, tokenize

TINY = "train/assets/tiny"
ROOT = pathlib.Path(__file__).resolve().parents[1]
RECORDS = [{"prompt": f"Question {i}: what is {i} + {i}?", "response": f"It is {2 * i}."} for i in range(12)]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TINY)


def jsonl(path: pathlib.Path, records: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def tokens(spec, shape: str, tok) -> list:
    items, _ = tokenize(load_examples(spec, "train", shape, skip_invalid=False), tok, 256, 128)
    return [(item.prompt, item.responses, item.desirable) for item in items]


SOURCES = {
    "parquet": lambda d: datasets.Dataset.from_list(RECORDS).to_parquet(str(d / "data.parquet")) and str(d / "data.parquet"),
    "csv": lambda d: datasets.Dataset.from_list(RECORDS).to_csv(str(d / "data.csv"), index=False) and str(d / "data.csv"),
    "save_to_disk dir": lambda d: datasets.Dataset.from_list(RECORDS).save_to_disk(str(d / "saved")) or str(d / "saved"),
    "arrow files": lambda d: datasets.Dataset.from_list(RECORDS).save_to_disk(str(d / "saved")) or str(d / "saved" / "*.arrow"),
    "jsonl glob": lambda d: (jsonl(d / "a.jsonl", RECORDS[:5]), jsonl(d / "b.jsonl", RECORDS[5:])) and str(d / "*.jsonl"),
    "dir of parquet files": lambda d: (d / "repo" / "data").mkdir(parents=True) or datasets.Dataset.from_list(
        RECORDS).to_parquet(str(d / "repo" / "data" / "train-00000-of-00001.parquet")) and str(d / "repo"),
}


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_every_source_kind_gives_the_tokens_of_the_same_records_as_jsonl(kind, tmp_path, tok):
    ours = jsonl(tmp_path / "ours.jsonl", RECORDS)
    (tmp_path / kind.replace(" ", "-")).mkdir()
    spec = SOURCES[kind](tmp_path / kind.replace(" ", "-"))
    assert tokens(spec, "sft", tok) == tokens(ours, "sft", tok)


def test_a_hub_dataset_in_the_cache_loads_offline(tmp_path):
    """A dataset repo in the Hugging Face cache (as a download leaves it) loads by its id with
    HF_HUB_OFFLINE=1 and no network, config and split included."""
    cache = tmp_path / "hub"
    snapshot = cache / "datasets--someone--qa" / "snapshots" / ("0" * 40)
    (snapshot / "data").mkdir(parents=True)
    datasets.Dataset.from_list(RECORDS).to_parquet(str(snapshot / "data" / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_list(RECORDS[:3]).to_parquet(str(snapshot / "data" / "test-00000-of-00001.parquet"))
    (cache / "datasets--someone--qa" / "refs").mkdir()
    (cache / "datasets--someone--qa" / "refs" / "main").write_text("0" * 40)
    script = ("from train.data import load_examples\n"
              "for spec in ('someone/qa', 'someone/qa@test'):\n"
              "    print(spec, len(load_examples(spec, 'train', 'sft', False)))\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache),
                                 "HF_DATASETS_CACHE": str(tmp_path / "datasets"), "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[:2] == ["someone/qa 12", "someone/qa@test 3"]


QA = [("What is the capital of France?", "Paris.", "Lyon."), ("Name a prime.", "Seven.", "Nine."),
      ("Say hi.", "Hi!", "No.")]
U, A = (lambda t: {"role": "user", "content": t}), (lambda t: {"role": "assistant", "content": t})
# TRL's formats (left) and our records of the same data (right).
FORMATS = {
    "prompt-completion": ("sft", [{"prompt": q, "completion": c} for q, c, _ in QA],
                          [{"prompt": q, "response": c} for q, c, _ in QA]),
    "conversational prompt-completion": ("sft", [{"prompt": [U(q)], "completion": [A(c)]} for q, c, _ in QA],
                                         [{"prompt": q, "response": c} for q, c, _ in QA]),
    "conversational language modeling": ("sft", [{"messages": [U(q), A(c)]} for q, c, _ in QA],
                                         [{"prompt": q, "response": c} for q, c, _ in QA]),
    "preference": ("pairwise", [{"prompt": q, "chosen": c, "rejected": r} for q, c, r in QA],
                   [{"prompt": q, "chosen": c, "rejected": r} for q, c, r in QA]),
    "conversational preference": ("pairwise", [{"prompt": [U(q)], "chosen": [A(c)], "rejected": [A(r)]}
                                               for q, c, r in QA],
                                  [{"prompt": q, "chosen": c, "rejected": r} for q, c, r in QA]),
    "implicit-prompt preference": ("pairwise", [{"chosen": [U("Hello."), A("Hi."), U(q), A(c)],
                                                 "rejected": [U("Hello."), A("Hi."), U(q), A(r)]} for q, c, r in QA],
                                   [{"prompt": [U("Hello."), A("Hi."), U(q)], "chosen": c, "rejected": r}
                                    for q, c, r in QA]),
    "unpaired preference": ("binary", [{"prompt": q, "completion": c, "label": i % 2 == 0}
                                       for i, (q, c, _) in enumerate(QA)],
                            [{"prompt": q, "response": c, "desirable": i % 2 == 0} for i, (q, c, _) in enumerate(QA)]),
    "prompt-only": ("prompt", [{"prompt": [U(q)]} for q, _, _ in QA], [{"prompt": q} for q, _, _ in QA]),
}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_each_trl_format_gives_the_tokens_of_our_equivalent_jsonl(name, tmp_path, tok):
    shape, theirs, ours = FORMATS[name]
    path = tmp_path / "theirs.parquet"
    datasets.Dataset.from_list(theirs).to_parquet(str(path))
    assert tokens(str(path), shape, tok) == tokens(jsonl(tmp_path / "ours.jsonl", ours), shape, tok)


def test_column_map_renames_columns_and_unknown_columns_stop_in_one_line(tmp_path, tok):
    path = tmp_path / "qa.parquet"
    datasets.Dataset.from_list([{"question": r["prompt"], "answer": r["response"]} for r in RECORDS]).to_parquet(str(path))
    mapped = {"path": str(path), "column_map": {"question": "prompt", "answer": "response"}}
    assert tokens(mapped, "sft", tok) == tokens(jsonl(tmp_path / "ours.jsonl", RECORDS), "sft", tok)
    with pytest.raises(DataError) as error:
        load_examples(str(path), "train", "sft", skip_invalid=False)
    assert str(error.value).startswith(f"{path}: columns ['answer', 'question'] fit no record shape (one of: "
                                       f"prompt + response; prompt + completion; messages;")
    assert "\n" not in str(error.value)


def test_a_bad_row_is_named_by_dataset_split_and_row(tmp_path):
    rows = [*RECORDS[:3], {"prompt": "Empty?", "response": " "}, *RECORDS[3:]]
    path = tmp_path / "data.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    with pytest.raises(DataError, match=rf"^{path}\[train\] row 3: field 'response' is empty$"):
        load_examples(str(path), "train", "sft", skip_invalid=False)
    assert len(load_examples(str(path), "train", "sft", skip_invalid=True)) == len(RECORDS)


def test_a_mixture_takes_each_datasets_share_by_seed(tmp_path):
    first = jsonl(tmp_path / "first.jsonl", [{"prompt": f"first {i}", "response": "a"} for i in range(40)])
    second = jsonl(tmp_path / "second.jsonl", [{"prompt": f"second {i}", "response": "b"} for i in range(10)])
    mixture = [{"path": first, "n": 8}, {"path": second, "fraction": 2.5}]
    evaluation = [jsonl(tmp_path / "eval.jsonl", RECORDS)]
    train, _, _ = load_splits(mixture, evaluation, "sft", 4, seed=0, skip_invalid=False)
    counts = {name: sum(ex.prompt[0]["content"].startswith(name) for ex in train) for name in ("first", "second")}
    assert counts == {"first": 8, "second": 25}
    assert len({ex.prompt[0]["content"] for ex in train if ex.response == "b"}) == 10, "all of second, then more"
    again, _, _ = load_splits(mixture, evaluation, "sft", 4, seed=0, skip_invalid=False)
    other, _, _ = load_splits(mixture, evaluation, "sft", 4, seed=1, skip_invalid=False)
    assert again == train and other != train


def test_sampling_from_a_lora_step_and_a_final_gives_each_checkpoints_own_greedy_completions(tmp_path, monkeypatch):
    """scripts/sample.py on a LoRA step-N (the adapter over the base rebuilt as training built it) and on
    FINAL writes the completions that model gives, here greedy: the same as generating with the trainer
    restored from that step-N, and with FINAL loaded by transformers alone."""
    import runpy
    from types import SimpleNamespace

    import torch
    from transformers import AutoModelForCausalLM

    from conftest import build_trainer, train_in_process
    from train import checkpoint, data
    from train.generation import generate
    lora = ["exp_name=lora", "model.use_peft=true", "lr=0.05", "intermediate_checkpoints=true", "save_every=2"]
    final = train_in_process(tmp_path, *lora)
    prompts = jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"], "topic": i} for i, r in enumerate(RECORDS[:5])])

    def sample(directory, engine="auto") -> list[dict]:
        out = tmp_path / f"{directory.name}-{engine}.jsonl"
        monkeypatch.setattr(sys, "argv", ["sample.py", str(directory), "--datasets", prompts, "--out", str(out),
                                          "--temperature", "0", "--max-new-tokens", "8", "--batch-size", "2",
                                          "--engine", engine])
        runpy.run_path(str(ROOT / "scripts" / "sample.py"), run_name="__main__")
        return [json.loads(line) for line in out.read_text().splitlines()]

    def greedy(model, tokenizer) -> list[str]:
        ids = [data.render(tokenizer, [{"role": "user", "content": r["prompt"]}])[0] for r in RECORDS[:5]]
        out = generate(model, ids, tokenizer, 8, torch.device("cpu"))
        return [tokenizer.decode(row[mask], skip_special_tokens=True) for row, mask in zip(out.responses, out.response_mask)]

    step = tmp_path / "lora" / "step-2"
    trainer = build_trainer(tmp_path / "again", *lora)
    trainer.restore(checkpoint.read(step))
    sampled = sample(step)
    assert [s["completion"] for s in sampled] == greedy(trainer.policy.eval(), trainer.tokenizer)
    base = build_trainer(tmp_path / "base", "exp_name=base")
    assert [s["completion"] for s in sampled] != greedy(base.policy.eval(), base.tokenizer), "the adapter counts"
    assert [s["reference"] for s in sampled] == [{"topic": i} for i in range(5)]
    assert sampled[0]["prompt"] == [{"role": "user", "content": RECORDS[0]["prompt"]}]
    assert [s["completion"] for s in sample(final)] == greedy(AutoModelForCausalLM.from_pretrained(final),
                                                              trainer.tokenizer)

    # vLLM's path, with a stand-in for vLLM (there is no GPU here) that loads the dir it is given with
    # transformers: a LoRA step-N reaches it merged, and greedy completions come back in order.
    made = []

    class LLM:
        def __init__(self, model, tokenizer, seed, dtype):
            self.model = AutoModelForCausalLM.from_pretrained(model).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)
            made.append({"dtype": dtype, "seed": seed, "files": sorted(p.name for p in pathlib.Path(model).iterdir())})

        def generate(self, prompts, params):
            assert params.temperature == 0 and params.max_tokens == 8
            out = generate(self.model, [p["prompt_token_ids"] for p in prompts], self.tokenizer, params.max_tokens,
                           torch.device("cpu"))
            return [SimpleNamespace(outputs=[SimpleNamespace(text=self.tokenizer.decode(row[mask], skip_special_tokens=True))])
                    for row, mask in zip(out.responses, out.response_mask)]
    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(LLM=LLM, SamplingParams=lambda **k: SimpleNamespace(**k)))
    assert sample(step, "vllm") == sampled and sample(final, "vllm") == sample(final, "transformers")
    assert made[0]["dtype"] == trainer.cfg.model.dtype and "adapter_config.json" not in made[0]["files"], "merged"


def test_two_ranks_tokenize_once_and_a_later_run_not_at_all(tmp_path, runs, small_demo):
    from conftest import FAST

    def ranks(name):
        started = runs.ranks(2, f"cache_dir={tmp_path}", f"exp_name={name}", *FAST, *small_demo, cwd=tmp_path)
        assert [rank.wait() for rank in started] == [0, 0], started[1].stderr()[-3000:]
        return [rank.loaded().count("tokenize") for rank in started]
    assert ranks("first") == [2, 0], "rank 0 tokenizes train and eval data; rank 1 reads its files"
    assert ranks("second") == [0, 0]

    # A mistake rank 0 finds in the data stops rank 1 too (it was waiting for the tokens file), in one line
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"prompt": "q", "response": ""}) + "\n")
    started = runs.ranks(2, f"cache_dir={tmp_path}", "exp_name=bad", *FAST, f"datasets=[{bad}]", "test_datasets=[demo]",
                         cwd=tmp_path)
    assert [rank.wait() for rank in started] == [1, 1]
    for rank in started:
        assert f"error: {bad}:2: field 'response' is empty" in rank.stderr(), rank.stderr()[-2000:]
