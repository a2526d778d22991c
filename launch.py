"""Train a language model: `launch.py loss=<loss> model=<model> key=value ...`.

Works under `python launch.py`, `accelerate launch launch.py` and `torchrun launch.py`, and with
Hydra multirun (`-m lr=1e-4,1e-3`). See README.md for every key.

Order matters: every check that needs no model runs before Hydra (and again in `main`); then the run
dir is locked; then the checkpoint to continue from is chosen and checked against this config; only
then are the tokenizer, data and model loaded.
"""
import logging
import os
import pathlib
import signal
import sys
import time
from typing import Optional

import hydra
from omegaconf import DictConfig, OmegaConf

from train import checkpoint, rundir, sweep
from train.config import changed_keys, check_command_line, validate
from train.errors import CheckpointError, ConfigError, RunError

log = logging.getLogger("launch")

# A checkpoint made with other values of these cannot be continued by this config.
MUST_MATCH = ("loss.name", "loss.trainer", "loss.data_shape", "model.use_peft", "model.batch_size", "datasets")
# Values that change nothing about what is trained.
IRRELEVANT = ("resume", "cache_dir", "wandb.mode", "wandb.project", "wandb.entity")
# config.json entries that fix the shapes of the weights.
ARCHITECTURE = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "intermediate_size", "n_embd", "n_layer", "n_head", "n_inner",
                "n_positions")


def run(cfg: DictConfig) -> pathlib.Path:
    """Check the config, build everything the loss config names, train (or continue training), evaluate,
    save; return the FINAL dir. A run stopped by a signal returns after saving step-N, without FINAL."""
    from train.distributed import make_accelerator
    validate(cfg)
    accelerator = make_accelerator(cfg)
    run_dir = pathlib.Path(cfg.cache_dir) / cfg.exp_name
    with rundir.held(run_dir, accelerator):
        candidates = checkpoint.resume_candidates(run_dir, cfg.resume)
        if cfg.resume == "auto" and candidates and candidates[0].name == "FINAL":
            check_finished(cfg, candidates[0])
            print(f"nothing to do: {candidates[0]} exists, the run is finished")
            return candidates[0]
        snapshot = read_resume_point(cfg, candidates)
        trainer = build(cfg, accelerator, snapshot)
        try:
            finished = trainer.train()
        finally:  # wandb's run ends with the run, however it ends (a sweep's next job starts its own)
            trainer.logger.close()
    if accelerator.is_main_process:
        print(summary(trainer.run_dir, trainer.logger.history) if finished else
              f"stopped at step {trainer.step} of {trainer.total_steps}: run the same command to continue")
    return run_dir / "FINAL"


def _differences(saved: DictConfig, cfg: DictConfig, keys) -> str:
    return ", ".join(f"{k}: {OmegaConf.select(saved, k)!r} -> {OmegaConf.select(cfg, k)!r}" for k in sorted(keys))


def check_finished(cfg: DictConfig, final: pathlib.Path) -> None:
    """A finished run is left alone; if this config is not the one it finished with, say so."""
    saved = OmegaConf.load(final / "run_config.yaml")
    changed = {k for k in changed_keys(saved, cfg) if not k.startswith(IRRELEVANT)}
    if changed:
        raise CheckpointError(f"{final} exists: this run is finished, and with another config "
                              f"({_differences(saved, cfg, changed)}); to train with this config, choose another "
                              f"exp_name")


def read_resume_point(cfg: DictConfig, candidates: list[pathlib.Path]) -> Optional[checkpoint.Snapshot]:
    """The checkpoint to continue from, read in full, or None to start fresh. A `resume=<path>` that
    can't be read, or a checkpoint made for another loss, data or model, stops the run."""
    if cfg.resume not in ("auto", "never"):
        try:
            snapshot = checkpoint.read(candidates[0])  # resume_candidates gives just that path
        except CheckpointError as e:
            raise CheckpointError(f"resume: {e}") from None
    else:
        snapshot = checkpoint.read_newest(candidates)
    if snapshot is None:
        return None
    saved = OmegaConf.create(snapshot.config)
    changed = changed_keys(saved, cfg)
    refused = sorted(k for k in changed if k.startswith(MUST_MATCH))
    hint = ("choose another exp_name to start a new run" if cfg.resume == "auto" else
            f"to start from its weights instead, set model.name_or_path={snapshot.directory}")
    if refused:
        raise CheckpointError(f"{snapshot.directory} cannot be continued by this run: it was made with "
                              f"{_differences(saved, cfg, refused)}; {hint}")
    architecture = _architecture_difference(snapshot.directory, cfg)
    if architecture:
        raise CheckpointError(f"{snapshot.directory} holds another model: {architecture}; {hint}")
    changed = {k for k in changed if not k.startswith(IRRELEVANT) and k != "exp_name"}
    if changed:
        log.warning("config differs from the one %s was saved with, in: %s (optimizer and scheduler state, learning "
                    "rates included, come from the checkpoint)", snapshot.directory, _differences(saved, cfg, changed))
    return snapshot


def _architecture_difference(directory: pathlib.Path, cfg: DictConfig) -> str:
    """How the checkpoint's config.json differs from the configured model's in weight shapes ('' if not)."""
    import json
    if not (directory / "config.json").is_file():  # a LoRA adapter: its shapes are checked as it loads
        return ""
    from transformers import AutoConfig
    saved = json.loads((directory / "config.json").read_text())
    ours = AutoConfig.from_pretrained(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code).to_dict()
    return ", ".join(f"{k} {saved.get(k)} in the checkpoint, {ours.get(k)} in {cfg.model.name_or_path}"
                     for k in ARCHITECTURE if saved.get(k) != ours.get(k))


def build(cfg: DictConfig, accelerator=None, snapshot: Optional[checkpoint.Snapshot] = None):
    """The tokenizer, data, model(s) and trainer a config names, ready to train (from `snapshot`)."""

    import transformers

    from train import data, tokens
    from train.distributed import make_accelerator
    from train.logs import RunLogger
    from train.models import load_policy, load_tokenizer
    from train.optim import count_steps
    from train.trainers import TRAINERS

    accelerator = accelerator or make_accelerator(cfg)
    if not accelerator.is_main_process:  # one voice per run
        logging.getLogger().setLevel(logging.WARNING)
    run_dir = pathlib.Path(cfg.cache_dir) / cfg.exp_name
    if accelerator.is_main_process:
        checkpoint.remove_unfinished(run_dir)
    transformers.set_seed(cfg.seed)
    m = cfg.model

    tokenizer = load_tokenizer(m)
    trainer_class = TRAINERS[cfg.loss.trainer]
    shape = trainer_class.data_shape(cfg)
    prepared = tokens.prepare(cfg, tokenizer, shape, trainer_class.eval_data_shape, accelerator,
                              trainer_class.reads_examples)
    truncated = prepared.truncated
    log.info("data: %d train and %d eval %s examples; truncated %d prompts and %d responses of %d",
             len(prepared.train), len(prepared.eval), shape, truncated.prompts, truncated.responses, truncated.total)
    log.info("training on %d process(es), %s", accelerator.num_processes, accelerator.distributed_type)
    batches = data.Batches(prepared.train, m.batch_size, m.gradient_accumulation_steps, accelerator.num_processes,
                           accelerator.process_index, cfg.seed, cfg.group_by_length)
    total_steps = count_steps(cfg, batches.per_epoch)
    if snapshot and snapshot.state["step"] >= total_steps:
        raise CheckpointError(f"{snapshot.directory} is at step {snapshot.state['step']} and this run has "
                              f"{total_steps} steps: nothing to train; to start from its weights, set "
                              f"model.name_or_path={snapshot.directory}")

    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    accelerator.wait_for_everyone()
    logger = RunLogger(run_dir, OmegaConf.to_container(cfg, resolve=True), total_steps,
                       enabled=accelerator.is_main_process, resume_step=snapshot and snapshot.state["step"],
                       wandb_id=snapshot and snapshot.state["wandb_run_id"])
    policy = load_policy(m, cfg.seed, trainer_class.model_class, tokenizer.pad_token_id,
                         float32_master=cfg.distributed in ("fsdp", "deepspeed"))
    trainer = trainer_class(cfg, accelerator, policy, tokenizer, batches, prepared.eval, prepared.prompts,
                            prepared.scorer, run_dir, logger)
    if snapshot:
        trainer.restore(snapshot)
    return trainer


def summary(run_dir: pathlib.Path, history: list[dict]) -> str:
    """Where FINAL is and what changed on held-out data between the first and last eval."""
    evals = [h for h in history if any(name.endswith("/eval") or "_eval/" in name for name in h)]
    lines = [f"FINAL: {run_dir / 'FINAL'}", "held-out metrics (first eval -> final eval):"]
    for name in sorted(evals[-1]):
        if name.endswith("/eval") or "_eval/" in name:
            first, last = evals[0][name], evals[-1][name]
            lines.append(f"  {name:40s} {first:9.4f} -> {last:9.4f}")
    return "\n".join(lines)


@hydra.main(config_path="config", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> Optional[float]:
    """One run, or one job of a sweep (its failure recorded, and the sweep goes on). Returns the
    `objective` metric, for a sweeper."""
    try:
        if sweep.in_multirun():
            return sweep.run_job(cfg, run)
        run(cfg)
        return sweep.objective(cfg)
    except RunError as e:
        sys.exit("error: " + " ".join(line.strip() for line in str(e).splitlines()))  # one line, always
    except KeyboardInterrupt:  # Ctrl-C before training started, or a second one during it
        print("interrupted: nothing saved", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)


if __name__ == "__main__":
    argv = sys.argv[1:]
    try:
        check_command_line(argv)
        if sweep.is_multirun(argv):
            sys.argv[1:] = argv = sweep.prepare(argv)
            # jobs a launcher starts as processes of their own (submitit) import train/ from here too
            os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pathlib.Path(__file__).resolve().parent),
                                                                     os.environ.get("PYTHONPATH")]))
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    except KeyboardInterrupt:
        sys.exit(128 + signal.SIGINT)
    started = time.time()
    main()
    from train.distributed import shut_down
    shut_down()
    if sweep.is_multirun(argv):
        sys.exit(sweep.report(argv, started))
