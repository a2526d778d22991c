"""Benchmark DPO training throughput of this project against TRL's DPOTrainer, on CPU in fp32.

Both trainers train the same ~10M-parameter Llama (random init, fixed seed, saved to a temp dir
with a word-level tokenizer built here) on the same synthetic, variable-length preference pairs,
in the same batches of 8 pairs (TRL reads the data in this project's batch order with a
sequential sampler), max length 512, AdamW, beta 0.1, sigmoid loss. Each configuration runs in a
subprocess of its own so peak memory is its own:

    ours            launch.run (the real training path), reference model in memory
    ours-cached     the same with cache_reference_logprobs=true (the one-off pass is timed apart)
    trl             TRL DPOTrainer, bf16=False, gradient_checkpointing=False, reference model in memory
    trl-precompute  the same with precompute_ref_log_probs=true (the one-off pass is timed apart)

A step's time is the wall time between the starts of consecutive optimizer steps (batch already
collated): forward, backward, clipping, optimizer, logging and collating the next batch. Steps
`warmup+1 .. warmup+steps` are measured; one extra step runs after them so the last measured
step has an end. Tokens are the non-padding tokens of the chosen and rejected rows of each step,
read from the batches each trainer actually received (the script checks they agree per step).
Model FLOPs per step = (6 + 2 * [reference forward each step]) * N * tokens, N the non-embedding
parameters (the input embedding is a lookup, not a matmul; the LM head counts); MFU divides
them by the step time and by the best 2048x2048 fp32 torch.matmul rate measured in the same run.

    .venv/bin/python scripts/bench_dpo.py --steps 12 --out docs/benchmarks.md [--repeats 2] [--profile]

Writes (or replaces) the `## DPO throughput vs TRL` section of --out and prints the table. Each
step's time is also split into phases (policy and reference forward, backward, clipping, optimizer
step, the rest). `--repeats N` runs every configuration N times, alternating, and reports each one's
fastest run (outside load on a shared machine only ever slows a run down). `--profile` adds two
short runs that profile one step of ours and of TRL with torch.profiler, and their top operators.
"""
import argparse
import datetime
import json
import os
import pathlib
import platform
import random
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The project code the workers run: a snapshot of ROOT's taken when the benchmark starts (BENCH_SRC),
# so that edits to the working tree while it runs cannot mix versions between configurations.
SRC = pathlib.Path(os.environ.get("BENCH_SRC", ROOT))
SNAPSHOT = ["train", "config", "launch.py", "tests/conftest.py"]
SECTION = "## DPO throughput vs TRL"
CONFIGS = ("ours", "ours-cached", "trl", "trl-precompute")
BATCH, MAX_LENGTH, MAX_PROMPT_LENGTH, BETA, LR = 8, 512, 256, 0.1, 5e-6
MODEL = dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024)
SPECIAL = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<unk>"]
ROLES = ["user", "assistant", "system"]
N_WORDS = MODEL["vocab_size"] - len(SPECIAL) - len(ROLES)
# Tokens ChatML adds: <|im_start|> user ... <|im_end|> <|im_start|> assistant | ... <|im_end|>
PROMPT_OVERHEAD, RESPONSE_OVERHEAD = 5, 1
# Sequence (prompt + response) lengths are uniform in this range: a 4x spread.
MIN_TOTAL, MAX_TOTAL, MIN_PROMPT, MIN_RESPONSE = 128, 512, 16, 16


# ------------------------------------------------------------------------------ fixtures

def build_tokenizer():
    """A word-level tokenizer: 'w0'..'w8184', the ChatML roles and specials; whitespace (the
    template's newlines included) is not a token, so a text of k words is exactly k tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    sys.path.insert(0, str(SRC))
    from train.models import CHATML_TEMPLATE

    vocab = {t: i for i, t in enumerate(SPECIAL + ROLES + [f"w{i}" for i in range(N_WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIAL)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|im_end|>",
                                   unk_token="<unk>", chat_template=CHATML_TEMPLATE, model_max_length=1024)


def build_model(directory: pathlib.Path, seed: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    assert len(tokenizer) == MODEL["vocab_size"], len(tokenizer)
    config = LlamaConfig(**MODEL, tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def make_pairs(n: int, seed: int) -> list[dict]:
    """Deterministic pairs; chosen and rejected sequences each total MIN_TOTAL..MAX_TOTAL tokens."""
    rng = random.Random(seed)

    def words(k):
        return " ".join(f"w{rng.randrange(N_WORDS)}" for _ in range(k))

    pairs = []
    for _ in range(n):
        total_c, total_r = rng.randint(MIN_TOTAL, MAX_TOTAL), rng.randint(MIN_TOTAL, MAX_TOTAL)
        room = min(total_c, total_r) - PROMPT_OVERHEAD - RESPONSE_OVERHEAD - MIN_RESPONSE
        prompt = rng.randint(MIN_PROMPT, min(room, MAX_PROMPT_LENGTH - PROMPT_OVERHEAD))
        pairs.append({"prompt": words(prompt),
                      "chosen": words(total_c - prompt - PROMPT_OVERHEAD - RESPONSE_OVERHEAD),
                      "rejected": words(total_r - prompt - PROMPT_OVERHEAD - RESPONSE_OVERHEAD),
                      "lengths": [total_c, total_r]})
    return pairs


def write_jsonl(path: pathlib.Path, pairs: list[dict]) -> None:
    with open(path, "w") as f:
        for p in pairs:
            f.write(json.dumps({k: p[k] for k in ("prompt", "chosen", "rejected")}) + "\n")


def peak_matmul_flops(repeats: int = 12, n: int = 2048) -> float:
    """Best fp32 n x n torch.matmul rate (FLOP/s) over `repeats` timings."""
    import torch
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


# ------------------------------------------------------------------------------- workers

def _our_items(work: pathlib.Path):
    """This project's tokenized training items, in file order, and its batch order for epoch 0."""
    sys.path.insert(0, str(SRC))
    from omegaconf import OmegaConf

    from train import data
    from train.models import load_tokenizer
    tokenizer = load_tokenizer(OmegaConf.create({"name_or_path": str(work / "model"),
                                                 "tokenizer_name_or_path": None, "trust_remote_code": False}))
    examples, _, _ = data.load_splits([str(work / "train.jsonl")], [str(work / "eval.jsonl")], "pairwise",
                                      BATCH, 0, False)
    items, truncated = data.tokenize(examples, tokenizer, MAX_LENGTH, MAX_PROMPT_LENGTH)
    assert truncated.prompts == truncated.responses == 0, truncated
    return items


def print_table(rows: list[str], out, command: str) -> None:
    """Print a Markdown table; with `out`, append it and the command that made it to that file."""
    table = "\n".join(rows)
    print(table)
    if out:
        with open(out, "a") as f:
            f.write(f"\n{table}\n\nCommand: `{command}`\n")


def _compose(overrides: list[str]):
    """tests/conftest.py's compose (the tests' in-process path), or the same four lines."""
    sys.path.insert(0, str(SRC / "tests"))
    try:
        from conftest import compose
    except ImportError:
        from hydra import compose as hydra_compose, initialize_config_dir
        from train.config import CONFIG_DIR, validate

        def compose(overrides):
            with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
                cfg = hydra_compose("config", overrides=overrides)
            validate(cfg)
            return cfg
    return compose(overrides)


class Recorder:
    """What a worker measures: step starts (wall and CPU clocks), tokens per step, peak RSS before the
    first step, the one-off reference pass, and per-step time in phases (policy and reference model
    calls, backward, gradient clipping, optimizer step). `step` is the number of steps begun."""

    def __init__(self, args, work: pathlib.Path):
        from accelerate import Accelerator
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
        self.args, self.work = args, work
        self.starts, self.cpu, self.tokens, self.rss_before = [], [], [], []
        self.setup_s = 0.0
        self.phases: dict[int, dict[str, float]] = {}
        self.profiler = None
        Accelerator.backward = self.timed("backward", Accelerator.backward)
        Accelerator.clip_grad_norm_ = self.timed("clip grad norm", Accelerator.clip_grad_norm_)
        begun = []
        register_optimizer_step_pre_hook(lambda *a: begun.append(time.perf_counter()))
        register_optimizer_step_post_hook(lambda *a: self.add("optimizer step", time.perf_counter() - begun.pop()))

    @property
    def step(self) -> int:
        return len(self.starts)

    def add(self, phase: str, seconds: float) -> None:
        bucket = self.phases.setdefault(self.step, {})
        bucket[phase] = bucket.get(phase, 0.0) + seconds

    def timed(self, phase: str, fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.add(phase, time.perf_counter() - start)
        return wrapper

    def hook_module(self, module, phase: str) -> None:
        begun = []
        module.register_forward_pre_hook(lambda m, a: begun.append(time.perf_counter()))
        module.register_forward_hook(lambda m, a, o: self.add(phase, time.perf_counter() - begun.pop()))

    def begin_step(self, tokens: int = None) -> None:
        self.starts.append(time.perf_counter())
        self.cpu.append(time.process_time())
        if tokens is not None:
            self.tokens.append(tokens)
        if self.step == 1:
            self.rss_before.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        self._profile()

    def _profile(self) -> None:
        """torch.profiler over step args.profile_step (from its start to the next step's)."""
        import torch
        if not self.args.profile_step:
            return
        tag = pathlib.Path(self.args.result).stem
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            averages = self.profiler.key_averages()
            (self.work / f"{tag}-ops.txt").write_text(averages.table(sort_by="self_cpu_time_total", row_limit=30))
            rows = sorted(({"name": e.key, "self_cpu_us": e.self_cpu_time_total, "cpu_us": e.cpu_time_total,
                            "calls": e.count} for e in averages), key=lambda r: -r["self_cpu_us"])
            (self.work / f"{tag}-ops.json").write_text(json.dumps(rows))
            self.profiler = None
        elif self.step == self.args.profile_step:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.profiler.__enter__()

    def result(self, **extra) -> dict:
        return {"starts": self.starts, "cpu": self.cpu, "tokens": self.tokens, "setup_s": self.setup_s,
                "rss_before_train_kb": self.rss_before[0],
                "phases": {str(k): v for k, v in self.phases.items()}} | extra


def run_ours(work: pathlib.Path, name: str, args) -> dict:
    sys.path.insert(0, str(SRC))
    from launch import run
    from train import trainers
    rec = Recorder(args, work)
    cls = trainers.TRAINERS["PairedPreferenceTrainer"]
    original_begin, original_setup = cls.begin_step, cls.setup

    def begin_step(self, microbatches):
        if rec.step == 0:  # hook the models once they exist
            rec.hook_module(self.accelerator.unwrap_model(self.policy), "policy forward")
            if self.reference is not None and self.reference.copy is not None:
                rec.hook_module(self.reference.copy, "reference forward")
        rec.begin_step(sum(int(b["attention_mask"].sum()) for b in microbatches))
        return original_begin(self, microbatches)

    def setup_reference(self, policy):
        start = time.perf_counter()
        try:
            return original_setup(self, policy)
        finally:
            rec.setup_s += time.perf_counter() - start

    cls.begin_step, cls.setup = begin_step, setup_reference
    tag = pathlib.Path(args.result).stem
    overrides = [f"cache_dir='{work / ('runs-' + tag)}'", "exp_name=bench", "loss=dpo", "model=llama",
                 f"model.name_or_path='{work / 'model'}'", "model.dtype=float32",
                 f"datasets=['{work / 'train.jsonl'}']", f"test_datasets=['{work / 'eval.jsonl'}']",
                 f"model.batch_size={BATCH}", f"model.eval_batch_size={BATCH}", f"model.max_length={MAX_LENGTH}",
                 f"model.max_prompt_length={MAX_PROMPT_LENGTH}", f"n_examples={BATCH * (args.warmup + args.steps + 1)}",
                 "do_first_eval=false", f"n_eval_examples={BATCH}", "eval_every=100000", "wandb.mode=disabled",
                 f"lr={LR}", f"loss.beta={BETA}", f"seed={args.seed}",
                 f"cache_reference_logprobs={'true' if name == 'ours-cached' else 'false'}"]
    final = run(_compose(overrides))
    assert final.is_dir(), final
    history = [json.loads(line) for line in open(final.parent / "metrics.jsonl")]
    first_loss = next(h["loss/train"] for h in history if "loss/train" in h)
    return rec.result(first_loss=first_loss, reference_forward=name != "ours-cached")


def run_trl(work: pathlib.Path, name: str, args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    sys.path.insert(0, str(SRC))
    from train.data import Batches

    rec = Recorder(args, work)
    total_steps = args.warmup + args.steps + 1
    items = _our_items(work)
    # Our batch order (group_by_length and all), handed to TRL through a sequential sampler.
    batches = Batches(items, BATCH, 1, 1, 0, args.seed, group_by_length=True)
    order = [i for b in batches._batches(0)[:total_steps] for i in b]
    records = [json.loads(line) for line in open(work / "train.jsonl")]
    rows = [{"prompt": [{"role": "user", "content": records[i]["prompt"]}],
             "chosen": [{"role": "assistant", "content": records[i]["chosen"]}],
             "rejected": [{"role": "assistant", "content": records[i]["rejected"]}]} for i in order]

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kwargs):
            rec.begin_step()

    class Trainer(DPOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                rec.tokens.append(int(inputs["attention_mask"].sum()))
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

        def _precompute_ref_logps(self, *a, **k):
            start = time.perf_counter()
            try:
                return super()._precompute_ref_logps(*a, **k)
            finally:
                rec.setup_s += time.perf_counter() - start

    config = DPOConfig(output_dir=str(work / f"out-{pathlib.Path(args.result).stem}"), bf16=False, fp16=False,
                       gradient_checkpointing=False, use_cpu=True, report_to="none", save_strategy="no",
                       eval_strategy="no", per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
                       max_length=MAX_LENGTH, beta=BETA, loss_type=["sigmoid"], learning_rate=LR,
                       max_steps=total_steps, logging_steps=10, logging_first_step=True, seed=args.seed,
                       train_sampling_strategy="sequential", disable_tqdm=True, dataloader_pin_memory=False,
                       precompute_ref_log_probs=name == "trl-precompute")
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    trainer = Trainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                      callbacks=[StepTimer()])
    # Same token sequences as ours, row for row.
    for j, i in enumerate(order):
        row = trainer.train_dataset[j]
        assert (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) == (items[i].prompt, *items[i].responses), \
            f"TRL tokenized pair {i} differently from this project"
    rec.hook_module(trainer.model, "policy forward")
    if trainer.ref_model is not None:
        rec.hook_module(trainer.ref_model, "reference forward")
    trainer.train()
    first_loss = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    return rec.result(first_loss=first_loss, reference_forward=name == "trl", order=order,
                      optim=str(getattr(trainer.args.optim, "value", trainer.args.optim)))


def worker(args) -> None:
    import torch
    work = pathlib.Path(args.workdir)
    start = time.perf_counter()
    result = (run_ours if args.worker.startswith("ours") else run_trl)(work, args.worker, args)
    result |= {"wall_s": time.perf_counter() - start, "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
               "threads": torch.get_num_threads()}
    pathlib.Path(args.result).write_text(json.dumps(result))


# ------------------------------------------------------------------------------- parent

def snapshot(dest: pathlib.Path) -> str:
    """Copy the project code the workers run into `dest`; describe its git revision."""
    for name in SNAPSHOT:
        source, target = ROOT / name, dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)

    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return ""
    revision = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    dirty = [line[3:] for line in git("status", "--porcelain", "--", *SNAPSHOT).splitlines()]
    return f"commit {revision}" + (f" with uncommitted changes to {', '.join(dirty)}" if dirty else "")


def count_params(directory: pathlib.Path) -> tuple[int, int]:
    """(all parameters, non-embedding parameters: all but the input embedding)."""
    from safetensors import safe_open
    total = embedding = 0
    with safe_open(directory / "model.safetensors", "pt") as f:
        for key in f.keys():
            n = f.get_slice(key).get_shape()
            size = 1
            for d in n:
                size *= d
            total += size
            if "embed_tokens" in key:
                embedding += size
    return total, total - embedding


def spawn(name: str, work: pathlib.Path, args, extra: list[str] = (), tag: str = None) -> dict:
    """Run one configuration in a subprocess; its result, plus the mean 1-minute load average meanwhile."""
    tag = tag or name
    result = work / f"{tag}.json"
    log = work / f"{tag}.log"
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", name, "--workdir", str(work),
           "--result", str(result), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--seed", str(args.seed), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "HF_DATASETS_CACHE": str(work / "hf-datasets"), "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(SRC), "BENCH_SRC": str(SRC)}
    print(f"[bench] {tag}: running (log {log})", flush=True)
    start = time.perf_counter()
    loads = []
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=SRC, stdout=f, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            time.sleep(2)
            loads.append(os.getloadavg()[0])
    if proc.returncode != 0:
        sys.stderr.write(log.read_text()[-6000:])
        raise SystemExit(f"[bench] {tag} failed (exit {proc.returncode}); log: {log}")
    out = json.loads(result.read_text())
    out["load"] = statistics.mean(loads) if loads else float("nan")
    print(f"[bench] {tag}: done in {time.perf_counter() - start:.0f}s "
          f"({sum(out['tokens'][args.warmup:args.warmup + args.steps])} tokens measured; mean load {out['load']:.1f})",
          flush=True)
    return out


def summarise(name: str, r: dict, args, n_flops: int, peak: float) -> dict:
    lo, hi = args.warmup, args.warmup + args.steps
    times = [b - a for a, b in zip(r["starts"][lo:hi], r["starts"][lo + 1:hi + 1])]
    tokens = r["tokens"][lo:hi]
    assert len(times) == len(tokens) == args.steps, (name, len(times), len(tokens))
    flops_per_token = (6 + (2 if r["reference_forward"] else 0)) * n_flops
    phases = {}
    for step in range(lo + 1, hi + 1):  # the phases of step k are in bucket k
        for phase, seconds in r["phases"].get(str(step), {}).items():
            phases[phase] = phases.get(phase, 0.0) + seconds / args.steps
    phases["everything else"] = statistics.mean(times) - sum(phases.values())
    return {"name": name, "tokens_per_s": sum(tokens) / sum(times), "mean_s": statistics.mean(times),
            "median_s": statistics.median(times), "peak_rss_mib": r["peak_rss_kb"] / 1024,
            "rss_before_train_mib": r["rss_before_train_kb"] / 1024,
            "mfu": flops_per_token * sum(tokens) / sum(times) / peak, "setup_s": r["setup_s"],
            "tokens": tokens, "first_loss": r["first_loss"], "wall_s": r["wall_s"], "threads": r["threads"],
            "cpu_per_wall": (r["cpu"][hi] - r["cpu"][lo]) / sum(times), "load": r["load"], "phases": phases,
            "optim": r.get("optim")}


LABELS = {"ours": "ours (reference model)", "ours-cached": "ours, `cache_reference_logprobs=true`",
          "trl": "TRL DPOTrainer (reference model)", "trl-precompute": "TRL, `precompute_ref_log_probs=True`"}
PHASES = ["policy forward", "reference forward", "backward", "clip grad norm", "optimizer step", "everything else"]


def render(rows: dict) -> str:
    trl = rows.get("trl")
    lines = ["| run | tokens/s | vs TRL | step mean (s) | step median (s) | peak RSS (MiB) | vs TRL | MFU "
             "| one-off reference pass (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in rows.items():
        speed = f"{s['tokens_per_s'] / trl['tokens_per_s']:.2f}x" if trl else "-"
        memory = f"{s['peak_rss_mib'] / trl['peak_rss_mib']:.2f}x" if trl else "-"
        setup = f"{s['setup_s']:.1f}" if name in ("ours-cached", "trl-precompute") else "-"
        lines.append(f"| {LABELS[name]} | {s['tokens_per_s']:.0f} | {speed} | {s['mean_s']:.2f} | "
                     f"{s['median_s']:.2f} | {s['peak_rss_mib']:.0f} | {memory} | {100 * s['mfu']:.1f}% | {setup} |")
    return "\n".join(lines)


def render_phases(rows: dict) -> str:
    names = list(rows)
    lines = ["| phase (s per step, mean) | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for phase in PHASES:
        lines.append(f"| {phase} | " + " | ".join(f"{rows[n]['phases'].get(phase, 0.0):.2f}" for n in names) + " |")
    lines.append("| **step** | " + " | ".join(f"**{rows[n]['mean_s']:.2f}**" for n in names) + " |")
    return "\n".join(lines)


def targets(rows: dict) -> list[str]:
    out = []
    trl = rows.get("trl")
    if not trl:
        return out

    def verdict(ok):
        return "met" if ok else "**missed**"
    if "ours" in rows:
        r = rows["ours"]["tokens_per_s"] / trl["tokens_per_s"]
        out.append(f"- tokens/s without reference caching >= 1.5x TRL: {r:.2f}x, {verdict(r >= 1.5)}")
    if "ours-cached" in rows:
        r = rows["ours-cached"]["tokens_per_s"] / trl["tokens_per_s"]
        line = f"- tokens/s with reference caching >= 2x TRL: {r:.2f}x, {verdict(r >= 2)}"
        if "trl-precompute" in rows:
            r2 = rows["ours-cached"]["tokens_per_s"] / rows["trl-precompute"]["tokens_per_s"]
            line += f" (against TRL with its own precomputed reference log-probs: {r2:.2f}x)"
        out.append(line)
    for name in ("ours", "ours-cached"):
        if name in rows:
            r = rows[name]["peak_rss_mib"] / trl["peak_rss_mib"]
            out.append(f"- peak memory of {name} no higher than TRL's: {r:.2f}x, {verdict(r <= 1.0)}")
    return out


def profile_section(work: pathlib.Path, step: int) -> list[str]:
    """Top operators of one profiled step of ours, with TRL's time in the same operators."""
    ours_path, trl_path = work / "ours-profile-ops.json", work / "trl-profile-ops.json"
    if not ours_path.exists():
        return []
    ours = json.loads(ours_path.read_text())
    trl = {r["name"]: r for r in json.loads(trl_path.read_text())} if trl_path.exists() else {}
    total = sum(r["self_cpu_us"] for r in ours) or 1
    trl_total = sum(r["self_cpu_us"] for r in trl.values())
    lines = ["", "### Where the time goes", "",
             f"torch.profiler over step {step} of separate `ours` and `trl` runs (profiling slows a step; these "
             f"runs are not in the table above). Self CPU time summed over all operators: ours "
             f"{total / 1e6:.1f} s" + (f", TRL {trl_total / 1e6:.1f} s" if trl else "") + ". Top operators of ours:",
             "", "| operator | ours calls | ours self CPU (ms) | share | TRL calls | TRL self CPU (ms) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in ours[:15]:
        t = trl.get(r["name"])
        lines.append(f"| `{r['name']}` | {r['calls']} | {r['self_cpu_us'] / 1000:.0f} | "
                     f"{100 * r['self_cpu_us'] / total:.0f}% | {t['calls'] if t else 0} | "
                     f"{t['self_cpu_us'] / 1000 if t else 0:.0f} |")
    return lines


def write_section(out: pathlib.Path, body: str) -> None:
    """Replace the section (up to the next `## `) or append it; other sections are left alone."""
    text = out.read_text() if out.exists() else "# Benchmarks\n"
    start = text.find(SECTION)
    if start >= 0:
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + body + (text[end:] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + body
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12, help="measured optimizer steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured optimizer steps before them")
    p.add_argument("--out", default="docs/benchmarks.md", help="markdown file whose section to write")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)}")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs per configuration, alternating between configurations; the fastest is reported")
    p.add_argument("--profile", action="store_true",
                   help="also profile one step of ours and of TRL with torch.profiler (two extra short runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the temp dir (model, data, logs, profiles)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--profile-step", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    began = time.perf_counter()
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = set(configs) - set(CONFIGS)
    if unknown or not configs:
        raise SystemExit(f"--configs: choose from {','.join(CONFIGS)}")
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    import torch
    import transformers
    import trl

    global SRC
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench_dpo_"))
    try:
        revision = snapshot(work / "src")
        SRC = work / "src"
        print(f"[bench] this project: {revision} (snapshot in {SRC})", flush=True)
        total_steps = args.warmup + args.steps + 1
        build_model(work / "model", args.seed)
        train_pairs = make_pairs(BATCH * total_steps, args.seed)
        write_jsonl(work / "train.jsonl", train_pairs)
        write_jsonl(work / "eval.jsonl", make_pairs(BATCH, args.seed + 1))
        n_all, n_flops = count_params(work / "model")
        lengths = [t for pair in train_pairs for t in pair["lengths"]]
        peaks = [peak_matmul_flops()]
        print(f"[bench] model {n_all / 1e6:.2f}M parameters ({n_flops / 1e6:.2f}M non-embedding); "
              f"{len(train_pairs)} pairs, sequence lengths {min(lengths)}..{max(lengths)}; "
              f"peak fp32 matmul {peaks[0] / 1e9:.1f} GFLOP/s", flush=True)
        # Repeats alternate the configurations, so a burst of outside load spreads over all of them;
        # each configuration reports its fastest repeat (the least disturbed one).
        runs = {name: [] for name in configs}
        for repeat in range(args.repeats):
            for name in configs:
                runs[name].append(spawn(name, work, args, tag=f"{name}-{repeat + 1}"))
            peaks.append(peak_matmul_flops())
        profile_step = args.warmup + 1
        if args.profile:
            short = argparse.Namespace(**{**vars(args), "steps": 1})
            for name in ("ours", "trl"):
                spawn(name, work, short, ["--profile-step", str(profile_step)], tag=f"{name}-profile")
        peak = max(peaks)

        # The same pairs in the same batches: identical non-padding token counts, step by step...
        expected = runs[configs[0]][0]["tokens"]
        for name, rs in runs.items():
            for r in rs:
                if r["tokens"] != expected:
                    raise SystemExit(f"[bench] {name} saw different per-step token counts: {r['tokens']} vs {expected}")
        # ...and they are the lengths the data was built with (prompt+chosen plus prompt+rejected).
        trl_runs = runs.get("trl") or runs.get("trl-precompute")
        if trl_runs:
            order = trl_runs[0]["order"]
            by_step = [sum(sum(train_pairs[i]["lengths"]) for i in order[s * BATCH:(s + 1) * BATCH])
                       for s in range(total_steps)]
            assert by_step == expected, (by_step, expected)

        every = {name: [summarise(name, r, args, n_flops, peak) for r in rs] for name, rs in runs.items()}
        rows = {name: max(ss, key=lambda x: x["tokens_per_s"]) for name, ss in every.items()}
        elapsed = time.perf_counter() - began
        table = render(rows)
        command = "python scripts/bench_dpo.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        step_tokens = rows[configs[0]]["tokens"]
        threads = rows[configs[0]]["threads"]
        trl_optim = next((r["optim"] for r in rows.values() if r.get("optim")), None)
        # A run whose threads got much less than `threads` cores was slowed by other work on the
        # machine: comparisons with it are not trustworthy.
        starved = [n for n in configs if rows[n]["cpu_per_wall"] < 0.85 * threads]
        contention = ("**Warning: other work shared the cores during " + ", ".join(starved) + " (CPU/wall "
                      + ", ".join(f"{rows[n]['cpu_per_wall']:.2f}" for n in starved) + f" of at most {threads}, "
                      "see Conditions below): the ratios involving those runs are distorted, and the peak matmul "
                      "rate, hence MFU, may be too. Rerun on an idle machine.**") if starved else ""
        lines = [
            SECTION, "",
            f"Generated by `scripts/bench_dpo.py` on {datetime.date.today().isoformat()} in "
            f"{elapsed / 60:.1f} min:", "",
            f"    {command}", "",
            f"Machine: {os.cpu_count()} CPU cores ({_cpu_model()}), {threads} torch threads; torch "
            f"{torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, Python "
            f"{platform.python_version()}; this project at {revision}. Peak fp32 matmul, best 2048x2048 `torch.matmul` measured in this run: "
            f"{peak / 1e9:.1f} GFLOP/s.", "",
            f"Setup: a Llama of {n_all / 1e6:.1f}M parameters ({n_flops / 1e6:.1f}M non-embedding; hidden "
            f"{MODEL['hidden_size']}, {MODEL['num_hidden_layers']} layers, intermediate "
            f"{MODEL['intermediate_size']}, {MODEL['num_attention_heads']} heads, vocab {MODEL['vocab_size']}), "
            f"random init with seed {args.seed}, fp32 on CPU, SDPA attention; {len(train_pairs)} synthetic "
            f"preference pairs whose prompt+response sequences are {MIN_TOTAL}..{MAX_TOTAL} tokens (prompts "
            f"{MIN_PROMPT + PROMPT_OVERHEAD}..{MAX_PROMPT_LENGTH} tokens); DPO (sigmoid), beta {BETA}, AdamW, "
            f"lr {LR}, global batch {BATCH} pairs, max length {MAX_LENGTH}. Both trainers get the same batches "
            f"in the same order (this project's length-grouped batches; TRL through "
            f"`train_sampling_strategy=\"sequential\"` over the pairs in that order) and the same token "
            f"sequences (checked row by row and per step). TRL: `bf16=False`, `gradient_checkpointing=False`, "
            f"`use_cpu=True`, `optim={trl_optim}` (its default). {args.steps} steps measured after "
            f"{args.warmup} warmup steps, each configuration in its own process; {sum(step_tokens)} non-padding "
            f"tokens in the measured steps ({min(step_tokens)}..{max(step_tokens)} per step).", "",
            table, "",
            *([contention, ""] if contention else []),
            "tokens/s: non-padding tokens of the chosen and rejected rows of the measured steps over their summed "
            "time. A step is the wall time between the starts of consecutive optimizer steps (batch collated): "
            "forward, backward, clipping, optimizer, logging and collating the next batch. Peak RSS: the "
            "process's `ru_maxrss` (loading, data preparation and the one-off reference pass included). MFU: "
            "(6, plus 2 with a reference forward each step) x non-embedding parameters x tokens / step time / "
            "peak matmul rate. The one-off reference pass (this project's reference log-prob cache, or TRL's "
            "precompute) runs before the first step and is in no step time; ours also covers the "
            f"{BATCH} eval pairs and hashes the weights for the cache key. First-step losses (ln 2 = 0.6931 "
            "expected for all): " + ", ".join(f"{n} {rows[n]['first_loss']:.4f}" for n in configs) + ".", "",
            "Targets (from the project's issue):", "", *targets(rows), "",
            "Per-step time by phase (wall clock, mean over the measured steps): model calls are timed with "
            "forward hooks on the policy and reference modules (TRL's fused LM head runs inside the policy "
            "call; this project's log-softmax over the logits does not, so it is under everything else), "
            "backward and clipping by wrapping accelerate's `backward` and `clip_grad_norm_`, the optimizer "
            "step by torch's global optimizer hooks; everything else is the rest of the step (loss arithmetic, "
            "zero_grad, scheduler, logging, collating the next batch).", "",
            render_phases(rows), "",
            f"Conditions: the {os.cpu_count()} cores may be shared with other work. Load: mean 1-minute load "
            f"average while the configuration ran (this benchmark alone accounts for about {threads}); CPU/wall: "
            f"the process's CPU seconds per wall second over the measured steps (at most {threads}; lower means "
            f"its threads waited)" + (f"; tokens/s of each of the {args.repeats} alternating repeats, the "
                                      f"fastest reported above" if args.repeats > 1 else "") + ".", "",
            "| run | load | CPU/wall |" + (" tokens/s per repeat |" if args.repeats > 1 else ""),
            "|---|---:|---:|" + ("---|" if args.repeats > 1 else ""),
            *[f"| {n} | {rows[n]['load']:.1f} | {rows[n]['cpu_per_wall']:.2f} |"
              + (" " + ", ".join(f"{x['tokens_per_s']:.0f}" for x in every[n]) + " |" if args.repeats > 1 else "")
              for n in configs],
        ]
        if args.profile:
            lines += profile_section(work, profile_step)
        body = "\n".join(lines) + "\n"
        out = pathlib.Path(args.out)
        write_section(out if out.is_absolute() else ROOT / out, body)
        print()
        print(table)
        print()
        print("\n".join(targets(rows)))
        if contention:
            print("\n" + contention.replace("**", ""))
        print()
        print(render_phases(rows))
        for name in ("ours", "trl"):
            ops = work / f"{name}-profile-ops.txt"
            if args.profile and ops.exists():
                print(f"\n{name}, step {profile_step}:\n{ops.read_text()}")
        print(f"\n[bench] wrote {args.out} in {elapsed:.0f}s", flush=True)
    finally:
        if args.keep:
            print(f"[bench] kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
