"""SFT end to end: the loss against an independent computation, batching equivalences, the files
a run writes, FINAL loading with transformers alone, LoRA, sweeps and bad data."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import FAST, assert_same_weights, build_trainer, compose, events, launch_cli, train_in_process, weights
from train import losses
from train.errors import CheckpointError, TrainingError
from train.optim import lr_lambda

CHECKPOINT_FILES = {"config.json", "generation_config.json", "model.safetensors", "optimizer.pt", "scheduler.pt",
                    "metrics.json", "tokenizer.json", "tokenizer_config.json"}


def test_token_logps_match_an_explicit_loop():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 1, -100], [-100, 2, 6, 0, 4]])
    logps, mask = losses.token_logps(logits[:, :-1][labels[:, 1:] != -100], labels)
    for b in range(2):
        for t in range(1, 5):
            expected = torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]] if labels[b, t] != -100 else 0.0
            assert mask[b, t - 1] == (labels[b, t] != -100)
            assert torch.isclose(logps[b, t - 1], torch.as_tensor(expected), atol=1e-6)


def test_first_logged_loss_is_mean_nll_of_response_tokens(tmp_path, tokenizer):
    """loss/train at step 1 = mean over the first global batch's response tokens of -log p, computed here
    from the initial weights and the raw text, without the trainer's code."""
    final = train_in_process(tmp_path, "exp_name=a", "n_examples=16")
    first = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1

    from train import data
    from train.models import load_policy
    cfg = compose([])
    model = load_policy(cfg.model, cfg.seed)
    examples, _, _ = data.load_splits(["demo"], None, "sft", 32, cfg.seed, False)
    items, _ = data.tokenize(examples, tokenizer, cfg.model.max_length, cfg.model.max_prompt_length)
    batch = data.Batches(items, 16, 1, 1, 0, cfg.seed, cfg.group_by_length).global_batch(0, 0)
    total, count = 0.0, 0
    with torch.no_grad():
        for item in batch:
            ids = torch.tensor([item.prompt + item.responses[0]])
            logprobs = torch.log_softmax(model(ids).logits[0].double(), -1)
            for t in range(len(item.prompt), ids.shape[1]):
                total -= logprobs[t - 1, ids[0, t]].item()
                count += 1
    assert first["loss/train"] == pytest.approx(total / count, rel=1e-5)
    assert final.is_dir()


# Plain SGD: unlike Adam it is not invariant to the loss scale, so a mis-normalised loss shows.
EXACT = ["n_examples=32", "model.batch_size=16", "lr_schedule=constant", "warmup=0", "optimizer=SGD", "lr=0.5"]


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    common = EXACT
    one = train_in_process(tmp_path, "exp_name=one", *common)
    accumulated = train_in_process(tmp_path, "exp_name=acc", *common, "model.gradient_accumulation_steps=4")
    assert_same_weights(weights(one), weights(accumulated), atol=1e-6)
    base = weights(train_in_process(tmp_path, "exp_name=other", *common, "seed=1"))
    assert not torch.equal(base["lm_head.weight"], weights(one)["lm_head.weight"])


ACCELERATE = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no")


def test_two_rank_ddp_matches_one_process(tmp_path):
    """Real 2-process gloo DDP under `accelerate launch`: each rank trains on its shard; weights equal a
    1-process run. (Under torchrun, with a preemption in between: tests/test_checkpoints.py.)"""
    args = [f"cache_dir={tmp_path}", *FAST, *EXACT]
    single = train_in_process(tmp_path, "exp_name=single", *EXACT)
    result = launch_cli(*args, "exp_name=ddp", launcher=ACCELERATE,
                        env={"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training on 2 process(es)" in result.stdout
    log = (tmp_path / "ddp" / "metrics.jsonl").read_text()
    assert_same_weights(weights(single), weights(tmp_path / "ddp" / "FINAL"), atol=1e-6)
    assert json.loads(log.splitlines()[0])["loss/train"] == pytest.approx(
        json.loads((tmp_path / "single" / "metrics.jsonl").read_text().splitlines()[0])["loss/train"], rel=1e-6)


def test_cli_run_writes_final_that_transformers_loads(tmp_path):
    """Acceptance: `launch.py loss=sft model=tiny exp_name=e cache_dir=runs n_examples=64`, then FINAL
    loads and generates in a fresh process with transformers alone, offline."""
    result = launch_cli("loss=sft", "model=tiny", "exp_name=e", "cache_dir=runs", "n_examples=64",
                        "model.batch_size=16", "n_eval_examples=32", "n_eval_generations=4", "intermediate_checkpoints=true",
                        "save_every=2", "eval_every=2", cwd=tmp_path, env={"WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "e"
    final = run_dir / "FINAL"
    assert "FINAL: runs/e/FINAL" in result.stdout
    assert CHECKPOINT_FILES <= {p.name for p in final.iterdir()}
    assert CHECKPOINT_FILES <= {p.name for p in (run_dir / "step-2").iterdir()}
    assert not (run_dir / "step-4").exists()  # the last step is FINAL
    assert {p.name for p in run_dir.iterdir()} >= {"FINAL", "step-2", "metrics.jsonl", "config.yaml",
                                                    "curves.png", "wandb"}

    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_events = [e for e in events if "loss/train" in e]
    eval_events = [e for e in events if "loss/eval" in e]
    assert [e["step"] for e in eval_events] == [0, 2, 4]  # do_first_eval, every 2 steps, final
    assert train_events[0]["step"] == 1
    for e in train_events:
        assert {"step", "examples", "tokens", "loss/train", "lr", "grad_norm", "tokens_per_second"} <= e.keys()
        assert e["examples"] == 16 * e["step"]
    assert train_events[-1]["tokens"] > train_events[0]["tokens"] > 0

    saved = json.loads((final / "metrics.json").read_text())
    assert saved["step"] == 4 and saved["examples"] == 64
    assert saved["loss/eval"] == eval_events[-1]["loss/eval"]
    assert saved["wandb_run_id"] and list((run_dir / "wandb").glob(f"offline-run-*-{saved['wandb_run_id']}"))

    check = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)
ids = tok.apply_chat_template([{"role": "user", "content": "Shout about the red fox."}], add_generation_prompt=True,
                              return_tensors="pt", return_dict=True)
out = model.generate(**ids, max_new_tokens=5, do_sample=False)
assert out.shape[1] > ids["input_ids"].shape[1]
print("generated", repr(tok.decode(out[0, ids["input_ids"].shape[1]:])))
"""
    loaded = subprocess.run([sys.executable, "-c", check, str(final)], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert "generated" in loaded.stdout


def test_broken_jsonl_line_is_named(tmp_path, runs):
    data = tmp_path / "pairs.jsonl"
    good = json.dumps({"prompt": "hi", "response": "hello"})
    data.write_text("\n".join([good, good, '{"prompt": "hi", "response": ', good]) + "\n")
    run = runs.start(f"datasets=[{data}]", f"cache_dir={tmp_path / 'runs'}", cwd=tmp_path)
    assert run.wait() != 0
    assert f"{data}:3: malformed JSON" in run.stderr()
    assert not (tmp_path / "runs" / "sft-tiny" / "FINAL").exists()


def test_lora_trains_adapter_only(tmp_path):
    from peft import PeftModel

    from train.models import load_policy
    train_in_process(tmp_path, "exp_name=lora", "model.use_peft=true", "lr=1e-2", "intermediate_checkpoints=true",
                     "save_every=2")
    adapter = tmp_path / "lora" / "step-2"  # FINAL holds the merged model (tests/test_checkpoints.py)
    saved = load_file(adapter / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in saved.items())  # B starts at 0
    base = load_policy(compose([]).model, 0)
    adapted = PeftModel.from_pretrained(load_policy(compose([]).model, 0), adapter)
    base_weights = {k: v for k, v in base.state_dict().items()}
    for k, v in adapted.get_base_model().state_dict().items():
        if "lora_" not in k:
            torch.testing.assert_close(v, base_weights[k.replace(".base_layer", "")], atol=0, rtol=0)


def test_multirun_sweep_with_the_swept_key_in_exp_name_gives_each_job_its_dir(tmp_path, runs):
    run = runs.start("-m", "lr=1e-3,2e-3", "exp_name=sweep-lr${lr}", f"cache_dir={tmp_path}", *FAST, "n_examples=16")
    assert run.wait() == 0, run.stderr()[-3000:]
    for lr in ("0.001", "0.002"):
        run_dir = tmp_path / f"sweep-lr{lr}"
        assert (run_dir / "FINAL" / "model.safetensors").exists()
        assert f"lr: {lr}" in (run_dir / "config.yaml").read_text()


def test_lr_schedules():
    warm = lr_lambda(10, 0.2, "linear")
    assert [warm(s) for s in range(3)] == [0.5, 1.0, 1.0]
    assert warm(9) == pytest.approx(1 - 7 / 8)
    cosine = lr_lambda(10, 0.0, "cosine")
    assert cosine(0) == 1.0 and cosine(5) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_lambda(10, 0.0, "constant")(9) == 1.0


# ------------------------------------------------------------------------ non-finite numbers

def poison_step(trainer, step: int) -> None:
    """Make the loss of optimizer step `step` (1-based) NaN, as a bad batch or an overflow would."""
    loss = trainer.microbatch_loss

    def nan_at_step(model, batch):
        value, stats = loss(model, batch)
        return (value * float("nan") if trainer.step + 1 == step else value), stats
    trainer.microbatch_loss = nan_at_step


def test_a_non_finite_step_stops_the_run_unsaved(tmp_path):
    """SGD at lr=1e12 blows the weights up: the run stops at the first non-finite gradient, naming the
    step; every checkpoint it wrote holds finite weights."""
    with pytest.raises(TrainingError, match=r"non-finite numbers at step \d+ \(loss .*, gradient norm nan\)"):
        train_in_process(tmp_path, "exp_name=run", "optimizer=SGD", "lr=1e12", "intermediate_checkpoints=true",
                         "save_every=1")
    saved = list((tmp_path / "run").glob("step-*"))
    assert saved and not (tmp_path / "run" / "FINAL").exists()
    assert all(torch.isfinite(t).all() for step in saved for t in weights(step).values())

    trainer = build_trainer(tmp_path, "exp_name=poisoned", "intermediate_checkpoints=true", "save_every=1")
    poison_step(trainer, 3)
    with pytest.raises(TrainingError, match="non-finite numbers at step 3 \\(loss nan"):
        trainer.train()
    assert sorted(p.name for p in (tmp_path / "poisoned").glob("step-*")) == ["step-1", "step-2"]


def test_max_nonfinite_steps_skips_and_counts_them(tmp_path):
    """With max_nonfinite_steps=1 a NaN step is skipped (no update: AdamW counts one step fewer),
    counted in the log and the checkpoint, and the run finishes."""
    trainer = build_trainer(tmp_path, "exp_name=run", "max_nonfinite_steps=1")
    poison_step(trainer, 2)
    assert trainer.train()
    logged = [e for e in events(tmp_path / "run") if "loss/train" in e]
    assert [e["nonfinite_steps"] for e in logged] == [0, 1, 1, 1]
    assert {int(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()} == {trainer.total_steps - 1}
    assert json.loads((tmp_path / "run" / "FINAL" / "trainer_state.json").read_text())["nonfinite_steps"] == 1


def test_non_finite_weights_are_never_saved(tmp_path):
    trainer = build_trainer(tmp_path, "exp_name=run")
    with torch.no_grad():
        trainer.accelerator.unwrap_model(trainer.policy).lm_head.weight[0, 0] = float("inf")
    with pytest.raises(CheckpointError, match=r"not saving .*step-1: the weights are not finite \(lm_head.weight"):
        trainer.save("step-1")
    assert not list((tmp_path / "run").glob("step-*"))

