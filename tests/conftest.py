"""Shared helpers: offline, wandb off, tiny configs, and in-process or CLI training runs."""
import os
import pathlib
import subprocess
import sys

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "2")
# The datasets library's cache of what tests load lives and dies with the session (not in ~/.cache).
os.environ.setdefault("HF_DATASETS_CACHE", __import__("tempfile").mkdtemp(prefix="test-datasets-cache-"))

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
    """The trainer launch.py would build, before training, for tests that look inside. Its run dir
    is marked as the trainer's (locked and released at once), so that launch.run may continue it."""
    from launch import build
    from train.rundir import RunLock
    cfg = compose([f"cache_dir={cache_dir}", *FAST, *overrides])
    lock = RunLock(pathlib.Path(cfg.cache_dir) / cfg.exp_name)
    lock.acquire()
    lock.release()
    return build(cfg)


def launch_cli(*args: str, cwd=ROOT, launcher=(sys.executable,), env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([*launcher, str(ROOT / "launch.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def events(run_dir: pathlib.Path) -> list[dict]:
    """The run's metrics.jsonl, one dict per logged event."""
    import json
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(checkpoint: pathlib.Path) -> dict:
    from safetensors.torch import load_file
    return load_file(checkpoint / "model.safetensors")


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    """Same keys, values within atol (0: bit for bit)."""
    import torch
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m: f"{k}: {m}")


# Two-layer configs of each architecture a model yaml names, built here (no hub).
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
ARCHITECTURES = {
    "llama": lambda t: t.LlamaConfig(**SMALL),
    "mistral": lambda t: t.MistralConfig(**SMALL, num_key_value_heads=2),
    "qwen": lambda t: t.Qwen2Config(**SMALL, num_key_value_heads=2),  # q/k/v carry biases
    "gemma": lambda t: t.Gemma2Config(**SMALL, num_key_value_heads=1, head_dim=16),
    "pythia": lambda t: t.GPTNeoXConfig(**SMALL),
    "gpt2": lambda t: t.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256),  # Conv1D layers
}


def tiny_config(name: str, **overrides):
    """A fresh config of architecture `name` (see ARCHITECTURES), with `overrides` set on it."""
    import transformers
    config = ARCHITECTURES[name](transformers)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def local_model(name: str, directory: pathlib.Path):
    """Save a seed-0 random-weight model of architecture `name`, with the tiny tokenizer, to `directory`
    (a local model.name_or_path); return the model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    config = tiny_config(name, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model


def demo_files(directory: pathlib.Path, n_train: int, n_test: int) -> list[str]:
    """Overrides that train on the first n_train demo records and evaluate on n_test, from local files
    written to `directory` (quicker to load, tokenize and cache than the whole demo set)."""
    import json
    from train import demo
    paths = []
    for split, n in (("train", n_train), ("test", n_test)):
        path = directory / f"demo-{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in demo.records(split)[:n]))
        paths.append(path)
    return [f"datasets=[{paths[0]}]", f"test_datasets=[{paths[1]}]"]


@pytest.fixture
def small_demo(tmp_path) -> list[str]:
    return demo_files(tmp_path, 48, 16)


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """Real `launch.py` processes forked from one warm server (tests/forked.py)."""
    from forked import Runs
    runs = Runs(tmp_path_factory.mktemp("forked"))
    yield runs
    runs.close()


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(TINY)


def two_ranks(runs, cache_dir: pathlib.Path, *overrides: str, cwd: pathlib.Path = ROOT) -> str:
    """`launch.py` as 2 gloo ranks on CPU (as `torchrun --nproc_per_node 2` would run it), forked warm;
    both must succeed. Returns both ranks' stdout."""
    ranks = runs.ranks(2, f"cache_dir={cache_dir}", *FAST, *overrides, cwd=cwd)
    codes = [rank.wait() for rank in ranks]
    assert codes == [0, 0], "\n".join(rank.stderr()[-3000:] for rank in ranks)
    out = "".join(rank.stdout() for rank in ranks)
    assert "training on 2 process(es)" in out
    return out
