"""Data preparation, cold and cached: this project's (read JSONL, check, shape, render the chat
template, tokenize, cache) against TRL 1.16's SFTTrainer and DPOTrainer dataset preparation, on the
same synthetic data and tokenizer.

    .venv/bin/python scripts/bench_data.py [--n 200000] [--out docs/benchmarks.md]
    .venv/bin/python scripts/bench_data.py --n 1000000 --train   # launch.py: 4 SFT steps on 10k, then on all n


The data is scripts/bench_dpo.py's synthetic pairs (prompt 16..64 words, responses up to 512 tokens
in all) and its word-level tokenizer and ~10M Llama (TRL's trainers need a model to construct).
SFT uses the chosen response; ours reads our JSONL, TRL reads the same records in its conversational
prompt/completion and preference formats through `datasets`, so both apply the chat template. Each
measurement is a subprocess of its own, run twice with the same caches: cold (nothing cached) and
cached (ours: the tokens file; TRL: the datasets library's map cache). Memory is its peak RSS, which
counts the pages of files it maps (our tokens file, TRL's Arrow files), and its peak anonymous memory
(Python objects and arrays: what grows when a dataset is held in memory).
Both are timed from a loaded tokenizer to tokenized examples: ours through launch.build's data path
(read, check, shape, tokenize or read the cache), TRL's as the trainer's construction (loading the
JSON with `datasets`, then its preparation), the model loaded beforehand.
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

RUNS = ("ours-sft", "trl-sft", "ours-dpo", "trl-dpo")
SMALL = 10_000  # --train's small run


def ours_data(work: pathlib.Path) -> list[str]:
    """Overrides for this project's runs on the benchmark data (test_datasets: no held-out slice)."""
    return [f"model.name_or_path={work / 'model'}", f"datasets=[{work / 'ours.jsonl'}]",
            f"test_datasets=[{work / 'eval.jsonl'}]", f"cache_dir={work / 'cache'}", "model.max_length=512",
            "model.max_prompt_length=256", "wandb.mode=disabled"]


def measured(command: list[str], env: dict) -> dict:
    """Run `command`; its wall time, stdout and stderr, peak RSS (VmHWM, which counts pages of files it
    maps, such as the tokens file) and peak anonymous memory (RssAnon: Python objects, arrays), read from
    /proc every 50 ms."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks = {"VmHWM": 0, "RssAnon": 0}

    def poll():
        while process.poll() is None:
            try:
                for line in pathlib.Path(f"/proc/{process.pid}/status").read_text().splitlines():
                    name, _, value = line.partition(":")
                    if name in peaks:
                        peaks[name] = max(peaks[name], int(value.split()[0]) // 1024)
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
    import threading
    watcher = threading.Thread(target=poll)
    watcher.start()
    stdout, stderr = process.communicate()
    watcher.join()
    return {"returncode": process.returncode, "stdout": stdout, "stderr": stderr,
            "seconds": time.perf_counter() - start, "peak_rss_mib": peaks["VmHWM"], "peak_anon_mib": peaks["RssAnon"]}


def train_runs(work: pathlib.Path, n: int, env: dict) -> list[str]:
    """`launch.py loss=sft` for 4 steps on the first SMALL examples, then on all n, cold (tokenizing) and
    cached, each a process of its own: the same steps, so memory that grows with n is the data's."""
    rows = []
    for size, data in ((SMALL, work / "small.jsonl"), (n, work / "ours.jsonl")):
        for attempt in ("cold", "cached"):
            run = measured([sys.executable, "launch.py", "loss=sft", *ours_data(work), f"datasets=[{data}]",
                            f"exp_name=sft-{size}-{attempt}", "n_examples=64", "model.batch_size=16",
                            "model.eval_batch_size=16", "n_eval_examples=16", "n_eval_generations=0",
                            "do_first_eval=false", "intermediate_checkpoints=false"], env)
            if run["returncode"]:
                sys.exit(f"training {attempt} failed:\n{run['stderr'][-3000:]}")
            rows.append(f"| sft, {size} examples, 4 steps | {attempt} | {run['seconds']:.1f} | {run['peak_rss_mib']} | "
                        f"{run['peak_anon_mib']} |")
            print(rows[-1], flush=True)
    return rows


def worker(work: pathlib.Path, run: str) -> dict:
    loss = run.split("-")[1]
    if run.startswith("ours"):
        from types import SimpleNamespace

        from train import tokens
        from train.models import load_tokenizer
        from bench_dpo import _compose
        cfg = _compose([f"loss={loss}", *ours_data(work)])
        tokenizer = load_tokenizer(cfg.model)
        start = time.perf_counter()
        prepared = tokens.prepare(cfg, tokenizer, cfg.loss.data_shape, None,
                                  SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None,
                                                  num_processes=1))
        n = len(prepared.train)
    else:
        import datasets
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
        datasets.disable_progress_bars()
        tokenizer = AutoTokenizer.from_pretrained(work / "model")
        model = AutoModelForCausalLM.from_pretrained(work / "model")
        start = time.perf_counter()
        dataset = datasets.load_dataset("json", data_files=str(work / f"trl-{loss}.jsonl"), split="train")
        common = dict(output_dir=str(work / "trl-out"), report_to=[], max_length=512, dataset_num_proc=None, bf16=False,
                      use_cpu=True)
        if loss == "sft":
            trainer = SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=dataset,
                                 processing_class=tokenizer)
        else:
            trainer = DPOTrainer(model=model, args=DPOConfig(**common), train_dataset=dataset,
                                 processing_class=tokenizer)
        n = len(trainer.train_dataset)
    seconds = time.perf_counter() - start
    return {"run": run, "examples": n, "seconds": seconds}


def make_data(work: pathlib.Path, n: int, trl: bool) -> None:
    """The model, and n pairs in our JSONL (plus 1000 for eval) and, with `trl`, in TRL's two formats."""
    from bench_dpo import build_model, make_pairs
    build_model(work / "model", seed=0)
    pairs = make_pairs(n, seed=0)
    message = lambda role, text: [{"role": role, "content": text}]  # noqa: E731
    files = {"ours.jsonl": lambda r: {k: r[k] for k in ("prompt", "chosen", "rejected")},
             "trl-sft.jsonl": lambda r: {"prompt": message("user", r["prompt"]),
                                         "completion": message("assistant", r["chosen"])},
             "trl-dpo.jsonl": lambda r: {"prompt": message("user", r["prompt"]), "chosen": message("assistant", r["chosen"]),
                                         "rejected": message("assistant", r["rejected"])}}
    for name, record in files.items() if trl else [("ours.jsonl", files["ours.jsonl"])]:
        with open(work / name, "w") as f:
            f.writelines(json.dumps(record(r)) + "\n" for r in pairs)
    with open(work / "eval.jsonl", "w") as f:  # ours evaluates on these (their preparation is timed too)
        f.writelines(json.dumps(files["ours.jsonl"](r)) + "\n" for r in pairs[:1000])
    with open(work / "small.jsonl", "w") as f:
        f.writelines(json.dumps(files["ours.jsonl"](r)) + "\n" for r in pairs[:SMALL])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--out", help="append the table to this markdown file")
    p.add_argument("--runs", nargs="+", choices=RUNS, default=RUNS)
    p.add_argument("--train", action="store_true", help="instead: train SFT for 4 steps on all n examples")
    p.add_argument("--worker", nargs=2, metavar=("WORK", "RUN"), help=argparse.SUPPRESS)
    p.add_argument("--make-data", type=pathlib.Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print("RESULT " + json.dumps(worker(pathlib.Path(a.worker[0]), a.worker[1])))
        return
    if a.make_data:
        make_data(a.make_data, a.n, trl=not a.train)
        return
    from bench_dpo import print_table
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench_data_"))
    # Made in a process of its own, so this one stays small (what it holds is not the workers' to report).
    subprocess.run([sys.executable, __file__, "--make-data", str(work), "--n", str(a.n), *["--train"] * a.train],
                   check=True)
    env = {**os.environ, "HF_DATASETS_CACHE": str(work / "hf-datasets"), "WANDB_MODE": "disabled",
           "TOKENIZERS_PARALLELISM": "true"}
    if a.train:
        rows = ["| run | tokens cache | s | peak RSS MiB | peak anonymous MiB |", "|---|---|---:|---:|---:|",
                *train_runs(work, a.n, env)]
        print_table(rows, a.out, f".venv/bin/python scripts/bench_data.py --n {a.n} --train")
        return
    rows = ["| run | examples | cold s | cold examples/s | cold peak RSS / anonymous MiB | cached s | "
            "cached peak RSS / anonymous MiB |", "|---|---:|---:|---:|---:|---:|---:|"]
    for run in a.runs:
        results = []
        for _ in ("cold", "cached"):
            out = measured([sys.executable, __file__, "--worker", str(work), run], env)
            line = next((x for x in out["stdout"].splitlines() if x.startswith("RESULT ")), None)
            if out["returncode"] or line is None:
                sys.exit(f"{run} failed:\n{out['stderr'][-3000:]}")
            results.append(json.loads(line[7:]) | {k: out[k] for k in ("peak_rss_mib", "peak_anon_mib")})
        cold, cached = results
        rows.append(f"| {run} | {cold['examples']} | {cold['seconds']:.1f} | {cold['examples'] / cold['seconds']:.0f} | "
                    f"{cold['peak_rss_mib']} / {cold['peak_anon_mib']} | {cached['seconds']:.1f} | "
                    f"{cached['peak_rss_mib']} / {cached['peak_anon_mib']} |")
        print(rows[-1], flush=True)
    print_table(rows, a.out, f".venv/bin/python scripts/bench_data.py --n {a.n} --runs {' '.join(a.runs)}")


if __name__ == "__main__":
    main()
