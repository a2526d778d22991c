"""Configuration: bad overrides fail fast in one line, nothing is written; declared deps agree."""
import tomllib

import pytest
import yaml

from conftest import ROOT, launch_cli
from train.config import ConfigError, check_command_line


@pytest.mark.parametrize("argv, expected", [
    (["lrr=1e-5"], "unknown config key 'lrr' (did you mean 'lr'?)"),
    (["model.max_lenght=64"], "did you mean 'model.max_length'?"),
    (["loss=sftt"], "unknown loss 'sftt' (did you mean 'sft'?)"),
    (["model=lama"], "did you mean 'llama'?"),
    (["lr=fast"], "lr:"),
    (["model.batch_size=1.5"], "model.batch_size:"),
    (["lr_schedule=cosin"], "lr_schedule: 'cosin' is not one of linear, cosine, constant (did you mean 'cosine'?)"),
    (["optimizer=adamw"], "did you mean 'AdamW'?"),
    (["wandb.mode=on"], "wandb.mode"),
    (["model.max_prompt_length=600", "model.max_length=512"], "must be less than model.max_length"),
    (["-m", "lr=1e-3,abc"], "lr:"),  # every value of a sweep is checked
    (["n_examples=4"], "less than one batch"),
    (["loss=dpo", "loss.beta=0"], "loss.beta: must be positive"),
    (["loss=exo_pair", "loss.label_smoothing=0.0"], "loss.label_smoothing: must be in (0, 0.5)"),
    (["loss=robust", "loss.label_smoothing=0.5"], "loss.label_smoothing: must be in [0, 0.5)"),
    (["loss=dpo", "loss.beta=high"], "loss.beta: expected float"),
    (["loss=dpo", "sync_reference_every=4", "model.use_peft=true"], "sync_reference_every"),
])
def test_bad_overrides_name_the_key(argv, expected):
    with pytest.raises(ConfigError) as info:
        check_command_line(argv)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_valid_overrides_pass():
    check_command_line(["loss=sft", "model=llama", "lr=1e-5", "model.batch_size=8", "+extra=1",
                        "hydra.run.dir=x", "-m", "seed=1,2", "model.peft.target_modules=[q_proj,v_proj]"])


def test_loss_keys_are_checked_against_the_loss_yaml(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'loss.beta'"):
        check_command_line(["loss=sft", "loss.beta=0.1"])


def test_cli_typo_fails_fast_and_writes_nothing(tmp_path):
    result = launch_cli("lrr=1e-5", f"cache_dir={tmp_path / 'runs'}", cwd=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines == ["config error: unknown config key 'lrr' (did you mean 'lr'?)"], result.stderr
    assert list(tmp_path.iterdir()) == []


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = set(project["dependencies"]) | set(project["optional-dependencies"]["test"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert set(pip) == declared
