"""DDP against FSDP2 (`distributed=fsdp`) and DeepSpeed ZeRO-3 (`distributed=deepspeed`) on 2 CPU ranks:
parameter + optimizer memory per rank, peak RSS,
step time, and the time to save and to read back and restore a checkpoint, whole or sharded.

    .venv/bin/python scripts/bench_fsdp.py [--steps 6] [--out docs/benchmarks.md]

The model and data are scripts/bench_dpo.py's: a ~10M-parameter Llama (hidden 256, 6 layers, vocab
8192), random init, fp32, and synthetic preference pairs of 128..512 tokens; DPO at global batch 8,
AdamW. Each mode runs `torchrun --nproc_per_node 2` on this script's worker, which builds the trainer
as launch.py does, times the steps after the first, saves step-N, then reads it back and restores it.
"""
import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]


RUNS = {"ddp": ["distributed=ddp"], "fsdp": ["distributed=fsdp"],
        "fsdp, sharded checkpoint": ["distributed=fsdp", "checkpoint_format=sharded"],
        "deepspeed ZeRO-3": ["distributed=deepspeed"]}


def worker(work: pathlib.Path, mode: str, steps: int) -> None:
    import torch
    from torch.distributed.tensor import DTensor

    from bench_dpo import _compose
    from launch import build
    from train import checkpoint

    cfg = _compose([f"cache_dir={work}", f"exp_name=run-{list(RUNS).index(mode)}", "loss=dpo", f"model.name_or_path={work / 'model'}",
                    f"datasets=[{work / 'train.jsonl'}]", f"test_datasets=[{work / 'train.jsonl'}]",
                    "model.batch_size=8", "model.max_length=512", "model.max_prompt_length=256", "lr=5e-6",
                    f"n_examples={8 * steps}", "wandb.mode=disabled", *RUNS[mode]])
    trainer = build(cfg)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.train_step()
        trainer.step += 1
        times.append(time.perf_counter() - start)

    def local_bytes(t):
        t = t.to_local() if isinstance(t, DTensor) else getattr(t, "ds_tensor", t)  # ZeRO-3: this rank's partition
        return t.numel() * t.element_size()
    params = sum(local_bytes(p) for p in trainer.policy.parameters())
    if mode.startswith("deepspeed"):  # and its fp32 master partitions, beside the training copy
        params += sum(local_bytes(p) for p in trainer.policy.optimizer.fp32_partitioned_groups_flat)
    optim = sum(local_bytes(v) for state in trainer.optimizer.state.values() for v in state.values()
                if torch.is_tensor(v))
    start = time.perf_counter()
    saved = trainer.save(f"step-{trainer.step}")
    save_s = time.perf_counter() - start
    start = time.perf_counter()
    trainer.restore(checkpoint.read(saved))
    load_s = time.perf_counter() - start
    result = {"mode": mode, "rank": trainer.accelerator.process_index, "step_s": sum(times[1:]) / (steps - 1),
              "params_mib": params / 2 ** 20, "optimizer_mib": optim / 2 ** 20, "save_s": save_s, "load_s": load_s,
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    (work / f"result-{list(RUNS).index(mode)}-{result['rank']}.json").write_text(json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", help="append the table to this markdown file")
    p.add_argument("--worker", nargs=2, metavar=("WORK", "MODE"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(pathlib.Path(a.worker[0]), a.worker[1], a.steps)
    from bench_dpo import build_model, make_pairs, print_table, write_jsonl
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench_fsdp_"))
    build_model(work / "model", seed=0)
    write_jsonl(work / "train.jsonl", make_pairs(64, seed=0))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "WANDB_MODE": "disabled"}
    rows = ["| mode | step s | params MiB/rank | optimizer MiB/rank | peak RSS MiB/rank | save s | read+restore s |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for index, mode in enumerate(RUNS):
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", __file__,
                              "--steps", str(a.steps), "--worker", str(work), mode],
                             capture_output=True, text=True, env=env, cwd=ROOT)
        results = [json.loads(path.read_text()) for path in work.glob(f"result-{index}-*.json")]
        if out.returncode or len(results) != 2:
            sys.exit(f"{mode} failed:\n{out.stderr[-3000:]}")
        r = max(results, key=lambda r: r["peak_rss_mib"])
        rows.append(f"| {mode} | {r['step_s']:.2f} | {r['params_mib']:.1f} | {r['optimizer_mib']:.1f} | "
                    f"{r['peak_rss_mib']:.0f} | {r['save_s']:.2f} | {r['load_s']:.2f} |")
    print_table(rows, a.out, f".venv/bin/python scripts/bench_fsdp.py --steps {a.steps}")


if __name__ == "__main__":
    main()
