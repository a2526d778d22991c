"""Checkpoints: atomic saves, rotation, exact resume for every trainer, preemption, kill -9, corrupt
checkpoints, and the LoRA merge on FINAL."""
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import (FAST, ROOT, assert_same_weights, build_trainer, compose, demo_files, events, local_model,
                      tiny_config, train_in_process, two_ranks, weights)
from train import checkpoint

# Six optimizer steps of 8 examples, with a checkpoint every 2 and nothing rotated away.
SHORT = ["n_examples=48", "model.batch_size=8", "model.eval_batch_size=8", "n_eval_examples=8", "eval_every=2",
         "model.max_length=96", "model.max_prompt_length=48", "lr=1e-3", "intermediate_checkpoints=true",
         "save_every=2", "keep_last_n=-1"]


def losses_by_step(run_dir: pathlib.Path) -> dict:
    return {e["step"]: e["loss/train"] for e in events(run_dir) if "loss/train" in e}


def run_stopping_at(cache_dir, stop_step: int, *overrides, sig=signal.SIGTERM) -> None:
    """Train in this process and deliver a stop signal (as `sig` would) once step `stop_step` is logged."""
    trainer = build_trainer(cache_dir, *overrides)
    log = trainer.logger.log

    def log_then_signal(metrics):
        log(metrics)
        if metrics["step"] == stop_step and "loss/train" in metrics:
            trainer.stop_signals.append(sig)

    trainer.logger.log = log_then_signal
    assert trainer.train() is False
    trainer.logger.close()


def tiny_with_dropout(directory: pathlib.Path) -> pathlib.Path:
    from conftest import TINY
    target = directory / "tiny-dropout"
    if not target.exists():
        shutil.copytree(TINY, target)
        config = json.loads((target / "config.json").read_text())
        (target / "config.json").write_text(json.dumps(config | {"attention_dropout": 0.2}))
    return target


RESUMABLE = {
    "sft": [],
    "sft-dropout": ["model.name_or_path={dropout}"],  # dropout on: the RNG states must come back too
    "dpo": ["loss=dpo"],
    "dpo-tr": ["loss=dpo", "sync_reference_every=1"],  # the synced reference is part of the state
    "kto": ["loss=kto"],
    "bradley-terry": ["loss=bradley-terry"],
    "lora-dpo": ["loss=dpo", "model.use_peft=true", "lr=1e-2"],
    # sampled rollouts, 2 epochs x 2 minibatches each, the value head and its optimizer state
    "ppo": ["loss=ppo", "max_new_tokens=8", "loss.ppo_epochs=2", "model.gradient_accumulation_steps=2"],
    "lora-ppo": ["loss=ppo", "max_new_tokens=8", "model.use_peft=true", "lr=1e-2"],
}


@pytest.mark.parametrize("name", sorted(RESUMABLE))
def test_stop_and_resume_is_bitwise_identical(name, tmp_path):
    """K steps straight through, and j steps + stop + resume for the rest: the same FINAL, bit for bit,
    and the same logged losses; step-N numbering continues."""
    overrides = [o.format(dropout=tiny_with_dropout(tmp_path)) for o in (*SHORT, *RESUMABLE[name])]
    straight = train_in_process(tmp_path / "a", "exp_name=run", *overrides)
    run_stopping_at(tmp_path / "b", 3, "exp_name=run", *overrides)  # between checkpoints: step-3 is saved
    stopped = tmp_path / "b" / "run"
    assert (stopped / "step-3").is_dir() and not (stopped / "FINAL").exists()
    assert json.loads((stopped / "step-3" / checkpoint.TRAINER_STATE).read_text())["step"] == 3
    resumed = train_in_process(tmp_path / "b", "exp_name=run", *overrides)

    assert_same_weights(weights(straight), weights(resumed))
    assert losses_by_step(tmp_path / "a" / "run") == losses_by_step(stopped)
    assert sorted(p.name for p in stopped.glob("step-*")) == ["step-2", "step-3", "step-4"]
    assert json.loads((resumed / "metrics.json").read_text())["step"] == 6
    assert [e["step"] for e in events(stopped) if "loss/train" in e] == [1, 2, 3, 4, 5, 6]


def test_lora_step_checkpoints_hold_the_adapter(tmp_path):
    from peft import PeftModel
    from train.models import load_policy
    final = train_in_process(tmp_path, "exp_name=run", *SHORT, "model.use_peft=true", "lr=1e-2")
    step = tmp_path / "run" / "step-4"
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt", "rng.pt",
            checkpoint.TRAINER_STATE, "metrics.json", "tokenizer.json", checkpoint.MANIFEST} <= {
                p.name for p in step.iterdir()}
    assert not (step / "model.safetensors").exists()
    adapted = PeftModel.from_pretrained(load_policy(compose([]).model, 0), step)  # the tiny base: seed-initialised
    assert any(k.endswith("lora_B.default.weight") and v.abs().sum() > 0 for k, v in adapted.state_dict().items())
    assert (final / "model.safetensors").exists() and not (final / "adapter_model.safetensors").exists()


def test_resume_never_refuses_a_used_run_dir_and_a_path_continues_elsewhere(tmp_path, caplog):
    train_in_process(tmp_path, "exp_name=first", *SHORT)
    with pytest.raises(checkpoint.CheckpointError, match="resume=never.*already holds checkpoints"):
        train_in_process(tmp_path, "exp_name=first", "resume=never", *SHORT)
    # A finished run is left alone by resume=auto.
    before = (tmp_path / "first" / "FINAL" / "model.safetensors").read_bytes()
    train_in_process(tmp_path, "exp_name=first", *SHORT)
    assert (tmp_path / "first" / "FINAL" / "model.safetensors").read_bytes() == before
    # resume=<path>: continue another run's step-2 in a new run dir; numbering continues from 2. A
    # different lr is reported, not used: the learning rates come with the scheduler's state.
    with caplog.at_level("WARNING"):
        final = train_in_process(tmp_path, "exp_name=second", f"resume={tmp_path / 'first' / 'step-2'}", *SHORT,
                                 "lr=2e-3")
    assert any("config differs" in r.getMessage() and "in: lr: 0.001 -> 0.002 (" in r.getMessage()
               for r in caplog.records)
    assert_same_weights(weights(final), weights(tmp_path / "first" / "FINAL"))
    assert sorted(p.name for p in (tmp_path / "second").glob("step-*")) == ["step-4"]
    assert min(losses_by_step(tmp_path / "second")) == 3


@pytest.mark.parametrize("damage", ["truncate", "garble", "state-keys", "no-manifest"])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(damage, tmp_path, caplog):
    straight = weights(train_in_process(tmp_path, "exp_name=run", *SHORT))
    run_dir = tmp_path / "run"
    shutil.rmtree(run_dir / "FINAL")
    newest = run_dir / "step-4"
    if damage == "truncate":
        data = (newest / "model.safetensors").read_bytes()
        (newest / "model.safetensors").write_bytes(data[:len(data) // 2])
    elif damage == "garble":  # same size, so only reading it can tell
        size = (newest / "optimizer.pt").stat().st_size
        (newest / "optimizer.pt").write_bytes(os.urandom(size))
    elif damage == "state-keys":  # parses, but lacks what a resume needs
        state = json.loads((newest / checkpoint.TRAINER_STATE).read_text())
        del state["epoch"]
        (newest / checkpoint.TRAINER_STATE).write_text(json.dumps(state))
        sizes = json.loads((newest / checkpoint.MANIFEST).read_text())
        (newest / checkpoint.MANIFEST).write_text(json.dumps(sizes | {
            checkpoint.TRAINER_STATE: (newest / checkpoint.TRAINER_STATE).stat().st_size}))
    else:
        (newest / checkpoint.MANIFEST).unlink()
    with caplog.at_level("INFO"):
        final = train_in_process(tmp_path, "exp_name=run", *SHORT)
    if damage != "no-manifest":  # without a MANIFEST it is not a checkpoint at all
        assert any("skipping checkpoint" in r.getMessage() and "step-4" in r.getMessage() for r in caplog.records)
    assert any("resumed from" in r.getMessage() and "step-2" in r.getMessage() for r in caplog.records)
    assert_same_weights(weights(final), straight)
    assert checkpoint.problem(run_dir / "step-4") is None  # saved again, whole


def test_rotation_keeps_the_newest_n_and_the_best(tmp_path):
    train_in_process(tmp_path, "exp_name=run", *SHORT, "save_every=1", "eval_every=1", "keep_last_n=2",
                     "n_examples=64", "keep_best_metric=loss/eval", "keep_best_mode=max")
    run_dir = tmp_path / "run"
    evals = {e["step"]: e["loss/eval"] for e in events(run_dir) if "loss/eval" in e and 1 <= e["step"] <= 7}
    worst = max(evals, key=evals.get)  # keep_best_mode=max: the highest eval loss is "best" here
    kept = {f"step-{s}" for s in (6, 7, worst)}
    assert {p.name for p in run_dir.glob("step-*")} == kept
    assert not list(run_dir.glob(".tmp-*"))
    assert all(checkpoint.problem(run_dir / name) is None for name in kept)


def test_rotate_never_deletes_incomplete_or_the_newest(tmp_path):
    for step in (1, 2, 3):
        checkpoint.write_checkpoint(tmp_path / f"step-{step}", lambda tmp: (tmp / "x").write_text("x"))
    (tmp_path / "step-9").mkdir()  # no MANIFEST: not a checkpoint, not ours to delete
    checkpoint.rotate(tmp_path, 1)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-3", "step-9"]


def test_failed_save_reports_and_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    trainer = build_trainer(tmp_path, "exp_name=run", *SHORT)
    trainer.save("step-1")
    before = {p.name: p.read_bytes() for p in (tmp_path / "run" / "step-1").iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(checkpoint.CheckpointError, match=r"could not save .*step-2: OSError.*No space left.*untouched"):
        trainer.save("step-2")
    assert {p.name for p in (tmp_path / "run").iterdir() if p.name.startswith((".tmp", "step-"))} == {"step-1"}
    assert {p.name: p.read_bytes() for p in (tmp_path / "run" / "step-1").iterdir()} == before


def test_checkpoint_files_are_never_unpickled(tmp_path):
    """A `.pt` holding an arbitrary object is refused (weights_only=True), never executed."""
    train_in_process(tmp_path, "exp_name=run", *SHORT)
    step = tmp_path / "run" / "step-2"
    torch.save({"state": {}, "param_groups": [], "payload": pathlib.Path("/")}, step / "optimizer.pt")
    sizes = json.loads((step / checkpoint.MANIFEST).read_text())
    sizes["optimizer.pt"] = (step / "optimizer.pt").stat().st_size
    (step / checkpoint.MANIFEST).write_text(json.dumps(sizes))
    with pytest.raises(checkpoint.CheckpointError, match="optimizer.pt: unreadable"):
        checkpoint.read(step)
    for source in (ROOT / "train").glob("*.py"):
        for line in source.read_text().splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{source.name}: {line.strip()}"


def test_wandb_run_is_continued(tmp_path):
    overrides = ["exp_name=run", *SHORT, "wandb.mode=offline"]
    run_stopping_at(tmp_path, 3, *overrides)
    saved = json.loads((tmp_path / "run" / "step-3" / checkpoint.TRAINER_STATE).read_text())["wandb_run_id"]
    final = train_in_process(tmp_path, *overrides)
    assert json.loads((final / "metrics.json").read_text())["wandb_run_id"] == saved


# ------------------------------------------------------------------ real processes: signals, kill -9

CLI = ["exp_name=run", "n_examples=160", "model.batch_size=4", "model.eval_batch_size=4", "n_eval_examples=4",
       "n_eval_generations=0", "do_first_eval=false", "eval_every=1000", "model.max_length=64",
       "model.max_prompt_length=32", "intermediate_checkpoints=true", "save_every=1", "keep_last_n=2", "log_every=1",
       "lr=1e-3", "wandb.mode=disabled"]

@pytest.fixture(scope="module")
def cli_data(tmp_path_factory) -> list[str]:
    return demo_files(tmp_path_factory.mktemp("data"), 100, 8)


def start(runs, cache_dir: pathlib.Path, cli_data: list[str], *overrides: str):
    """A forked `launch.py` with the CLI settings, training into cache_dir/run."""
    return runs.start(f"cache_dir={cache_dir}", *cli_data, *CLI, *overrides)


def logged_step(run_dir: pathlib.Path) -> int:
    try:
        return max((e["step"] for e in events(run_dir) if "loss/train" in e), default=0)
    except (FileNotFoundError, ValueError):
        return 0


def wait_for(condition, run, timeout=120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert run.poll() is None, f"run ended early:\n{run.output()[-3000:] if hasattr(run, 'output') else ''}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.002)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, runs, cli_data) -> pathlib.Path:
    cache = tmp_path_factory.mktemp("straight")
    run = start(runs, cache, cli_data)
    assert run.wait() == 0, run.output()[-3000:]
    return cache / "run"


def test_a_stop_signal_reaches_the_handler_from_before_the_run_once_step_n_is_saved(tmp_path):
    """On a cluster submitit handles SIGUSR1 (it requeues the job). The run takes the signal over while
    it trains, saves step-N, and then passes it on, so the requeued job continues from step-N."""
    heard = []
    previous = signal.signal(signal.SIGUSR1, lambda sig, _: heard.append(
        (sig, sorted(p.name for p in (tmp_path / "run").glob("step-*")))))
    try:
        run_stopping_at(tmp_path, 2, "exp_name=run", "n_examples=64", "model.batch_size=16", sig=signal.SIGUSR1)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert heard == [(signal.SIGUSR1, ["step-2"])]


def test_sigterm_sigusr1_and_ctrl_c_save_and_exit_then_resume_finishes_the_same(tmp_path, runs, cli_data,
                                                                                 straight_run):
    """Each signal (SIGINT: a first Ctrl-C) stops the run at a step boundary with a complete step-N and
    exit status 0; the same command continues, and the end result equals the uninterrupted run bit
    for bit."""
    run_dir = tmp_path / "run"
    for sig, at_least in ((signal.SIGTERM, 3), (signal.SIGUSR1, 9), (signal.SIGINT, 15)):
        run = start(runs, tmp_path, cli_data)
        wait_for(lambda: logged_step(run_dir) >= at_least, run)
        os.kill(run.pid, sig)
        assert run.wait() == 0, run.output()[-3000:]
        out = run.output()
        assert "stopped at step" in out and not (run_dir / "FINAL").exists()
        stopped_at = int(out.split("stopped at step ")[1].split()[0])
        assert stopped_at >= at_least and checkpoint.problem(run_dir / f"step-{stopped_at}") is None

    run = start(runs, tmp_path, cli_data)
    assert run.wait() == 0, run.output()[-3000:]
    assert_same_weights(weights(run_dir / "FINAL"), weights(straight_run / "FINAL"))
    assert losses_by_step(run_dir) == losses_by_step(straight_run)


def test_kill_9_at_random_points_never_leaves_a_broken_checkpoint(tmp_path, runs, cli_data, straight_run):
    """Ten SIGKILLs, half of them the moment a save has begun writing: after each, every step-N dir is
    complete and readable, a restart continues from the newest, and the finished run equals the
    uninterrupted one bit for bit."""
    run_dir = tmp_path / "run"
    rng = random.Random(0)
    resumable = 0
    for kill in range(10):
        run = start(runs, tmp_path, cli_data)
        previous = logged_step(run_dir)
        wait_for(lambda: logged_step(run_dir) > previous, run)
        if kill % 2:  # during a save: as soon as a temporary checkpoint dir appears
            wait_for(lambda: any(run_dir.glob(f"{checkpoint.UNFINISHED}/step-*")), run)
        else:
            time.sleep(rng.uniform(0, 0.3))
        os.kill(run.pid, signal.SIGKILL)
        assert run.wait() == -signal.SIGKILL
        steps = list(run_dir.glob("step-*"))
        resumable += bool(steps)
        for step in steps:
            assert checkpoint.problem(step) is None, f"kill {kill}: {step.name} is incomplete"
            checkpoint.read(step)
        assert not (run_dir / "FINAL").exists(), "the run finished between kills: give it more steps"
    assert resumable >= 8

    run = start(runs, tmp_path, cli_data)
    assert run.wait() == 0, run.output()[-3000:]
    assert "taking over the lock left by pid" in run.output()  # the killed run's lock
    assert_same_weights(weights(run_dir / "FINAL"), weights(straight_run / "FINAL"))
    assert losses_by_step(run_dir) == losses_by_step(straight_run)


def test_a_second_ctrl_c_quits_at_once_without_saving(tmp_path):
    """The first Ctrl-C asks for a save at the step's end; a second one before that stops at once."""
    trainer = build_trainer(tmp_path, "exp_name=run", *SHORT)
    log = trainer.logger.log

    def log_then_interrupt_twice(metrics):
        log(metrics)
        if metrics["step"] == 3 and "loss/train" in metrics:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    trainer.logger.log = log_then_interrupt_twice
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN when run as a background job
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert not (tmp_path / "run" / "step-3").exists()
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_a_second_launch_into_a_busy_run_dir_is_refused_and_the_first_finishes_untouched(tmp_path, runs, cli_data,
                                                                                        straight_run):
    run_dir = tmp_path / "run"
    first = start(runs, tmp_path, cli_data)
    wait_for(lambda: logged_step(run_dir) >= 2, first)
    second = start(runs, tmp_path, cli_data)
    assert second.wait() == 1
    [line] = second.stderr().strip().splitlines()
    assert line.startswith(f"error: run dir {run_dir} is in use by pid {first.pid} on host {os.uname().nodename} "
                           f"(started ") and "launch.py cache_dir=" in line, line
    assert second.loaded() == []
    assert first.wait() == 0, first.output()[-3000:]
    assert_same_weights(weights(run_dir / "FINAL"), weights(straight_run / "FINAL"))
    assert losses_by_step(run_dir) == losses_by_step(straight_run)
    assert (run_dir / ".aligntrain.lock").read_text() == ""  # released


# ------------------------------------------------------------------------------ the LoRA merge

NORM = {"llama": "norm", "gpt2": "ln_f", "qwen": "norm"}  # each one's final norm, to put in modules_to_save


@pytest.mark.parametrize("variant", ["lora", "rslora+modules_to_save"])
@pytest.mark.parametrize("arch", sorted(NORM))  # Llama; GPT-2's Conv1D; Qwen2's q/k/v biases
def test_merged_lora_matches_the_adapter_model(arch, variant, tmp_path):
    """W' = W + s B A with s from the adapter's config (alpha/r, or alpha/sqrt(r) under rsLoRA),
    Conv1D transposed, biases and modules_to_save kept: the merged model, loaded with plain
    AutoModelForCausalLM, gives the adapter model's logits within 1e-5."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from train.models import merged_lora_state_dict
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size=97)).save_pretrained(tmp_path / "base")
    rs = variant != "lora"
    config = LoraConfig(r=4, lora_alpha=6, use_rslora=rs, init_lora_weights=False, target_modules="all-linear",
                        modules_to_save=[NORM[arch]] if rs else None)
    adapted = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), config).eval()
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "modules_to_save" in name or ".bias" in name:
                p.add_(torch.randn_like(p))  # so that keeping the trained copy / the bias matters
    merged = merged_lora_state_dict(adapted, adapted.state_dict())
    adapted.get_base_model().save_pretrained(tmp_path / "merged", state_dict=merged)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in k for k in plain.state_dict())

    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, adapted(ids).logits, atol=1e-5, rtol=0)

    # One layer by hand: the scale from the numbers in the config, not from PEFT's own attribute.
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").state_dict()
    scale = 6 / (4 ** 0.5 if rs else 4)
    key = next(k for k in merged if k.endswith(".weight") and f"base_model.model.{k[:-7]}.lora_A.default.weight"
               in adapted.state_dict())
    a = adapted.state_dict()[f"base_model.model.{key[:-7]}.lora_A.default.weight"]
    b = adapted.state_dict()[f"base_model.model.{key[:-7]}.lora_B.default.weight"]
    delta = scale * b @ a
    if arch == "gpt2":  # Conv1D stores (in, out)
        delta = delta.T
    torch.testing.assert_close(merged[key], base[key] + delta, atol=1e-6, rtol=0)


def test_merge_of_a_bfloat16_model_sums_in_float32(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from train.models import merged_lora_state_dict
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=97), dtype=torch.bfloat16)
    adapted = get_peft_model(base, LoraConfig(r=4, lora_alpha=6, init_lora_weights=False, target_modules=["q_proj"]))
    state = adapted.state_dict()
    merged = merged_lora_state_dict(adapted, state)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    w, a, b = (state[f"{prefix}.{name}.weight"] for name in ("base_layer", "lora_A.default", "lora_B.default"))
    expected = (w.float() + 6 / 4 * (b.float() @ a.float())).to(torch.bfloat16)
    assert merged["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], expected)


PIPELINE = {
    "llama": [],
    "gpt2": ["model=gpt2"],
    "qwen": ["model=qwen"],
    "reward-llama": ["loss=bradley-terry"],  # PEFT saves the score head as a module_to_save
}


@pytest.mark.parametrize("name", sorted(PIPELINE))
def test_lora_final_is_the_merged_model(name, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    overrides = list(PIPELINE[name])
    if name in ("gpt2", "qwen"):
        local_model(name, tmp_path / "source")
        overrides.append(f"model.name_or_path={tmp_path / 'source'}")
    trainer = build_trainer(tmp_path, "exp_name=run", *SHORT, "n_examples=16", "model.use_peft=true",
                            "model.peft.lora_alpha=24", "lr=1e-2", *overrides)
    trainer.train()
    auto = AutoModelForSequenceClassification if name.startswith("reward") else AutoModelForCausalLM
    merged = auto.from_pretrained(tmp_path / "run" / "FINAL").eval()
    policy = trainer.accelerator.unwrap_model(trainer.policy).eval()
    ids = torch.randint(3, 500, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, policy(ids).logits, atol=1e-5, rtol=0)


def test_sharded_weights_read_back_whole(tmp_path):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=97))
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("model-*"))) > 1
    torch.manual_seed(1)
    other = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=97))
    checkpoint.load_weights(other, checkpoint.read_weights(tmp_path, "model"))
    assert_same_weights(other.state_dict(), model.state_dict())


def test_two_ranks_stop_together_when_one_gets_the_signal(tmp_path, runs):
    """Under 2-process DDP only rank 1 gets SIGUSR1: both ranks stop at the same step boundary, one
    step-N is saved, both exit 0; the resumed 2-rank run equals a 1-process run (SGD)."""
    exact = ["n_examples=96", "model.batch_size=16", "lr_schedule=constant", "warmup=0", "optimizer=SGD", "lr=0.5"]
    single = train_in_process(tmp_path, "exp_name=single", *exact)
    ranks = runs.ranks(2, f"cache_dir={tmp_path}", "exp_name=ddp", *FAST, *exact)
    wait_for(lambda: logged_step(tmp_path / "ddp") >= 1, ranks[0])
    os.kill(ranks[1].pid, signal.SIGUSR1)
    assert [rank.wait() for rank in ranks] == [0, 0], ranks[0].stderr()[-3000:] + ranks[1].stderr()[-3000:]
    saved = list((tmp_path / "ddp").glob("step-*"))
    assert len(saved) == 1 and checkpoint.problem(saved[0]) is None and not (tmp_path / "ddp" / "FINAL").exists()
    assert len(checkpoint.read(saved[0]).files["rng.pt"]) == 2  # both ranks' RNG states

    out = two_ranks(runs, tmp_path, "exp_name=ddp", *exact)
    assert f"resumed from {saved[0]}" in out
    assert_same_weights(weights(tmp_path / "ddp" / "FINAL"), weights(single), atol=1e-6)


SHARDED_MERGE = """
import sys, torch, torch.distributed as dist, transformers
from peft import LoraConfig, get_peft_model
from torch.distributed.fsdp import fully_shard
from train.distributed import full_state_dict
from train.models import merged_lora_state_dict
dist.init_process_group("gloo")
torch.manual_seed(0)
config = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=97)
adapted = get_peft_model(transformers.AutoModelForCausalLM.from_config(config),
                         LoraConfig(r=4, lora_alpha=6, init_lora_weights=False, target_modules="all-linear"))
ids = torch.randint(0, 97, (2, 12))
with torch.no_grad():
    expected = adapted(ids).logits
for layer in adapted.base_model.model.model.layers:
    fully_shard(layer)
fully_shard(adapted)
weight = adapted.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
assert weight.to_local().shape[0] == weight.shape[0] // 2  # really sharded: half the rows on each rank
weights = full_state_dict(adapted)
if dist.get_rank() == 0:
    plain = transformers.AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(merged_lora_state_dict(adapted, weights), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, expected, atol=1e-5, rtol=0)
    print("merged from shards")
dist.barrier()  # rank 1 waits for rank 0's check before the group goes away
dist.destroy_process_group()
"""


def test_lora_merge_gathers_sharded_weights_first(tmp_path):
    """FSDP2 shards the LoRA model over 2 gloo ranks; the gathered state dict merges into a plain
    model with the unsharded adapter model's logits."""
    script = tmp_path / "sharded_merge.py"
    script.write_text(SHARDED_MERGE)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "merged from shards" in result.stdout
