"""The GPU path: short bf16 SFT, DPO and PPO runs of a small Llama under FSDP2 on one GPU, with
tokens/s, MFU against the GPU's dense bf16 peak, and peak GPU memory, as a markdown table.

    .venv/bin/python scripts/bench_gpu.py [--steps 60] [--hidden 512 --layers 8] [--out docs/benchmarks.md]

Each stage is `torchrun --nproc_per_node 1 launch.py ... distributed=fsdp` (model.dtype auto: fp32
parameters and optimizer state, bf16 compute) on the demo task with a fresh random-init model; DPO
and PPO start from the SFT run. On a machine without a GPU it runs the same pipeline on CPU, in fp32,
for a few steps, as a check of the plumbing (no MFU).
"""
import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Dense bf16 tensor-core peaks (FLOP/s), from the vendors' datasheets.
PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


def make_model(directory: pathlib.Path, hidden: int, layers: int) -> int:
    """A random-init Llama with the tiny tokenizer; returns its non-embedding parameter count."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "train" / "assets" / "tiny")
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
                         vocab_size=len(tokenizer), max_position_embeddings=512, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)


def run_stage(work: pathlib.Path, name: str, overrides: list[str]) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", str(ROOT / "launch.py"),
           f"cache_dir={work}", f"exp_name={name}", "distributed=fsdp", "wandb.mode=disabled", "log_every=5",
           "do_first_eval=false", *overrides]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{name} failed:\n{result.stderr[-3000:]}")
    return [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    import torch
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--out", help="append the table to this markdown file")
    a = p.parse_args()
    gpu = torch.cuda.is_available()
    steps = a.steps if gpu else 4
    name = torch.cuda.get_device_name() if gpu else "CPU (plumbing check, fp32)"
    peak = next((v for k, v in PEAKS.items() if k in name), None) if gpu else None
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    n_params = make_model(work / "model", a.hidden, a.layers)
    batch = 32 if gpu else 8
    common = [f"n_examples={steps * batch}", f"model.batch_size={batch}", "n_eval_examples=64",
              "n_eval_generations=16", "max_new_tokens=16"]
    stages = {"sft": ["loss=sft", f"model.name_or_path={work / 'model'}", "lr=1e-3", *common],
              "dpo": ["loss=dpo", f"model.name_or_path={work / 'sft' / 'FINAL'}", "lr=3e-5", *common],
              "ppo": ["loss=ppo", f"model.name_or_path={work / 'sft' / 'FINAL'}", "lr=1e-4", *common]}
    rows = [f"{name}; a Llama of {n_params / 1e6:.1f}M non-embedding parameters (hidden {a.hidden}, "
            f"{a.layers} layers), FSDP2 on one process, model.dtype=auto, {steps} steps of {batch}:", "",
            "| stage | tokens/s | MFU | peak GPU memory (GiB) | held-out follows_rule |", "|---|---:|---:|---:|---:|"]
    for stage, overrides in stages.items():
        events = run_stage(work, stage, overrides)
        train = [e for e in events if "tokens_per_second" in e][1:] or [e for e in events if "tokens_per_second" in e]
        tps = sum(e["tokens_per_second"] for e in train) / len(train)
        # forward + backward = 6 N per token; DPO adds a reference forward (2 N); PPO's rollouts and
        # epochs make tokens/s a per-rollout figure, so its MFU is left out.
        flops = {"sft": 6, "dpo": 8}.get(stage)
        mfu = f"{flops * n_params * tps / peak:.1%}" if peak and flops else "—"
        memory = max((e.get("gpu_memory_gib", 0) for e in events), default=0)
        follows = [e["generations_eval/follows_rule"] for e in events if "generations_eval/follows_rule" in e]
        rows.append(f"| {stage} | {tps:,.0f} | {mfu} | {memory:.2f} | {follows[-1] if follows else '—'} |")
    table = "\n".join(rows)
    print(table)
    if a.out:
        with open(a.out, "a") as f:
            f.write(f"\n{table}\n\nCommand: `.venv/bin/python scripts/bench_gpu.py --steps {a.steps} "
                    f"--hidden {a.hidden} --layers {a.layers}`\n")


if __name__ == "__main__":
    main()
