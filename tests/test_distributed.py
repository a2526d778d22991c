"""FSDP2 (`distributed=fsdp`) and DeepSpeed ZeRO-3 (`distributed=deepspeed`) on 2 CPU processes with
gloo, launched as the README says: training equals one process, checkpoints are whole and resume on
another number of ranks and engine, and accelerate's own FSDP plugin is refused in one line."""
import pytest
import torch

from conftest import FAST, assert_same_weights, build_trainer, launch_cli, train_in_process, two_ranks, weights
from train import checkpoint, distributed

CPU = {"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
# SGD: unlike Adam it turns no rounding difference into an lr-sized step.
EXACT = ["n_examples=32", "model.batch_size=16", "lr_schedule=constant", "warmup=0", "optimizer=SGD", "lr=0.5",
         "intermediate_checkpoints=true", "save_every=1"]


def torchrun(cache_dir, *overrides):
    import sys
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2")
    result = launch_cli(f"cache_dir={cache_dir}", *FAST, *overrides, launcher=launcher, env=CPU)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training on 2 process(es)" in result.stdout
    return result


@pytest.mark.parametrize("loss, checkpoint_format", [("sft", "full"), ("dpo", "sharded")])
def test_two_fsdp_ranks_equal_one_process_with_accumulation_and_resume_across_world_sizes(loss, checkpoint_format,
                                                                                          tmp_path, runs):
    """2 FSDP ranks (each decoder block sharded) train as 1 process with 2 accumulation steps, to 1e-5.
    Their step-1 checkpoint (whole weights and optimizer state keyed by parameter name, or one shard per
    rank) is continued by 1 process to the same end, and 2 FSDP ranks continue a 1-process step-1 likewise."""
    common = [f"loss={loss}", *EXACT, f"checkpoint_format={checkpoint_format}"]
    torchrun(tmp_path, "exp_name=fsdp", "distributed=fsdp", *common)
    single = train_in_process(tmp_path, "exp_name=single", "model.gradient_accumulation_steps=2", *common)
    assert_same_weights(weights(tmp_path / "fsdp" / "FINAL"), weights(single), atol=1e-5)
    shards = sorted(p.name for p in (tmp_path / "fsdp" / "step-1" / checkpoint.SHARDS).glob("*.distcp"))
    assert shards == (["__0_0.distcp", "__1_0.distcp"] if checkpoint_format == "sharded" else [])
    assert (tmp_path / "fsdp" / "step-1" / "model.safetensors").exists() == (checkpoint_format == "full")

    from_two = train_in_process(tmp_path, "exp_name=from-two", f"resume={tmp_path / 'fsdp' / 'step-1'}", *common)
    assert_same_weights(weights(from_two), weights(single), atol=1e-5)
    two_ranks(runs, tmp_path, "exp_name=from-one", "distributed=fsdp", f"resume={tmp_path / 'single' / 'step-1'}",
              *common)
    assert_same_weights(weights(tmp_path / "from-one" / "FINAL"), weights(single), atol=1e-5)


# Every other trainer and option under FSDP: the reference (sharded copy, adapter-off, TR-DPO sync,
# log-probs cached before sharding), KTO's step-wide reference point, the reward model's head, PPO's
# synced sampling and value head.
EVERY_TRAINER = {
    "kto-cached-reference": ["loss=kto", "cache_reference_logprobs=true"],
    "bradley-terry": ["loss=bradley-terry"],
    "ppo": ["loss=ppo", "loss.vf_lr=0.5"],
    "lora-dpo": ["loss=dpo", "model.use_peft=true", "lr=0.05"],
    "dpo-tr": ["loss=dpo", "sync_reference_every=1"],
    "sft-checkpointing": ["model.gradient_checkpointing=true"],
}


@pytest.mark.parametrize("name", sorted(EVERY_TRAINER))
def test_every_trainer_under_fsdp_equals_one_process(name, tmp_path, runs):
    common = [*EXACT, *EVERY_TRAINER[name]]
    two_ranks(runs, tmp_path, "exp_name=fsdp", "distributed=fsdp", *common)
    single = train_in_process(tmp_path, "exp_name=single", "model.gradient_accumulation_steps=2", *common)
    assert_same_weights(weights(tmp_path / "fsdp" / "FINAL"), weights(single), atol=1e-5)
    if name == "ppo":
        heads = [torch.load(d / "v_head.pt", weights_only=True) for d in (tmp_path / "fsdp" / "FINAL", single)]
        assert_same_weights(*heads, atol=1e-5)


def test_adam_moments_saved_by_two_fsdp_ranks_load_on_one_process_in_either_format(tmp_path, runs):
    """Whole format: the moments a 1-process run loads are the file's, exactly. Sharded format: the
    1-process continuation of step-1 ends with the moments of the 2-rank run's own FINAL."""
    common = ["n_examples=32", "model.batch_size=16", "intermediate_checkpoints=true", "save_every=1"]
    two_ranks(runs, tmp_path, "exp_name=sharded", "distributed=fsdp", "checkpoint_format=sharded", *common)
    continued = train_in_process(tmp_path, "exp_name=continued", f"resume={tmp_path / 'sharded' / 'step-1'}",
                                 *common)
    ours, theirs = (torch.load(d / "optimizer.pt", weights_only=True)["state"]
                    for d in (continued, tmp_path / "sharded" / "FINAL"))
    assert ours.keys() == theirs.keys()
    for name in ours:
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours[name][key], theirs[name][key], rtol=1e-3, atol=1e-7)  # float rounding

    two_ranks(runs, tmp_path, "exp_name=fsdp", "distributed=fsdp", *common)
    saved = torch.load(tmp_path / "fsdp" / "step-1" / "optimizer.pt", weights_only=True)
    trainer = build_trainer(tmp_path / "one", "exp_name=run", "n_examples=32", "model.batch_size=16")
    trainer.restore(checkpoint.read(tmp_path / "fsdp" / "step-1"))
    loaded = distributed.gather_state(trainer.optimizer, trainer.modules)
    names = [n for n, p in trainer.policy.named_parameters()]
    assert sorted(saved["state"]) == sorted(f"0.{n}" for n in names), "the state of every parameter, by name"
    for name, state in saved["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state[key], loaded["state"][name][key]), (name, key)


@pytest.mark.parametrize("variable, expected", [
    ("ACCELERATE_USE_FSDP", "error: launched with accelerate's FSDP plugin (ACCELERATE_USE_FSDP is set): launch "
                            "with a plain multi-GPU config"),
    ("ACCELERATE_USE_DEEPSPEED", "error: launched with a DeepSpeed config (ACCELERATE_USE_DEEPSPEED is set) but "
                                 "distributed=ddp: set distributed=deepspeed")])
def test_accelerate_launch_configs_this_run_would_not_follow_are_refused_in_one_line(variable, expected, tmp_path):
    result = launch_cli(f"cache_dir={tmp_path}", *FAST, env={variable: "true"})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(expected)


def test_deepspeed_zero3_ranks_equal_one_process_and_checkpoints_move_between_engines(tmp_path, runs):
    """Launched with config/accelerate/deepspeed_zero3.yaml on 2 ranks, DPO trains as 1 process with 2
    accumulation steps (SGD, to 1e-5). Its step-1 (whole weights, optimizer state keyed by parameter
    name, as every engine saves) is continued by 1 plain process to the same end, and 2 ZeRO-3 ranks
    continue a plain 1-process step-1 likewise."""
    import sys

    from conftest import ROOT
    common = ["loss=dpo", *EXACT]
    accelerate = (sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  str(ROOT / "config" / "accelerate" / "deepspeed_zero3.yaml"), "--num_processes", "2")
    result = launch_cli(f"cache_dir={tmp_path}", *FAST, "exp_name=zero3", "distributed=deepspeed", *common,
                        launcher=accelerate, env=CPU)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training on 2 process(es)" in result.stdout
    single = train_in_process(tmp_path, "exp_name=single", "model.gradient_accumulation_steps=2", *common)
    assert_same_weights(weights(tmp_path / "zero3" / "FINAL"), weights(single), atol=1e-5)

    from_zero3 = train_in_process(tmp_path, "exp_name=from-zero3", f"resume={tmp_path / 'zero3' / 'step-1'}", *common)
    assert_same_weights(weights(from_zero3), weights(single), atol=1e-5)
    two_ranks(runs, tmp_path, "exp_name=from-one", "distributed=deepspeed", f"resume={tmp_path / 'single' / 'step-1'}",
              *common)
    assert_same_weights(weights(tmp_path / "from-one" / "FINAL"), weights(single), atol=1e-5)


# Under DeepSpeed in one process (ZeRO-3 over a group of one: the engine, its flat fp32 partitions and
# the whole-state export all in play): each trainer and option ends where plain training does, and
# Adam's moments cross between the engines in both directions.
UNDER_DEEPSPEED = {
    "lora-dpo": ["loss=dpo", "model.use_peft=true", "lr=0.05"],
    "kto-cached-reference": ["loss=kto", "cache_reference_logprobs=true"],
    "bradley-terry": ["loss=bradley-terry"],
    "sft-checkpointing": ["model.gradient_checkpointing=true"],
}


@pytest.fixture
def deepspeed_in_process(monkeypatch):
    """DeepSpeed without a launcher sets LOCAL_RANK=0 for the process's lifetime: keep it out of the
    processes later tests start (they would take themselves for launched ranks)."""
    monkeypatch.setenv("LOCAL_RANK", "0")


@pytest.mark.parametrize("name", sorted(UNDER_DEEPSPEED))
def test_every_trainer_under_deepspeed_equals_plain_training(name, tmp_path, deepspeed_in_process):
    common = [*EXACT, *UNDER_DEEPSPEED[name]]
    zero3 = train_in_process(tmp_path, "exp_name=zero3", "distributed=deepspeed", *common)
    plain = train_in_process(tmp_path, "exp_name=plain", *common)
    assert_same_weights(weights(zero3), weights(plain), atol=1e-5)


def test_adam_moments_cross_between_deepspeed_and_plain_training(tmp_path, deepspeed_in_process):
    common = ["n_examples=32", "model.batch_size=16", "intermediate_checkpoints=true", "save_every=1"]
    train_in_process(tmp_path, "exp_name=zero3", "distributed=deepspeed", *common)
    plain = build_trainer(tmp_path, "exp_name=plain", *common)
    plain.restore(checkpoint.read(tmp_path / "zero3" / "step-1"))
    saved = torch.load(tmp_path / "zero3" / "step-1" / "optimizer.pt", weights_only=True)
    loaded = distributed.gather_state(plain.optimizer, plain.modules)
    assert sorted(saved["state"]) == sorted(f"0.{n}" for n, _ in plain.policy.named_parameters())
    for name, state in saved["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state[key], loaded["state"][name][key]), (name, key)

    one = train_in_process(tmp_path, "exp_name=one", *common)
    continued = train_in_process(tmp_path, "exp_name=continued", "distributed=deepspeed",
                                 f"resume={tmp_path / 'one' / 'step-1'}", *common)
    ours, theirs = (torch.load(d / "optimizer.pt", weights_only=True)["state"] for d in (continued, one))
    assert ours.keys() == theirs.keys()
    for name in ours:
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours[name][key], theirs[name][key], rtol=1e-3, atol=1e-7)


def test_two_nodes_on_one_machine_train_checkpoint_and_resume(tmp_path):
    """`torchrun --nnodes 2 --node_rank {0,1} --rdzv_endpoint 127.0.0.1:<port>`, one process per "node":
    both agree on the run dir, only global rank 0 writes, and a second 2-node run continues step-1 to
    the same end, bit for bit."""
    import socket
    import subprocess
    import sys

    from conftest import ROOT

    def two_nodes(*overrides):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        nodes = [subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
             "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
             "--rdzv_id", "test", str(ROOT / "launch.py"), f"cache_dir={tmp_path}", *FAST, *EXACT, *overrides],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**__import__("os").environ, **CPU}) for rank in (0, 1)]
        outputs = [node.communicate(timeout=300) for node in nodes]
        for node, (out, err) in zip(nodes, outputs):
            assert node.returncode == 0, err[-3000:]
        return outputs

    outputs = two_nodes("exp_name=run")
    assert "training on 2 process(es)" in outputs[0][0]
    assert "FINAL:" in outputs[0][0] and "FINAL:" not in outputs[1][0]  # one voice: global rank 0
    assert sorted(p.name for p in (tmp_path / "run").glob("step-*")) == ["step-1"]
    two_nodes("exp_name=resumed", f"resume={tmp_path / 'run' / 'step-1'}")
    assert_same_weights(weights(tmp_path / "resumed" / "FINAL"), weights(tmp_path / "run" / "FINAL"))


def test_kill_9_during_a_sharded_save_leaves_the_previous_checkpoint_usable(tmp_path, runs):
    """checkpoint_format=sharded: SIGKILL the moment the shards of a step-N start to be written; every
    step-N left is complete and readable, and the run continues from the newest to the same end as a
    straight run, bit for bit."""
    import os
    import signal

    from test_checkpoints import logged_step, wait_for
    common = [*FAST, "n_examples=96", "model.batch_size=8", "checkpoint_format=sharded", "intermediate_checkpoints=true",
              "save_every=1", "keep_last_n=-1", "exp_name=run"]
    straight = runs.start(f"cache_dir={tmp_path / 'a'}", *common)
    assert straight.wait() == 0, straight.output()[-3000:]
    run_dir = tmp_path / "b" / "run"
    run = runs.start(f"cache_dir={tmp_path / 'b'}", *common)
    wait_for(lambda: logged_step(run_dir) >= 3, run)
    wait_for(lambda: any(run_dir.glob(f"{checkpoint.UNFINISHED}/step-*/{checkpoint.SHARDS}")), run)
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    steps = list(run_dir.glob("step-*"))
    assert steps and not (run_dir / "FINAL").exists()
    for step in steps:
        assert checkpoint.problem(step) is None, step
        assert checkpoint.read(step).shards is not None
    run = runs.start(f"cache_dir={tmp_path / 'b'}", *common)
    assert run.wait() == 0, run.output()[-3000:]
    assert_same_weights(weights(run_dir / "FINAL"), weights(tmp_path / "a" / "run" / "FINAL"))


@pytest.mark.parametrize("plugin_config, expected", [
    ({"zero_optimization": {"stage": 0}}, "distributed=deepspeed: the DeepSpeed config has ZeRO stage 0, which is DDP"),
    ({"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}, "steps_per_print": "auto"},
     "the DeepSpeed config leaves steps_per_print, zero_optimization.reduce_bucket_size as auto"),
])
def test_deepspeed_configs_this_run_cannot_follow_are_refused_before_the_engine(plugin_config, expected):
    from types import SimpleNamespace

    from conftest import compose
    from train.errors import ConfigError
    cfg = compose(["distributed=deepspeed"])
    accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=plugin_config)),
                                  num_processes=1, device=torch.device("cpu"))
    with pytest.raises(ConfigError) as error:
        distributed.deepspeed_engine(cfg, accelerator, torch.nn.Linear(2, 2), None)
    assert str(error.value).startswith(expected)
