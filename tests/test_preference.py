"""Preference trainers end to end: ln 2 at the start, learning, LoRA, KTO's reference point,
cached reference log-probs, the reward model, and the demo defaults."""
import json
import math

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import ROOT, assert_same_weights, build_trainer, compose, events, train_in_process, weights
from train.data import collate
from train.reference import cache_path

LOSSES = sorted(p.stem for p in (ROOT / "config" / "loss").glob("*.yaml"))
PREFERENCE = [n for n in LOSSES if n not in ("sft", "ppo")]  # PPO: tests/test_ppo.py


def train_losses(run_dir):
    return [e["loss/train"] for e in events(run_dir) if "loss/train" in e]


# The loss at zero margin, where policy = reference (dropout off): what step 1 must log.
AT_START = {"dpo": math.log(2), "cdpo": math.log(2), "sigmoid_norm": math.log(2), "robust": math.log(2),
            "kto": 0.5, "hinge": 1.0, "apo_zero": 1.0, "apo_down": 1.0, "bco_pair": 2 * math.log(2)}


@pytest.mark.parametrize("name", PREFERENCE)
def test_every_loss_trains(name, tmp_path, small_demo):
    """Each loss yaml builds its trainer, starts from the zero-margin value where it has one, runs two
    steps at a high lr, changes every weight tensor, and logs finite losses and its metrics."""
    trainer = build_trainer(tmp_path, f"loss={name}", "exp_name=run", "n_examples=32", "lr=1e-2", *small_demo)
    before = {k: v.clone() for k, v in trainer.accelerator.unwrap_model(trainer.policy).state_dict().items()}
    trainer.train()
    after = trainer.accelerator.unwrap_model(trainer.policy).state_dict()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"{name}: weights did not change: {unchanged[:5]}"
    logged = events(tmp_path / "run")
    assert all(math.isfinite(e["loss/train"]) for e in logged if "loss/train" in e), name
    if name in AT_START:
        assert train_losses(tmp_path / "run")[0] == pytest.approx(AT_START[name], abs=1e-6), name
    final_eval = [e for e in logged if "loss/eval" in e][-1]
    assert {"rewards_eval/chosen", "rewards_eval/rejected", "rewards_eval/accuracies",
            "rewards_eval/margins"} <= final_eval.keys(), name
    # what the trainer declares (keep_best_metric is checked against it) is what it reports
    assert {k for k in final_eval if k.endswith("/eval") or "_eval/" in k} == set(type(trainer).eval_metrics), name


def test_dpo_first_loss_is_ln2_with_dropout_in_the_model(tmp_path):
    """GPT-2 has dropout everywhere; the trainer turns it off so policy and reference agree."""
    import transformers
    from transformers import AutoTokenizer
    from conftest import TINY
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=len(tokenizer), resid_pdrop=0.3,
                                     embd_pdrop=0.3, attn_pdrop=0.3)
    source = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(config).save_pretrained(source)
    tokenizer.save_pretrained(source)
    train_in_process(tmp_path, "loss=dpo", "model=gpt2", f"model.name_or_path={source}", "model.max_length=96",
                     "model.max_prompt_length=48", "exp_name=run", "n_examples=16")
    assert train_losses(tmp_path / "run")[0] == pytest.approx(math.log(2), abs=1e-6)


def test_lora_dpo_keeps_the_base_frozen_and_uses_it_as_reference(tmp_path):
    trainer = build_trainer(tmp_path, "loss=dpo", "model.use_peft=true", "exp_name=run", "n_examples=32", "lr=1e-2")
    assert trainer.reference.copy is None  # the adapter-disabled base, not a copy
    policy = trainer.accelerator.unwrap_model(trainer.policy)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    trainer.train()
    after = policy.state_dict()
    for k in before:
        if "lora_" in k:
            continue
        assert torch.equal(before[k], after[k]), f"base weight {k} changed"
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)
    assert train_losses(tmp_path / "run")[0] == pytest.approx(math.log(2), abs=1e-6)


# SGD so that the loss scale matters; 6 examples a step.
KTO_EXACT = ["loss=kto", "n_examples=12", "model.batch_size=6", "optimizer=SGD", "lr=0.5", "lr_schedule=constant",
             "warmup=0"]


def test_kto_reference_point_is_per_optimizer_step(tmp_path):
    """Microbatches of 1, 2 and 3 (odd, and size 1) give the same training: z0 is gathered over the
    whole step, never estimated per microbatch, and nothing is NaN."""
    runs = {}
    for accumulation in (6, 3, 2):
        final = train_in_process(tmp_path, *KTO_EXACT, f"model.gradient_accumulation_steps={accumulation}",
                                 f"exp_name=ga{accumulation}")
        runs[accumulation] = weights(final)
        assert all(math.isfinite(x) for x in train_losses(tmp_path / f"ga{accumulation}"))
    for accumulation in (3, 2):
        assert_same_weights(runs[accumulation], runs[6], atol=1e-6)


def test_kto_reference_point_matches_an_independent_estimate(tmp_path):
    """After a step, z0 = max(0, mean over the step's examples of log pi(y'|x) - log ref(y'|x)),
    y' another prompt's response: recomputed here from the models, row by row."""
    trainer = build_trainer(tmp_path, *KTO_EXACT, "exp_name=run", "model.gradient_accumulation_steps=3", "lr=5.0")
    trainer.total_steps = 2
    trainer.train()
    policy = trainer.accelerator.unwrap_model(trainer.policy)
    # recompute, with the trainer's own hook, the z0 a third step would use on the first batch
    microbatches = [collate(mb, trainer.tokenizer.pad_token_id) for mb in trainer.batches.microbatches(0, 0)]
    trainer.begin_step(microbatches)
    expected = []
    with torch.no_grad():
        for item in [it for mb in trainer.batches.microbatches(0, 0) for it in mb]:
            ids = torch.tensor([item.prompt + item.mismatch])
            def logp(model):
                logprobs = torch.log_softmax(model(ids).logits[0].double(), -1)
                return sum(logprobs[t - 1, ids[0, t]].item() for t in range(len(item.prompt), ids.shape[1]))
            expected.append(logp(policy) - logp(trainer.reference.copy))
    mean = sum(expected) / len(expected)
    assert trainer.reference_point.item() == pytest.approx(max(0.0, mean), abs=1e-4)
    assert mean != 0.0


@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_cached_reference_logps_give_the_same_training(loss, tmp_path, small_demo, caplog):
    common = [f"loss={loss}", "n_examples=32", "model.batch_size=8", "log_every=1", *small_demo]
    plain = train_in_process(tmp_path, *common, "exp_name=plain")
    cached = train_in_process(tmp_path, *common, "exp_name=cached", "cache_reference_logprobs=true")
    files = list((tmp_path / "reference_logps").glob("*.safetensors"))
    assert len(files) == 1
    assert train_losses(tmp_path / "cached") == pytest.approx(train_losses(tmp_path / "plain"), abs=1e-5)
    assert_same_weights(weights(cached), weights(plain), atol=1e-5)

    # a second run (a sweep job, say) reuses the file; a damaged entry fails loudly
    mtime = files[0].stat().st_mtime_ns
    train_in_process(tmp_path, *common, "exp_name=again", "cache_reference_logprobs=true", "lr=2e-3")
    assert files[0].stat().st_mtime_ns == mtime
    # A damaged file (an entry missing, or cut short) is named, set aside and computed again.
    for damage in ("nan", "truncate"):
        if damage == "nan":
            tables = load_file(files[0])
            tables["train"][3, 0] = float("nan")
            save_file(tables, files[0])
        else:
            files[0].write_bytes(files[0].read_bytes()[:100])
        with caplog.at_level("WARNING"):
            again = train_in_process(tmp_path, *common, f"exp_name={damage}", "cache_reference_logprobs=true")
        assert any(f"{files[0]} is {'no complete entry' if damage == 'nan' else 'unreadable'}" in r.getMessage()
                   and "setting it aside" in r.getMessage() for r in caplog.records)
        assert_same_weights(weights(again), weights(plain), atol=1e-5)
    assert len(list(files[0].parent.glob(f"{files[0].name}.corrupt-*"))) == 2


def test_reference_cache_key_covers_weights_and_tokenization(tmp_path):
    trainer = build_trainer(tmp_path, "loss=dpo", "exp_name=run")
    from train.tokens import TokenStore
    items = trainer.batches.items
    same = TokenStore({name: np.array(array) for name, array in items.arrays.items()}, items.k)
    assert cache_path("c", "w1", {"train": items}) == cache_path("c", "w1", {"train": same})
    assert cache_path("c", "w1", {"train": items}) != cache_path("c", "w2", {"train": items})
    for name in ("prompt_tokens", "response_tokens", "response_lengths"):  # one token, or where a response ends
        changed = dict(same.arrays, **{name: np.array(same.arrays[name])})
        changed[name][-1] += 1
        if name == "response_lengths":
            changed[name][-2] -= 1
        assert cache_path("c", "w1", {"train": items}) != cache_path("c", "w1", {"train": TokenStore(changed, items.k)})


def test_sync_reference_mixes_the_policy_in(tmp_path):
    trainer = build_trainer(tmp_path, "loss=dpo", "exp_name=run", "n_examples=32", "model.batch_size=16",
                            "sync_reference_every=2", "sync_reference_alpha=0.25", "lr=1e-2")
    policy = trainer.accelerator.unwrap_model(trainer.policy)
    initial = {k: v.clone() for k, v in trainer.reference.state_dict().items()}
    trainer.total_steps = 1
    trainer.train()  # no sync yet
    assert all(torch.equal(initial[k], v) for k, v in trainer.reference.state_dict().items())
    before = {k: v.clone() for k, v in trainer.reference.state_dict().items()}
    trainer.total_steps = 2
    trainer.train()
    for k, ref in trainer.reference.state_dict().items():
        expected = 0.75 * before[k] + 0.25 * policy.state_dict()[k]
        torch.testing.assert_close(ref, expected, atol=1e-6, rtol=0)


def test_reward_model_saves_and_reloads(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from train import data
    final = train_in_process(tmp_path, "loss=bradley-terry", "exp_name=rm", "n_examples=256", "model.batch_size=32")
    model = AutoModelForSequenceClassification.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert model.config.num_labels == 1
    logged = [e for e in events(tmp_path / "rm") if "loss/eval" in e][-1]
    cfg = compose([])
    _, evaluation, _ = data.load_splits(["demo"], None, "pairwise", 32, 0, False)
    import random
    random.Random(cfg.seed).shuffle(evaluation)
    items, _ = data.tokenize(evaluation[:32], tokenizer, cfg.model.max_length, cfg.model.max_prompt_length)
    wins = 0
    with torch.no_grad():
        for item in items:
            scores = [model(torch.tensor([item.prompt + r])).logits[0, 0].item() for r in item.responses]
            wins += scores[0] > scores[1]
    assert wins / len(items) == pytest.approx(logged["rewards_eval/accuracies"], abs=1e-9)


@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_defaults_learn_the_demo_rule(loss, tmp_path):
    """Acceptance: bare `launch.py loss=dpo|kto model=tiny`, every other setting at its default, reaches
    held-out reward accuracy >= 0.9 on demo."""
    from launch import run
    run(compose([f"loss={loss}", f"cache_dir={tmp_path}", "wandb.mode=disabled"]))
    final_eval = [e for e in events(tmp_path / f"{loss}-tiny") if "loss/eval" in e][-1]
    assert final_eval["rewards_eval/accuracies"] >= 0.9


def test_loss_yamls_declare_their_trainer():
    from train.trainers import TRAINERS
    for name in LOSSES:
        spec = yaml.safe_load((ROOT / "config" / "loss" / f"{name}.yaml").read_text())
        assert spec["name"] == name and spec["trainer"] in TRAINERS


def test_kto_trains_on_truly_unpaired_binary_data(tmp_path):
    """Binary records with no pairs at all: KTO trains, and evaluates on binary examples."""
    from train import demo
    records = []
    for i, r in enumerate(demo.records("train")[:40]):  # each prompt appears once, with one response
        desirable = i % 3 != 0
        records.append({"prompt": r["prompt"], "response": r["chosen"] if desirable else r["rejected"],
                        "desirable": desirable})
    path, test_path = tmp_path / "binary.jsonl", tmp_path / "binary-test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records[:32]))
    test_path.write_text("".join(json.dumps(r) + "\n" for r in records[32:]))
    trainer = build_trainer(tmp_path, "loss=kto", "exp_name=run", f"datasets=[{path}]",
                            f"test_datasets=[{test_path}]", "n_examples=16", "model.batch_size=8")
    assert all(it.mismatch is not None and it.desirable is not None for it in trainer.batches.items)
    assert all(it.desirable is not None for it in trainer.eval_items)  # no pairs to evaluate on
    trainer.train()
    final_eval = [e for e in events(tmp_path / "run") if "loss/eval" in e][-1]
    assert math.isfinite(final_eval["loss/eval"])
    assert {"rewards_eval/chosen", "rewards_eval/rejected", "rewards_eval/KL"} <= final_eval.keys()
