"""Mistakes stop the run in one line before anything is loaded or written; declared deps agree.

`test_a_mistake_stops_the_run_in_one_line` launches real `launch.py` processes (forked from a warm
server) with each mistake a user makes: the config, the data, the model dir, the run dir, the
checkpoint to resume from. Each must exit non-zero with one line naming the key, file or dir; a
config mistake must create no run dir and load nothing; no mistake may load the model.
"""
import json
import os
import pathlib
import shutil
import tomllib

import pytest
import torch
import yaml

from conftest import ROOT, TINY, demo_files
from train import checkpoint
from train.config import ATTENTION, OPTIMIZERS, UNSUPPORTED_OPTIMIZERS, check_command_line


class Setup:
    """What a case may need: a scratch dir, small data, and a finished SFT run with step-N checkpoints."""

    def __init__(self, tmp: pathlib.Path, trained: pathlib.Path):
        self.tmp, self.trained = tmp, trained
        self.cache = tmp / "runs"
        self.run_dir = self.cache / "run"

    def file(self, name: str, text: str) -> str:
        path = self.tmp / name
        path.write_text(text)
        return str(path)

    def model_dir(self, name: str, *, config=True, tokenizer=True, **config_changes) -> str:
        """A copy of the tiny model's dir: config.json (changed as asked) and/or its tokenizer files."""
        directory = self.tmp / name
        directory.mkdir()
        for file in TINY.iterdir():
            if file.name != "config.json" and tokenizer:
                shutil.copy(file, directory)
        if config:
            config_json = json.loads((TINY / "config.json").read_text())
            (directory / "config.json").write_text(json.dumps(config_json | config_changes))
        return str(directory)

    def copy_run(self, final: bool = True) -> None:
        """The trained SFT run as this case's run dir (without FINAL: stopped at step-4)."""
        shutil.copytree(self.trained, self.run_dir)
        if not final:
            shutil.rmtree(self.run_dir / "FINAL")

    def damage_step(self, name: str, damage) -> str:
        """The run dir's `name` checkpoint with `damage(dir)` applied and the MANIFEST made to match."""
        step = self.run_dir / name
        damage(step)
        sizes = {p.name: p.stat().st_size for p in step.iterdir() if p.name != checkpoint.MANIFEST}
        (step / checkpoint.MANIFEST).write_text(json.dumps(sizes))
        return str(step)


def garble(path: pathlib.Path) -> None:
    """Same size, other bytes: only reading it can tell."""
    path.write_bytes(os.urandom(path.stat().st_size))


def without_state_key(step: pathlib.Path) -> None:
    state = json.loads((step / checkpoint.TRAINER_STATE).read_text())
    del state["batch_index"]
    (step / checkpoint.TRAINER_STATE).write_text(json.dumps(state))


def data_dir(s: Setup) -> list[str]:
    (s.tmp / "dir.jsonl").mkdir()
    return [f"datasets=[{s.tmp / 'dir.jsonl'}]"]


def adapter_dir(s: Setup) -> list[str]:
    directory = pathlib.Path(s.model_dir("m", config=False))
    (directory / "adapter_config.json").write_text("{}")
    return [f"model.name_or_path={directory}"]


def weights_file(relative: str):
    def setup(s: Setup) -> list[str]:
        directory = pathlib.Path(s.model_dir("model"))
        (directory / relative).parent.mkdir(exist_ok=True)
        torch.save({"w": torch.zeros(2)}, directory / relative)
        return [f"model.name_or_path={directory}"]
    return setup


def user_work_in_cache_dir(s: Setup) -> list[str]:
    """A user's own `.tmp-*` dir where start-up once removed leftovers of interrupted saves."""
    (s.cache / ".tmp-mywork").mkdir(parents=True)
    (s.cache / ".tmp-mywork" / "keep.txt").write_text("mine")
    return ["exp_name=."]


def someone_elses_dir(s: Setup) -> list[str]:
    s.run_dir.mkdir(parents=True)
    (s.run_dir / "notes.txt").write_text("mine")
    return []


def a_file(s: Setup) -> list[str]:
    s.cache.write_text("x")
    return []


def foreign_lock(s: Setup) -> list[str]:
    s.copy_run(final=False)
    holder = {"host": "node-17", "pid": 4242, "started": "2026-11-27T07:00:00+00:00", "command": "launch.py"}
    (s.run_dir / ".aligntrain.lock").write_text(json.dumps(holder))  # renewed just now
    return []


def on_the_trained_run(overrides, final=False):
    """In a copy of the trained run (stopped after step-4 unless `final`), with `overrides` (or overrides(s))."""
    def setup(s: Setup) -> list[str]:
        s.copy_run(final)
        return overrides(s) if callable(overrides) else overrides
    return setup


def unreadable_checkpoints(s: Setup) -> list[str]:
    s.copy_run(final=False)
    for name in ("step-2", "step-4"):
        s.damage_step(name, lambda step: garble(step / "model.safetensors"))
    return []


# (overrides, or a function of Setup giving them; what the one line must say). Config mistakes first:
# these stop before Hydra runs, so no run dir may exist afterwards.
CONFIG_MISTAKES = {
    "typo": (["lrr=1e-5"], "config error: unknown config key 'lrr' (did you mean 'lr'?)"),
    "typo-nested": (["model.max_lenght=64"], "did you mean 'model.max_length'?"),
    "typo-group": (["loss=sftt"], "unknown loss 'sftt' (did you mean 'sft'?)"),
    "typo-model": (["model=lama"], "did you mean 'llama'?"),
    "added-typo": (["+model.batch_sizee=16"], "unknown config key 'model.batch_sizee' (did you mean 'model.batch_size'?)"),
    "added-loss-key": (["loss=dpo", "+loss.gamma=1"], "unknown config key 'loss.gamma'"),
    "removed-loss-key": (["loss=dpo", "~loss.beta"], "cannot remove config key 'loss.beta'"),
    "loss-name-not-group": (["loss=dpo", "loss.name=cdpo"], "use loss=cdpo, not loss.name=cdpo"),
    "loss-key-of-other-loss": (["loss=sft", "loss.beta=0.1"], "unknown config key 'loss.beta'"),
    "wrong-type": (["lr=fast"], "lr:"),
    "wrong-type-int": (["model.batch_size=1.5"], "model.batch_size:"),
    "loss-wrong-type": (["loss=dpo", "loss.beta=high"], "loss.beta: expected float"),
    "sweep-value": (["-m", "lr=1e-3,abc"], "lr:"),
    "lr-negative": (["lr=-1e-3"], "lr: must be positive"),
    "schedule": (["lr_schedule=cosin"], "lr_schedule: 'cosin' is not one of linear, cosine, constant (did you mean "
                                        "'cosine'?)"),
    "warmup": (["warmup=1.5"], "warmup: a fraction of training in [0, 1)"),
    "optimizer-case": (["optimizer=adamw"], "did you mean 'AdamW'?"),
    "optimizer-lbfgs": (["optimizer=LBFGS"], "optimizer: LBFGS does not fit this training loop"),
    "optimizer-sparse": (["optimizer=SparseAdam"], "optimizer: SparseAdam does not fit this training loop"),
    "optimizer-muon": (["optimizer=Muon"], "optimizer: Muon does not fit this training loop"),
    "optimizer-no-decay": (["optimizer=Rprop", "weight_decay=0.1"], "weight_decay: Rprop has no weight decay"),
    "weight-decay": (["weight_decay=-0.1"], "weight_decay: must be 0 or more"),
    "seed": (["seed=-1"], "seed: must be in [0, 2^32)"),
    "grad-norm-zero": (["model.max_grad_norm=0"], "model.max_grad_norm: must be positive"),
    "grad-norm-negative": (["model.max_grad_norm=-1"], "model.max_grad_norm: must be positive"),
    "nonfinite-steps": (["max_nonfinite_steps=-1"], "max_nonfinite_steps: must be 0 or more"),
    "float16": (["model.dtype=float16"], "model.dtype: float16 training needs loss scaling"),
    "attention": (["model.attn_implementation=foo"], "model.attn_implementation: 'foo' is not one of"),
    "batch-zero": (["model.batch_size=0"], "model.batch_size: must be positive"),
    "less-than-a-batch": (["n_examples=4"], "n_examples: 4 is less than one batch"),
    "prompt-longer": (["model.max_prompt_length=600", "model.max_length=512"], "must be less than model.max_length"),
    "eval-examples": (["n_eval_examples=0"], "n_eval_examples: must be positive"),
    "new-tokens": (["max_new_tokens=0"], "max_new_tokens: must be positive"),
    "wandb": (["wandb.mode=on"], "wandb.mode"),
    "beta": (["loss=dpo", "loss.beta=0"], "loss.beta: must be positive"),
    "smoothing-exo": (["loss=exo_pair", "loss.label_smoothing=0.0"], "loss.label_smoothing: must be in (0, 0.5)"),
    "smoothing": (["loss=robust", "loss.label_smoothing=0.5"], "loss.label_smoothing: must be in [0, 0.5)"),
    "sync-negative": (["loss=dpo", "sync_reference_every=-1"], "sync_reference_every: must be 0 or more"),
    "dataset-num-proc": (["dataset_num_proc=0"], "dataset_num_proc: at least 1"),
    "deepspeed-ppo": (["loss=ppo", "distributed=deepspeed"], "distributed=deepspeed: not with loss=ppo"),
    "deepspeed-sharded": (["distributed=deepspeed", "checkpoint_format=sharded"],
                          "distributed=deepspeed: checkpoint_format=sharded is torch.distributed.checkpoint's"),
    "deepspeed-tr-dpo": (["loss=dpo", "distributed=deepspeed", "sync_reference_every=2"],
                         "distributed=deepspeed: sync_reference_every (TR-DPO)"),
    "sync-lora": (["loss=dpo", "sync_reference_every=4", "model.use_peft=true"], "sync_reference_every"),
    "sync-no-reference": (["loss=sft", "sync_reference_every=2"], "sync_reference_every: loss sft has no reference"),
    "cache-no-reference": (["loss=simpo", "cache_reference_logprobs=true"],
                           "cache_reference_logprobs: loss simpo has no reference model"),
    "loss-data-shape": (["loss=dpo", "loss.data_shape=sft"], "loss.data_shape: config/loss/dpo.yaml uses 'pairwise'"),
    "loss-trainer": (["loss=dpo", "loss.trainer=SFTTrainer"],
                     "loss.trainer: config/loss/dpo.yaml uses 'PairedPreferenceTrainer', not 'SFTTrainer'"),
    "kto-weight": (["loss=kto", "loss.desirable_weight=-1"], "loss.desirable_weight: must be positive"),
    "ppo-labels-online": (["loss=ppo", "loss.reward=labels"], "loss.reward: labels score the dataset's own "
                                                               "responses, so they need loss.rollout=offline"),
    "ppo-reward-missing": (["loss=ppo", "loss.reward=train.demo:nothing"], "loss.reward: cannot import "
                                                                           "train.demo:nothing"),
    "ppo-reward-dir": (["loss=ppo", "loss.reward=/nonexistent/rm"], "loss.reward: /nonexistent/rm is not a reward "
                                                                    "model dir"),
    "ppo-rollout": (["loss=ppo", "loss.rollout=onlne"], "loss.rollout: 'onlne' is not one of online, offline"),
    "ppo-kl": (["loss=ppo", "loss.kl_estimator=k4"], "loss.kl_estimator: 'k4' is not one of k1, k2, k3"),
    "ppo-clip": (["loss=ppo", "loss.clip=0"], "loss.clip: must be in (0, inf]"),
    "ppo-top-p": (["loss=ppo", "loss.top_p=1.5"], "loss.top_p: must be in (0, 1]"),
    "ppo-lam": (["loss=ppo", "loss.lam=2"], "loss.lam: must be in [0, 1]"),
    "ppo-epochs": (["loss=ppo", "loss.ppo_epochs=0"], "loss.ppo_epochs: must be a whole number, at least 1"),
    "ppo-vf-lr": (["loss=ppo", "loss.vf_lr=-1"], "loss.vf_lr: a positive number, or null for 10 x lr"),
    "ppo-cache": (["loss=ppo", "cache_reference_logprobs=true"], "cache_reference_logprobs: not with loss=ppo"),
    "ppo-critic": (["loss=ppo", "loss.critic=reward_model"], "loss.critic=reward_model starts the critic from the "
                                                              "reward model, but loss.reward=train.demo:reward"),
    "ppo-minibatches": (["loss=ppo", "loss.ppo_minibatches=3"], "(prompts per rollout) is not "
                                                                "divisible by loss.ppo_minibatches"),
    "lora-targets": (["model.use_peft=true", "model.peft.target_modules=[]"], "model.peft.target_modules: empty"),
    "lora-dropout": (["model.use_peft=true", "model.peft.lora_dropout=1.0"], "model.peft.lora_dropout"),
    "keep-best-typo": (["keep_best_metric=loss/evl"], "keep_best_metric: SFTTrainer never reports 'loss/evl' "
                                                      "(did you mean 'loss/eval'?)"),
    "keep-best-other-trainer": (["loss=bradley-terry", "keep_best_metric=logps_eval/chosen"],
                                "keep_best_metric: BradleyTerryTrainer never reports 'logps_eval/chosen'"),
    "exp-name-dot": (user_work_in_cache_dir, "exp_name: '.' must name a dir below cache_dir"),
    "exp-name-empty": (["exp_name="], "exp_name: '' must name a dir below cache_dir"),
    "exp-name-absolute": (["exp_name=/tmp/x"], "exp_name: '/tmp/x' must name a dir below cache_dir"),
    "exp-name-parent": (["exp_name=../x"], "exp_name: '../x' must name a dir below cache_dir"),
    "datasets-empty": (["datasets=[]"], "datasets: empty"),
    "test-datasets-empty": (["test_datasets=[]"], "test_datasets: empty"),
    "data-missing": (["datasets=[missing.jsonl]"], "datasets[0]: missing.jsonl: no such file"),
    "data-suffix": (lambda s: [f"datasets=[{s.file('data.txt', 'a,b')}]"], "data files must end in .jsonl, .json, "
                                                                             ".parquet, .arrow, .csv"),
    "data-entry-key": (["datasets=[{path: demo, weight: 2}]"], "datasets[0]: demo: unknown key(s) ['weight']; a "
                                                               "dataset entry takes path, column_map, n, fraction"),
    "data-is-dir": (data_dir, "a directory, not a data file"),
    "test-data-missing": (["test_datasets=[gone.jsonl]"], "test_datasets[0]: gone.jsonl: no such file"),
    "dataset-name": (["datasets=[dmeo]"], "dataset 'dmeo': not a named dataset (did you mean 'demo'?)"),
    "model-missing": (["model.name_or_path=/nonexistent/model"], "model.name_or_path: /nonexistent/model: no such "
                                                                 "directory"),
    "model-empty-dir": (lambda s: [f"model.name_or_path={s.model_dir('m', config=False, tokenizer=False)}"],
                        "model.name_or_path: {tmp}/m has no config.json"),
    "model-no-tokenizer": (lambda s: [f"model.name_or_path={s.model_dir('m', tokenizer=False)}"],
                           "model.name_or_path: {tmp}/m has no tokenizer"),
    "tokenizer-empty-dir": (lambda s: [f"model.tokenizer_name_or_path={s.model_dir('t', config=False, tokenizer=False)}"],
                            "model.tokenizer_name_or_path: {tmp}/t has no tokenizer"),
    "model-adapter-dir": (adapter_dir, "it holds a LoRA adapter"),
    "model-not-cached": (["model.name_or_path=someorg/somemodel"], "model.name_or_path: 'someorg/somemodel' is "
                                                                   "neither a local directory nor a model in the "
                                                                   "Hugging Face cache"),
    "weights-renamed": (weights_file("consolidated.00.pth"),
                        "holds weights transformers does not load (consolidated.00.pth)"),
    "weights-in-subfolder": (weights_file("weights/model.pt"),
                             "holds weights transformers does not load (weights/model.pt)"),
    "run-dir-is-file": (a_file, "exp_name: run dir {tmp}/runs/run can't be made: {tmp}/runs is a file"),
    "resume-missing": (["resume=/nonexistent/step-4"], "resume: /nonexistent/step-4 is not a complete checkpoint: "
                                                       "no MANIFEST"),
    "resume-not-checkpoint": (lambda s: [f"resume={s.tmp}"], "resume: {tmp} is not a complete checkpoint"),
}

GOOD_LINE, NEWLINE = json.dumps({"prompt": "a", "response": "b"}) + "\n", "\n"
# Mistakes found once the run dir is locked, before the model is loaded.
RUN_MISTAKES = {
    "data-malformed": (lambda s: [f"datasets=[{s.file('bad.jsonl', GOOD_LINE + '{oops' + NEWLINE)}]"],
                       "error: {tmp}/bad.jsonl:2: malformed JSON"),
    "data-field": (lambda s: [f"datasets=[{s.file('bad.jsonl', json.dumps({'prompt': 'a'}))}]"],
                   "error: {tmp}/bad.jsonl:1: missing field 'response'"),
    "data-too-small": (lambda s: [f"datasets=[{s.file('small.jsonl', json.dumps({'prompt': 'a', 'response': 'b'}))}]",
                                  "test_datasets=[demo]"], "training examples is less than one batch"),
    "data-columns": (lambda s: [f"datasets=[{s.file('qa.csv', 'question,answer' + NEWLINE + 'q,a' + NEWLINE)}]"],
                     "error: {tmp}/qa.csv: columns ['answer', 'question'] fit no record shape"),
    "run-dir-not-ours": (someone_elses_dir, "error: run dir {tmp}/runs/run holds files this trainer did not write"),
    "lock-on-other-host": (foreign_lock, "is in use by pid 4242 on host node-17"),
    "finished-other-config": (on_the_trained_run(["lr=5e-4"], final=True),
                              "error: {tmp}/runs/run/FINAL exists: this run is finished, and with another config "
                              "(lr: 0.001 -> 0.0005); to train with this config, choose another exp_name"),
    "resume-other-loss": (on_the_trained_run(["loss=dpo"]),
                          "error: {tmp}/runs/run/step-4 cannot be continued by this run: it was made with "
                          "loss.data_shape: 'sft' -> 'pairwise'"),
    "resume-other-width": (on_the_trained_run(lambda s: [f"model.name_or_path={s.model_dir('wide', hidden_size=256)}"]),
                           "error: {tmp}/runs/run/step-4 holds another model: hidden_size 128 in the checkpoint, "
                           "256 in {tmp}/wide"),
    "resume-unreadable": (on_the_trained_run(
        lambda s: [f"resume={s.damage_step('step-4', lambda step: garble(step / 'optimizer.pt'))}"]),
        "error: resume: {tmp}/runs/run/step-4/optimizer.pt: unreadable"),
    "resume-state-keys": (on_the_trained_run(lambda s: [f"resume={s.damage_step('step-4', without_state_key)}"]),
                          "error: resume: {tmp}/runs/run/step-4/trainer_state.json: unreadable (ValueError: no "
                          "batch_index)"),
    "all-checkpoints-unreadable": (unreadable_checkpoints, "error: no checkpoint in {tmp}/runs/run can be read"),
    "resume-past-the-end": (on_the_trained_run(["n_examples=16"]),
                            "error: {tmp}/runs/run/step-4 is at step 4 and this run has 2 steps: nothing to train; "
                            "to start from its weights, set model.name_or_path={tmp}/runs/run/step-4"),
    "hub-dataset-offline": (["datasets=[hh]", "test_datasets=null"], "error: dataset 'hh': cannot load "
                                                                     "Anthropic/hh-rlhf[train] from the Hugging Face hub"),
    "wandb-without-key": (["wandb.mode=online"], "error: wandb.mode=online: wandb did not start"),
}

BASE = ["exp_name=run", "n_examples=16", "model.batch_size=8", "model.eval_batch_size=8", "n_eval_examples=8",
        "n_eval_generations=0", "do_first_eval=false", "eval_every=2", "save_every=2", "intermediate_checkpoints=true",
        "keep_last_n=-1", "wandb.mode=disabled"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_data) -> pathlib.Path:
    """A finished SFT run dir with step-2, step-4 and FINAL, made with BASE and small_data."""
    from conftest import compose
    from launch import run
    cache = tmp_path_factory.mktemp("trained")
    run(compose([f"cache_dir={cache}", *BASE, *small_data, "n_examples=48"]))
    return cache / "run"


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> list[str]:
    return demo_files(tmp_path_factory.mktemp("data"), 48, 8)


@pytest.mark.parametrize("name", [*CONFIG_MISTAKES, *RUN_MISTAKES])
def test_a_mistake_stops_the_run_in_one_line(name, tmp_path, runs, trained, small_data):
    overrides, expected = CONFIG_MISTAKES.get(name) or RUN_MISTAKES[name]
    setup = Setup(tmp_path, trained)
    overrides = overrides(setup) if callable(overrides) else overrides
    before = files(tmp_path)
    run = runs.start(f"cache_dir={setup.cache}", *BASE, *small_data, "n_examples=48", *overrides, cwd=tmp_path)
    code = run.wait()
    lines = run.stderr().strip().splitlines()
    assert code != 0 and len(lines) == 1, f"exit {code}, stderr:\n{run.stderr()[-3000:]}"
    assert expected.format(tmp=tmp_path) in lines[0]
    assert "model" not in run.loaded()
    after = files(tmp_path)
    if name in CONFIG_MISTAKES:  # nothing loaded, nothing made (no run dir), nothing changed
        assert run.loaded() == [] and after == before
    # Nothing that was there is changed: a run dir that was not ours, a checkpoint that can't be continued.
    assert {p: after.get(p) for p in before if p.name != ".aligntrain.lock"} == {
        p: t for p, t in before.items() if p.name != ".aligntrain.lock"}


def files(directory: pathlib.Path) -> dict:
    """Every path below `directory`, with its size and modification time for files."""
    return {p: p.is_file() and (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*")}


def test_a_finished_run_with_the_same_config_is_left_alone(tmp_path, runs, trained, small_data):
    shutil.copytree(trained, tmp_path / "runs" / "run")
    final = tmp_path / "runs" / "run" / "FINAL"
    run = runs.start(f"cache_dir={tmp_path / 'runs'}", *BASE, *small_data, "n_examples=48", "wandb.mode=offline")
    assert run.wait() == 0 and f"nothing to do: {final} exists, the run is finished" in run.stdout()
    assert run.loaded() == []


def test_valid_overrides_pass():
    check_command_line(["loss=sft", "model=llama", f"model.name_or_path={TINY}", "lr=1e-5", "model.batch_size=8",
                        "hydra.run.dir=x", "-m", "seed=1,2", "model.peft.target_modules=[q_proj,v_proj]",
                        "++lr=1e-4"])


def test_every_optimizer_offered_takes_a_step():
    """The optimizers config accepts are all driven by this loop (one .step(), no closure) over 1-D and
    2-D parameters; every torch.optim optimizer is either offered or refused with a reason."""
    from omegaconf import OmegaConf

    from train.optim import make_optimizer
    every = {n for n, c in vars(torch.optim).items() if isinstance(c, type) and issubclass(c, torch.optim.Optimizer)
             and c is not torch.optim.Optimizer}
    assert every == set(OPTIMIZERS) | set(UNSUPPORTED_OPTIMIZERS)
    for name in OPTIMIZERS:
        weight, bias = torch.nn.Parameter(torch.ones(3, 2)), torch.nn.Parameter(torch.ones(3))
        optimizer = make_optimizer(OmegaConf.create({"optimizer": name, "lr": 0.1, "weight_decay": 0.0}), [weight, bias])
        ((weight.sum(0) * 2).sum() + bias.sum()).backward()
        optimizer.step()
        assert (weight < 1).all() and (bias < 1).all(), name


def test_attention_choices_are_ones_transformers_has():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    assert set(ATTENTION) <= {"eager", *ALL_ATTENTION_FUNCTIONS.keys()}


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = set(project["dependencies"]).union(*project["optional-dependencies"].values())
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert set(pip) == declared


def test_readme_defaults_are_config_yamls():
    """Every default is written once, in config/config.yaml (the schema has types only); the README's
    table of keys must say the same, or it is stale."""
    import re
    from omegaconf import OmegaConf
    from train.config import CONFIG_DIR, Config
    defaults = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "config.yaml"), resolve=False)
    checked = 0
    readme = (ROOT / "README.md").read_text()
    for key, cell in re.findall(r"^\| `([a-z_.]+)` \| ([^|]+) \|", readme, flags=re.M):
        value = defaults
        for part in key.split("."):
            value = value.get(part, "absent") if isinstance(value, dict) else "absent"
        if value == "absent" or isinstance(value, (dict, list)) or "${" in str(value):
            continue
        written = cell.split("(")[0].strip().strip("`")
        parsed = {"true": True, "false": False, "null": None}.get(written, written)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parsed = float(written)
        assert parsed == value, f"README says {key} defaults to {written!r}, config/config.yaml says {value!r}"
        checked += 1
    assert checked >= 30, checked
    schema = OmegaConf.structured(Config)
    assert all(OmegaConf.is_missing(schema, k) for k in ("lr", "seed", "optimizer", "warmup")), \
        "the schema holds a default: write it in config/config.yaml only"
