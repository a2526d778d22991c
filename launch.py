"""Train a language model: `launch.py loss=<loss> model=<model> key=value ...`.

Works under `python launch.py`, `accelerate launch launch.py` and `torchrun launch.py`, and with
Hydra multirun (`-m lr=1e-4,1e-3`). See README.md for every key.
"""
import logging
import pathlib
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from train import checkpoint
from train.config import ConfigError, check_command_line, validate
from train.data import DataError

log = logging.getLogger("launch")


def run(cfg: DictConfig) -> pathlib.Path:
    """Build everything the loss config names, train (or continue training), evaluate, save; return
    the FINAL dir. A run stopped by SIGTERM/SIGUSR1 returns after saving step-N, without FINAL."""
    run_dir = pathlib.Path(cfg.cache_dir) / cfg.exp_name
    candidates = checkpoint.resume_candidates(run_dir, cfg.resume)
    if candidates and candidates[0].name == "FINAL":
        print(f"nothing to do: {candidates[0]} exists, the run is finished")
        return candidates[0]
    trainer = build(cfg)
    finished = trainer.train()
    trainer.logger.close()
    if trainer.accelerator.is_main_process:
        print(summary(trainer.run_dir, trainer.logger.history) if finished else
              f"stopped at step {trainer.step} of {trainer.total_steps}: run the same command to continue")
    return run_dir / "FINAL"


def build(cfg: DictConfig):
    """The accelerator, tokenizer, data, model(s) and trainer a config names, ready to train."""
    import random

    import transformers

    from train import data
    from train.distributed import make_accelerator
    from train.logs import RunLogger
    from train.models import load_policy, load_tokenizer
    from train.trainers import TRAINERS, count_steps

    accelerator = make_accelerator()
    if not accelerator.is_main_process:  # one voice per run
        logging.getLogger().setLevel(logging.WARNING)
    run_dir = pathlib.Path(cfg.cache_dir) / cfg.exp_name
    snapshot = checkpoint.read_newest(checkpoint.resume_candidates(run_dir, cfg.resume))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        checkpoint.remove_unfinished(run_dir)
    transformers.set_seed(cfg.seed)
    m = cfg.model

    tokenizer = load_tokenizer(m)
    trainer_class = TRAINERS[cfg.loss.trainer]
    shape = cfg.loss.data_shape
    test_datasets = list(cfg.test_datasets) if cfg.test_datasets is not None else None
    train_examples, eval_examples, scorer = data.load_splits(list(cfg.datasets), test_datasets, shape,
                                                             cfg.n_eval_examples, cfg.seed, cfg.skip_invalid)
    if trainer_class.eval_data_shape not in (None, shape):
        try:  # e.g. KTO trains on binary feedback but measures reward accuracy on pairs
            _, eval_examples, _ = data.load_splits(list(cfg.datasets), test_datasets, trainer_class.eval_data_shape,
                                                   cfg.n_eval_examples, cfg.seed, cfg.skip_invalid)
        except DataError:
            log.info("eval data has no %s records: evaluating on %s", trainer_class.eval_data_shape, shape)
    random.Random(cfg.seed).shuffle(eval_examples)  # once: every eval scores the same subset
    train_items, truncated = data.tokenize(train_examples, tokenizer, m.max_length, m.max_prompt_length)
    if shape == "binary":
        data.assign_mismatches(train_items, cfg.seed, m.max_length)
    eval_items, _ = data.tokenize(eval_examples[:cfg.n_eval_examples], tokenizer, m.max_length, m.max_prompt_length)
    prompts = (data.generation_prompts(eval_examples, tokenizer, cfg.n_eval_generations, m.max_prompt_length)
               if scorer else [])
    log.info("data: %d train and %d eval %s examples; truncated %d prompts and %d responses of %d",
             len(train_items), len(eval_items), shape, truncated.prompts, truncated.responses, truncated.total)
    log.info("training on %d process(es), %s", accelerator.num_processes, accelerator.distributed_type)
    batches = data.Batches(train_items, m.batch_size, m.gradient_accumulation_steps, accelerator.num_processes,
                           accelerator.process_index, cfg.seed, cfg.group_by_length)

    policy = load_policy(m, cfg.seed, trainer_class.model_class, tokenizer.pad_token_id)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    accelerator.wait_for_everyone()
    logger = RunLogger(run_dir, OmegaConf.to_container(cfg, resolve=True), count_steps(cfg, batches.per_epoch),
                       enabled=accelerator.is_main_process, resume_step=snapshot and snapshot.state["step"],
                       wandb_id=snapshot and snapshot.state["wandb_run_id"])
    trainer = trainer_class(cfg, accelerator, policy, tokenizer, batches, eval_items, prompts, scorer, run_dir, logger)
    if snapshot:
        trainer.restore(snapshot)
    return trainer


def summary(run_dir: pathlib.Path, history: list[dict]) -> str:
    """Where FINAL is and what changed on held-out data between the first and last eval."""
    evals = [h for h in history if "loss/eval" in h]
    lines = [f"FINAL: {run_dir / 'FINAL'}", "held-out metrics (first eval -> final eval):"]
    for name in sorted(evals[-1]):
        if name.endswith("/eval") or "_eval/" in name:
            first, last = evals[0][name], evals[-1][name]
            lines.append(f"  {name:40s} {first:9.4f} -> {last:9.4f}")
    return "\n".join(lines)


@hydra.main(config_path="config", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        validate(cfg)
        run(cfg)
    except (ConfigError, DataError, checkpoint.CheckpointError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    try:
        check_command_line(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    main()
