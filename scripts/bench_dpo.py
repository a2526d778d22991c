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

    .venv/bin/python scripts/bench_dpo.py --steps 12 --out docs/benchmarks.md [--profile]

Writes (or replaces) the `## DPO throughput vs TRL` section of --out and prints the table.
`--profile` also profiles one step of `ours` with torch.profiler and adds its top operators.
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

    sys.path.insert(0, str(ROOT))
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
    sys.path.insert(0, str(ROOT))
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


def _compose(overrides: list[str]):
    """tests/conftest.py's compose (the tests' in-process path), or the same four lines."""
    sys.path.insert(0, str(ROOT / "tests"))
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


def run_ours(work: pathlib.Path, name: str, args) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch

    from launch import run
    from train import trainers
    cls = trainers.TRAINERS["PairedPreferenceTrainer"]
    starts, tokens, rss_before = [], [], []
    setup_time = [0.0]
    total_steps = args.warmup + args.steps + 1
    profiler = [None]

    original_begin = cls.begin_step

    def begin_step(self, microbatches):
        starts.append(time.perf_counter())
        tokens.append(sum(int(b["attention_mask"].sum()) for b in microbatches))
        if len(starts) == 1:
            rss_before.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        if args.profile_step:
            if profiler[0] is not None:
                profiler[0].__exit__(None, None, None)
                profiler[0].export_chrome_trace(str(work / "ours-profile-trace.json"))
                table = profiler[0].key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
                (work / "ours-profile.txt").write_text(table)
                (work / "ours-profile.json").write_text(json.dumps(_profile_rows(profiler[0])))
                profiler[0] = None
            elif len(starts) == args.profile_step:
                profiler[0] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                     record_shapes=True)
                profiler[0].__enter__()
        return original_begin(self, microbatches)

    original_setup = cls._setup_reference

    def setup_reference(self, policy):
        start = time.perf_counter()
        try:
            return original_setup(self, policy)
        finally:
            setup_time[0] += time.perf_counter() - start

    cls.begin_step, cls._setup_reference = begin_step, setup_reference
    n_examples = BATCH * total_steps
    overrides = [f"cache_dir='{work / ('runs-' + name)}'", "exp_name=bench", "loss=dpo", "model=llama",
                 f"model.name_or_path='{work / 'model'}'", "model.dtype=float32",
                 f"datasets=['{work / 'train.jsonl'}']", f"test_datasets=['{work / 'eval.jsonl'}']",
                 f"model.batch_size={BATCH}", f"model.eval_batch_size={BATCH}", f"model.max_length={MAX_LENGTH}",
                 f"model.max_prompt_length={MAX_PROMPT_LENGTH}", f"n_examples={n_examples}",
                 "do_first_eval=false", f"n_eval_examples={BATCH}", "eval_every=100000", "wandb.mode=disabled",
                 f"lr={LR}", f"loss.beta={BETA}", f"seed={args.seed}",
                 f"cache_reference_logprobs={'true' if name == 'ours-cached' else 'false'}"]
    final = run(_compose(overrides))
    assert final.is_dir(), final
    history = [json.loads(line) for line in open(final.parent / "metrics.jsonl")]
    first_loss = next(h["loss/train"] for h in history if "loss/train" in h)
    return {"starts": starts, "tokens": tokens, "setup_s": setup_time[0], "first_loss": first_loss,
            "rss_before_train_kb": rss_before[0], "reference_forward": name != "ours-cached"}


def _profile_rows(prof) -> list[dict]:
    rows = []
    for e in prof.key_averages():
        rows.append({"name": e.key, "self_cpu_us": e.self_cpu_time_total, "cpu_us": e.cpu_time_total,
                     "calls": e.count})
    rows.sort(key=lambda r: -r["self_cpu_us"])
    return rows[:40]


def run_trl(work: pathlib.Path, name: str, args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    sys.path.insert(0, str(ROOT))
    from train.data import Batches

    total_steps = args.warmup + args.steps + 1
    items = _our_items(work)
    # Our batch order (group_by_length and all), handed to TRL through a sequential sampler.
    batches = Batches(items, BATCH, 1, 1, 0, args.seed, group_by_length=True)
    order = [i for b in batches._batches(0)[:total_steps] for i in b]
    records = [json.loads(line) for line in open(work / "train.jsonl")]
    rows = [{"prompt": [{"role": "user", "content": records[i]["prompt"]}],
             "chosen": [{"role": "assistant", "content": records[i]["chosen"]}],
             "rejected": [{"role": "assistant", "content": records[i]["rejected"]}]} for i in order]

    starts, tokens, rss_before = [], [], []
    setup_time = [0.0]

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kwargs):
            starts.append(time.perf_counter())
            if len(starts) == 1:
                rss_before.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)

    class Trainer(DPOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                tokens.append(int(inputs["attention_mask"].sum()))
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

        def _precompute_ref_logps(self, *a, **k):
            start = time.perf_counter()
            try:
                return super()._precompute_ref_logps(*a, **k)
            finally:
                setup_time[0] += time.perf_counter() - start

    config = DPOConfig(output_dir=str(work / f"out-{name}"), bf16=False, fp16=False, gradient_checkpointing=False,
                       use_cpu=True, report_to="none", save_strategy="no", eval_strategy="no",
                       per_device_train_batch_size=BATCH, gradient_accumulation_steps=1, max_length=MAX_LENGTH,
                       beta=BETA, loss_type=["sigmoid"], learning_rate=LR, max_steps=total_steps,
                       logging_steps=10, logging_first_step=True, seed=args.seed,
                       train_sampling_strategy="sequential", disable_tqdm=True, dataloader_pin_memory=False,
                       precompute_ref_log_probs=name == "trl-precompute")
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    trainer = Trainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                      callbacks=[StepTimer()])
    # Same token sequences as ours, row for row.
    for j, i in enumerate(order):
        row = trainer.train_dataset[j]
        ours = items[i]
        assert (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) == (ours.prompt, *ours.responses), \
            f"TRL tokenized pair {i} differently from this project"
    trainer.train()
    first_loss = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    return {"starts": starts, "tokens": tokens, "setup_s": setup_time[0], "first_loss": first_loss,
            "rss_before_train_kb": rss_before[0], "reference_forward": name == "trl", "order": order}


def worker(args) -> None:
    import torch
    work = pathlib.Path(args.workdir)
    start = time.perf_counter()
    result = (run_ours if args.worker.startswith("ours") else run_trl)(work, args.worker, args)
    result |= {"wall_s": time.perf_counter() - start, "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
               "threads": torch.get_num_threads()}
    pathlib.Path(args.result).write_text(json.dumps(result))


# ------------------------------------------------------------------------------- parent

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


def spawn(name: str, work: pathlib.Path, args, extra: list[str] = ()) -> dict:
    result = work / f"{name}.json"
    log = work / f"{name}.log"
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", name, "--workdir", str(work),
           "--result", str(result), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--seed", str(args.seed), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "HF_DATASETS_CACHE": str(work / "hf-datasets"), "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT)}
    print(f"[bench] {name}: running (log {log})", flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        sys.stderr.write(log.read_text()[-6000:])
        raise SystemExit(f"[bench] {name} failed (exit {proc.returncode}); log: {log}")
    print(f"[bench] {name}: done in {time.perf_counter() - start:.0f}s", flush=True)
    return json.loads(result.read_text())


def summarise(name: str, r: dict, args, n_flops: int, peak: float) -> dict:
    lo, hi = args.warmup, args.warmup + args.steps
    times = [b - a for a, b in zip(r["starts"][lo:hi], r["starts"][lo + 1:hi + 1])]
    tokens = r["tokens"][lo:hi]
    assert len(times) == len(tokens) == args.steps, (name, len(times), len(tokens))
    flops_per_token = (6 + (2 if r["reference_forward"] else 0)) * n_flops
    return {"name": name, "tokens_per_s": sum(tokens) / sum(times), "mean_s": statistics.mean(times),
            "median_s": statistics.median(times), "peak_rss_mib": r["peak_rss_kb"] / 1024,
            "rss_before_train_mib": r["rss_before_train_kb"] / 1024,
            "mfu": flops_per_token * sum(tokens) / sum(times) / peak, "setup_s": r["setup_s"],
            "tokens": tokens, "all_tokens": r["tokens"], "first_loss": r["first_loss"], "wall_s": r["wall_s"],
            "threads": r["threads"]}


LABELS = {"ours": "ours (reference model)", "ours-cached": "ours, `cache_reference_logprobs=true`",
          "trl": "TRL DPOTrainer (reference model)", "trl-precompute": "TRL, `precompute_ref_log_probs=True`"}


def render(rows: dict, meta: dict) -> str:
    trl = rows.get("trl")
    lines = ["| run | tokens/s | vs TRL | step mean (s) | step median (s) | peak RSS (MiB) | vs TRL | MFU "
             "| one-off reference pass (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in rows.items():
        speed = f"{s['tokens_per_s'] / trl['tokens_per_s']:.2f}x" if trl else "-"
        memory = f"{s['peak_rss_mib'] / trl['peak_rss_mib']:.2f}x" if trl else "-"
        setup = f"{s['setup_s']:.1f}" if name in ("ours-cached", "trl-precompute") else "-"
        lines.append(f"| {LABELS[name]} | {s['tokens_per_s']:.0f} | {speed} | {s['mean_s']:.3f} | "
                     f"{s['median_s']:.3f} | {s['peak_rss_mib']:.0f} | {memory} | {100 * s['mfu']:.1f}% | {setup} |")
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
        out.append(f"- tokens/s with reference caching >= 2x TRL: {r:.2f}x, {verdict(r >= 2)}")
        if "trl-precompute" in rows:
            r2 = rows["ours-cached"]["tokens_per_s"] / rows["trl-precompute"]["tokens_per_s"]
            out.append(f"  (against TRL with its own precomputed reference log-probs: {r2:.2f}x)")
    for name in ("ours", "ours-cached"):
        if name in rows:
            r = rows[name]["peak_rss_mib"] / trl["peak_rss_mib"]
            out.append(f"- peak memory of {name} no higher than TRL's: {r:.2f}x, {verdict(r <= 1.0)}")
    return out


def profile_section(work: pathlib.Path, step_s: float) -> list[str]:
    path = work / "ours-profile.json"
    if not path.exists():
        return []
    rows = json.loads(path.read_text())
    total = sum(r["self_cpu_us"] for r in rows) or 1
    lines = ["", "### Where a step of `ours` goes", "",
             f"torch.profiler, one step (step {meta_profile_step}) of a separate `ours` run (profiling slows it"
             + (f"; the unprofiled median step is {step_s:.2f} s" if step_s else "") + "). "
             f"Top operators by self CPU time (of {total / 1e6:.1f} s listed):", "",
             "| operator | calls | self CPU (ms) | share of listed |", "|---|---:|---:|---:|"]
    for r in rows[:12]:
        lines.append(f"| `{r['name']}` | {r['calls']} | {r['self_cpu_us'] / 1000:.0f} | "
                     f"{100 * r['self_cpu_us'] / total:.0f}% |")
    return lines


meta_profile_step = 0


def write_section(out: pathlib.Path, body: str) -> None:
    text = out.read_text() if out.exists() else "# Benchmarks\n"
    start = text.find(SECTION)
    if start >= 0:
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + body + (text[end:] if end >= 0 else "\n")
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


def main() -> None:
    global meta_profile_step
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12, help="measured optimizer steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured optimizer steps before them")
    p.add_argument("--out", default="docs/benchmarks.md", help="markdown file whose section to write")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)}")
    p.add_argument("--profile", action="store_true", help="also profile one step of `ours` (torch.profiler)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the temp dir (model, data, logs, traces)")
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
    if unknown:
        raise SystemExit(f"unknown configs {sorted(unknown)}; choose from {CONFIGS}")
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    import torch
    import transformers
    import trl

    work = pathlib.Path(tempfile.mkdtemp(prefix="bench_dpo_"))
    try:
        total_steps = args.warmup + args.steps + 1
        build_model(work / "model", args.seed)
        train_pairs = make_pairs(BATCH * total_steps, args.seed)
        write_jsonl(work / "train.jsonl", train_pairs)
        write_jsonl(work / "eval.jsonl", make_pairs(BATCH, args.seed + 1))
        n_all, n_flops = count_params(work / "model")
        lengths = [t for p_ in train_pairs for t in p_["lengths"]]
        peak_before = peak_matmul_flops()
        print(f"[bench] model {n_all / 1e6:.2f}M parameters ({n_flops / 1e6:.2f}M non-embedding); "
              f"{len(train_pairs)} pairs, sequence lengths {min(lengths)}..{max(lengths)}; "
              f"peak fp32 matmul {peak_before / 1e9:.1f} GFLOP/s", flush=True)
        results = {name: spawn(name, work, args) for name in configs}
        if args.profile:
            meta_profile_step = args.warmup + 1
            spawn("ours-profile", work, argparse.Namespace(**{**vars(args), "steps": 1}),
                  ["--profile-step", str(meta_profile_step)])
        peak = max(peak_before, peak_matmul_flops())

        # The same pairs in the same batches: identical non-padding token counts, step by step.
        expected = None
        for name, r in results.items():
            if expected is None:
                expected = r["tokens"]
            elif r["tokens"] != expected:
                raise SystemExit(f"[bench] {name} saw different per-step token counts: {r['tokens']} vs {expected}")
        # And they are the tokens the data was built with: sum of prompt+chosen and prompt+rejected lengths.
        if "trl" in results or "trl-precompute" in results:
            order = (results.get("trl") or results["trl-precompute"])["order"]
            by_step = [sum(sum(train_pairs[i]["lengths"]) for i in order[s * BATCH:(s + 1) * BATCH])
                       for s in range(total_steps)]
            assert by_step == expected, (by_step, expected)

        rows = {name: summarise(name, results[name], args, n_flops, peak) for name in configs}
        elapsed = time.perf_counter() - began
        table = render(rows, {})
        command = "python scripts/bench_dpo.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        step_tokens = rows[configs[0]]["tokens"]
        lines = [
            SECTION, "",
            f"Generated by `scripts/bench_dpo.py` on {datetime.date.today().isoformat()} "
            f"({elapsed / 60:.1f} min wall time in all):", "",
            f"    {command}", "",
            f"Machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}, "
            f"{_cpu_model()}), {rows[configs[0]]['threads']} torch threads; torch {torch.__version__}, "
            f"transformers {transformers.__version__}, trl {trl.__version__}, Python {platform.python_version()}. "
            f"Peak fp32 matmul (best 2048x2048 `torch.matmul`, this run): {peak / 1e9:.1f} GFLOP/s.", "",
            f"Setup: a Llama of {n_all / 1e6:.1f}M parameters ({n_flops / 1e6:.1f}M non-embedding; hidden "
            f"{MODEL['hidden_size']}, {MODEL['num_hidden_layers']} layers, intermediate "
            f"{MODEL['intermediate_size']}, {MODEL['num_attention_heads']} heads, vocab {MODEL['vocab_size']}), "
            f"random init with seed {args.seed}, fp32 on CPU; {len(train_pairs)} synthetic preference pairs "
            f"whose prompt+response sequences are {MIN_TOTAL}..{MAX_TOTAL} tokens (prompts {MIN_PROMPT}.."
            f"{MAX_PROMPT_LENGTH} tokens); DPO (sigmoid), beta {BETA}, AdamW, lr {LR}; global batch "
            f"{BATCH} pairs, max length {MAX_LENGTH}. Both trainers get the same batches in the same order "
            f"(this project's length-grouped batches; TRL through `train_sampling_strategy=\"sequential\"` over "
            f"the pairs in that order) and the same token sequences (checked row by row). TRL: `bf16=False`, "
            f"`gradient_checkpointing=False`, `use_cpu=True`, its default optimizer (fused AdamW). "
            f"{args.steps} steps measured after {args.warmup} warmup steps, each configuration in its own "
            f"process; {sum(step_tokens)} non-padding tokens in the measured steps "
            f"({min(step_tokens)}..{max(step_tokens)} per step).", "",
            table, "",
            "tokens/s: non-padding tokens of the chosen and rejected rows per measured step, over the summed "
            "step time. A step is the wall time between the starts of consecutive optimizer steps: forward, "
            "backward, clipping, optimizer, logging and collating the next batch. Peak RSS is the process's "
            "`ru_maxrss` (loading, data preparation and the reference pass included). MFU: "
            "(6 + 2 with a reference forward per step) x non-embedding parameters x tokens / step time / "
            "peak matmul rate. The one-off reference pass (the cache of reference log-probs, or TRL's "
            "precompute) runs before the first step and is not in any step time; ours covers the "
            f"{BATCH} eval pairs too and includes hashing the weights for the cache key. First-step losses "
            "(both should be ln 2 = 0.6931): "
            + ", ".join(f"{n} {rows[n]['first_loss']:.4f}" for n in configs) + ".", "",
            "Targets (project issue):", "", *targets(rows),
        ]
        if args.profile:
            lines += profile_section(work, rows["ours"]["median_s"] if "ours" in rows else None)
        body = "\n".join(lines) + "\n"
        write_section(ROOT / args.out if not pathlib.Path(args.out).is_absolute() else pathlib.Path(args.out), body)
        print()
        print(table)
        print()
        print("\n".join(targets(rows)))
        if args.profile and (work / "ours-profile.txt").exists():
            print()
            print((work / "ours-profile.txt").read_text())
        print(f"\n[bench] wrote {args.out}; total {elapsed:.0f}s", flush=True)
        print(json.dumps({n: {k: v for k, v in s.items() if k not in ("all_tokens",)} for n, s in rows.items()}))
    finally:
        if args.keep:
            print(f"[bench] kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()
