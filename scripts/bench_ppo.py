"""Benchmark PPO throughput of this project against TRL 1.12's PPOTrainer, on CPU in fp32.

    .venv/bin/python scripts/bench_ppo.py [--model DIR] [--reward-model DIR] [--rollouts 8] [--batch 64] \
        [--trl-python /work/trl-venv/bin/python] [--sides trl,ours] [key=value ...]

(key=value: extra overrides for our launch.py, e.g. loss.reward=DIR.)

Both sides train the same policy (--model, a saved LlamaForCausalLM such as runs/demo-sft/FINAL; else
the tiny config in train/assets/tiny, random init by seed) on the first B*N prompts of the demo task,
rendered with the tokenizer's chat template: N rollouts of B prompts, 16 new tokens sampled at
temperature 1 (stop at EOS, missing-EOS penalty 1), 4 PPO epochs of 2 minibatches (8 optimizer steps a
rollout), lr 1e-4, kl_coef 0.05. Each side runs in a subprocess of its own, so its peak RSS (from
wait4) is its own:

    trl   trl.experimental.ppo.PPOTrainer (its venv: --trl-python) with a separate value model and reward
          model (AutoModelForSequenceClassification, num_labels=1, same config, or --reward-model) and a
          copy of the policy as reference; bf16=False and gradient_checkpointing=False (PPOConfig
          defaults them to True). Only trainer.train() is timed. Generation = time in TRL's
          batch_generation; scoring = the rollout's no-grad forwards (old log-probs come with generation;
          reference, value, reward); update = the rest of train() (PPO epochs, logging, gc).
    ours  launch.py loss=ppo ... (its own reward and critic: see config/loss/ppo.yaml); its
          metrics.jsonl is read, summing timing/generation_s, timing/rollout_s (generation + scoring) and
          timing/update_s over the lines that have them; train time = rollout + update (step time only).

Episodes/s = episodes / train time. Model loading and imports are excluded on both sides; peak RSS is
the whole process's. Timings swing widely (2-15x seen) when anything else runs on the 2 cores: the
last column is the 1-minute load average as each side ends (one run alone on the machine: about 2).
"""
import argparse
import json
import os
import pathlib
import shlex
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "train" / "assets" / "tiny"
EPOCHS, MINIBATCHES, NEW_TOKENS, LR, KL_COEF = 4, 2, 16, 1e-4, 0.05
RESULT = "BENCH_RESULT "  # the TRL worker's last stdout line: this prefix, then JSON


def trl_worker(a) -> None:
    """Train with TRL's PPOTrainer in this process; print the RESULT line."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import copy
    import shutil
    import torch
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer, ppo_trainer
    sys.path.insert(0, str(ROOT))
    from train.demo import records

    torch.manual_seed(a.seed)
    tok = AutoTokenizer.from_pretrained(a.model or TINY, padding_side="left")
    policy = (AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32) if a.model
              else AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY), dtype=torch.float32))
    ref = copy.deepcopy(policy)
    Scalar = AutoModelForSequenceClassification
    value, reward = (Scalar.from_pretrained(a.reward_model, num_labels=1, dtype=torch.float32) if a.reward_model
                     else Scalar.from_config(AutoConfig.from_pretrained(a.model or TINY, num_labels=1),
                                             dtype=torch.float32) for _ in range(2))

    prompts = [r["prompt"] for r in records("train")[:a.batch * a.rollouts]]
    ids = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)["input_ids"]
           for p in prompts]
    out = tempfile.mkdtemp(prefix="bench_ppo_trl_")
    cfg = PPOConfig(
        output_dir=out, seed=a.seed, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        # TRL's rollout is per_device_train_batch_size * gradient_accumulation_steps prompts; its accelerate
        # accumulation counts microbatches, so gradient_accumulation_steps > 1 would merge minibatches
        # into one optimizer step. Minibatch = rollout / num_mini_batches (one microbatch each).
        per_device_train_batch_size=a.batch, gradient_accumulation_steps=1, num_mini_batches=MINIBATCHES,
        num_ppo_epochs=EPOCHS, total_episodes=a.batch * a.rollouts, local_rollout_forward_batch_size=a.batch,
        response_length=NEW_TOKENS, stop_token="eos", missing_eos_penalty=1.0, temperature=1.0,
        kl_coef=KL_COEF, learning_rate=LR, num_sample_generations=0, report_to=[], eval_strategy="no",
        save_strategy="no", logging_steps=1, disable_tqdm=True)
    trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=Dataset.from_dict({"input_ids": ids}))

    clock = {"generation": 0.0, "scoring": 0.0}

    def timed(fn, key, only_no_grad=False):
        def wrapper(*args, **kwargs):
            if only_no_grad and torch.is_grad_enabled():
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                clock[key] += time.perf_counter() - t0
        return wrapper
    # The trainer looks these up in its module's globals at call time. `forward` also runs the update's
    # forward passes, with grad on: only the no-grad calls (the rollout's) count as scoring.
    ppo_trainer.batch_generation = timed(ppo_trainer.batch_generation, "generation")
    ppo_trainer.forward = timed(ppo_trainer.forward, "scoring", only_no_grad=True)
    ppo_trainer.get_reward = timed(ppo_trainer.get_reward, "scoring", only_no_grad=True)
    steps = []  # the torch optimizer's real steps (accelerate's wrapper skips those it accumulates over)
    getattr(trainer.optimizer, "optimizer", trainer.optimizer).register_step_post_hook(lambda *_: steps.append(1))

    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    print(RESULT + json.dumps({"episodes": trainer.state.episode, "train_s": train_s, **clock,
                               "optimizer_steps": len(steps)}), flush=True)


def run_child(cmd: list[str], log: pathlib.Path, env=None) -> tuple[int, float]:
    """Run cmd with stdout+stderr to log; return (exit code, its peak RSS in MiB)."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024  # Linux: KiB


def tail(log: pathlib.Path, n: int = 8) -> str:
    return "\n".join("    " + line for line in log.read_text(errors="replace").splitlines()[-n:])


def run_trl(a, logdir: pathlib.Path) -> dict:
    cmd = [a.trl_python, str(pathlib.Path(__file__).resolve()), "--side", "trl", "--batch", str(a.batch),
           "--rollouts", str(a.rollouts), "--seed", str(a.seed)]
    cmd += ["--model", a.model] if a.model else []
    cmd += ["--reward-model", a.reward_model] if a.reward_model else []
    log = logdir / "trl.log"
    rc, rss = run_child(cmd, log)
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.startswith(RESULT)]
    if rc != 0 or not lines:
        return {"side": "trl", "cmd": cmd, "rss": rss, "error": f"exit {rc}; {log}:\n{tail(log)}"}
    r = json.loads(lines[-1][len(RESULT):])
    return {"side": "trl", "cmd": cmd, "rss": rss, **r, "generation_s": r["generation"], "scoring_s": r["scoring"],
            "update_s": r["train_s"] - r["generation"] - r["scoring"]}


def run_ours(a, logdir: pathlib.Path) -> dict:
    exp = f"bench-ppo-{os.getpid()}"
    cmd = [a.ours_python, "launch.py", "loss=ppo", "model=tiny", f"model.name_or_path={a.model or TINY}",
           f"exp_name={exp}", f"cache_dir={a.cache_dir}", f"n_examples={a.batch * a.rollouts}",
           f"model.batch_size={a.batch}", f"max_new_tokens={NEW_TOKENS}", f"loss.ppo_epochs={EPOCHS}",
           f"loss.ppo_minibatches={MINIBATCHES}", f"lr={LR}", f"seed={a.seed}", "do_first_eval=false",
           "eval_every=1000000", "log_every=1", "wandb.mode=disabled", "loss.temperature=1.0", *a.overrides]
    log = logdir / "ours.log"
    rc, rss = run_child(cmd, log, env={**os.environ, "WANDB_MODE": "disabled"})
    res = {"side": "ours", "cmd": cmd, "rss": rss}
    metrics = pathlib.Path(a.cache_dir) / exp / "metrics.jsonl"
    if rc != 0:
        return {**res, "error": f"exit {rc} (does loss=ppo exist yet?); {log}:\n{tail(log)}"}
    rows = [json.loads(ln) for ln in metrics.read_text().splitlines()] if metrics.exists() else []
    col = lambda key: [r[key] for r in rows if isinstance(r.get(key), (int, float))]  # noqa: E731
    gen, rollout, update, episodes = (col(k) for k in ("timing/generation_s", "timing/rollout_s",
                                                       "timing/update_s", "episodes"))
    if not (gen and update and episodes):
        return {**res, "error": f"{metrics}: no timing/generation_s, timing/update_s or episodes logged"}
    # episodes may be logged per step or as a running total (then strictly increasing): count either way.
    total = episodes[-1] if len(episodes) > 1 and all(x < y for x, y in zip(episodes, episodes[1:])) \
        else sum(episodes)
    scoring = sum(rollout) - sum(gen) if rollout else None  # rollout_s = generation + scoring
    return {**res, "episodes": total, "generation_s": sum(gen), "scoring_s": scoring, "update_s": sum(update),
            "train_s": (sum(rollout) if rollout else sum(gen)) + sum(update), "optimizer_steps": None}


def table(results: list[dict]) -> str:
    rows = ["| side | episodes | train s | episodes/s | generation s | scoring s | update s | optimizer steps "
            "| peak RSS MiB | load at end |", "|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, f="{:.2f}": "—" if v is None else f.format(v)  # noqa: E731
    for r in results:
        if "error" in r:
            rows.append(f"| {r['side']} | failed | | | | | | | {r['rss']:.0f} | {r['load']:.1f} |")
            continue
        rows.append(f"| {r['side']} | {r['episodes']:.0f} | {r['train_s']:.2f} | {r['episodes'] / r['train_s']:.1f} "
                    f"| {r['generation_s']:.2f} | {fmt(r.get('scoring_s'))} | {r['update_s']:.2f} "
                    f"| {fmt(r.get('optimizer_steps'), '{}')} | {r['rss']:.0f} | {r['load']:.1f} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="dir of a saved causal LM (default: tiny config, random init)")
    p.add_argument("--reward-model", help="dir for TRL's reward and value models (default: random, same config)")
    p.add_argument("--rollouts", type=int, default=8, help="N rollouts")
    p.add_argument("--batch", type=int, default=64, help="B prompts per rollout")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trl-python", default="/work/trl-venv/bin/python")
    p.add_argument("--ours-python", default=str(ROOT / ".venv" / "bin" / "python"))
    p.add_argument("--cache-dir", default="/tmp/bench_ppo", help="cache_dir of our run")
    p.add_argument("--sides", default="trl,ours", help="comma-separated: trl, ours")
    p.add_argument("--side", choices=["trl"], help=argparse.SUPPRESS)  # internal: be the TRL worker
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for our launch.py")
    a = p.parse_args()
    if a.side == "trl":
        return trl_worker(a)
    for key in ("model", "reward_model"):
        if getattr(a, key):
            setattr(a, key, str(pathlib.Path(getattr(a, key)).resolve()))
    logdir = pathlib.Path(tempfile.mkdtemp(prefix="bench_ppo_logs_"))
    results = []
    for side in a.sides.split(","):
        print(f"running {side} ... (log: {logdir / side}.log)", flush=True)
        results.append({"trl": run_trl, "ours": run_ours}[side](a, logdir) | {"load": os.getloadavg()[0]})
    print(f"\nPPO on CPU, fp32: B={a.batch} prompts x N={a.rollouts} rollouts, {NEW_TOKENS} new tokens, "
          f"{EPOCHS} epochs x {MINIBATCHES} minibatches, model {a.model or 'tiny (random init)'}\n")
    print(table(results))
    for r in results:
        print(f"\n{r['side']}: {shlex.join(r['cmd'])}")
        if "error" in r:
            print(f"  {r['side']} did not produce numbers: {r['error']}")
        elif r["episodes"] != a.batch * a.rollouts:
            print(f"  warning: {r['side']} counted {r['episodes']} episodes, not B*N = {a.batch * a.rollouts}")


if __name__ == "__main__":
    main()
