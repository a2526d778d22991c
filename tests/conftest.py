"""Shared helpers: offline, wandb off, tiny configs, and in-process or CLI training runs."""
import os
import pathlib
import subprocess
import sys

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "train" / "assets" / "tiny"
# Small and quick: a few steps on the demo task with light evaluation.
FAST = ["n_examples=64", "model.batch_size=16", "model.eval_batch_size=16", "n_eval_examples=32",
        "n_eval_generations=4", "max_new_tokens=8", "do_first_eval=false", "log_every=1", "wandb.mode=disabled"]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir
    from train.config import CONFIG_DIR, validate
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose("config", overrides=overrides)
    validate(cfg)
    return cfg


def train_in_process(cache_dir: pathlib.Path, *overrides: str) -> pathlib.Path:
    """Train as launch.py would, in this process (no import cost); returns the FINAL dir."""
    from launch import run
    return run(compose([f"cache_dir={cache_dir}", *FAST, *overrides]))


def build_trainer(cache_dir: pathlib.Path, *overrides: str):
    """The trainer launch.py would build, before training, for tests that look inside."""
    from launch import build
    return build(compose([f"cache_dir={cache_dir}", *FAST, *overrides]))


def launch_cli(*args: str, cwd=ROOT, launcher=(sys.executable,), env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([*launcher, str(ROOT / "launch.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture
def small_demo(tmp_path) -> list[str]:
    """Overrides that train on 48 demo pairs and evaluate on 16, from local files (quick to cache)."""
    import json
    from train import demo
    paths = []
    for split, n in (("train", 48), ("test", 16)):
        path = tmp_path / f"demo-{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in demo.records(split)[:n]))
        paths.append(path)
    return [f"datasets=[{paths[0]}]", f"test_datasets=[{paths[1]}]"]


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(TINY)
