"""BasicTrainer: the cadence of a run (train, eval, save, signals, logs) around one optimizer step.

`train()` is the cadence; `train_step()` does one step (for PPO: one rollout and its updates) and
returns its statistics. A subclass says how a microbatch becomes a loss: `microbatch_loss(model,
batch) -> (loss_sum, stats)` and `normalizer(batch)`. The loss is a *sum* over the microbatch's
units (tokens for SFT, examples for preference losses); `optimize` divides by the units of the
whole global batch (all microbatches, all ranks), so any split of a batch into ranks and
accumulation steps gives the same gradient. `stats` maps metric names (with `{split}` for
train/eval) to (sum, count) pairs. `begin_step` sees a step's microbatches before any forward and
returns the ones to train on (KTO computes its reference point there).

A checkpoint is the weights plus the named states of `checkpoint_states()` (file name -> object
with state_dict/load_state_dict): a new state is one entry there, saved and restored with the rest.
"""
import logging
import math
import pathlib
import signal
import time
from collections import defaultdict
from contextlib import nullcontext
from typing import Optional

import torch
from omegaconf import OmegaConf

from train import checkpoint, distributed
from train.data import Batches, collate
from train.distributed import all_reduce_sum, broadcast, full_state_dict, gather
from train.errors import CheckpointError, TrainingError, first_line
from train.generation import generate
from train.models import merged_lora_state_dict, resolve_dtype, token_logps
from train.optim import count_steps, lr_lambda, make_optimizer

log = logging.getLogger(__name__)


def new_stats() -> defaultdict:
    """Metric name -> [sum, count], summed over microbatches and then over ranks."""
    return defaultdict(lambda: [torch.zeros(()), torch.zeros(())])


def add_stats(total: defaultdict, stats: dict) -> None:
    for name, (s, c) in stats.items():
        total[name][0] += torch.as_tensor(s).detach().float().cpu()
        total[name][1] += float(c)


class BasicTrainer:
    model_class = "causal_lm"  # or "sequence_classification"
    eval_data_shape = None  # the data shape eval prefers, if not the loss's own
    reads_examples = False  # whether training items must carry the examples they were made from
    generates = True  # score greedy generations on datasets with a scorer
    eval_metrics = ("loss/eval",)  # what evaluate() reports, besides generation scores

    @classmethod
    def loss_parameters(cls, loss_name: str) -> set[str]:
        """The hyperparameters (loss yaml keys besides name, trainer, data_shape) this trainer's loss takes."""
        return set()

    @classmethod
    def loss_uses_reference(cls, loss_name: str) -> bool:
        """Whether the loss compares the policy with a frozen reference model."""
        return False

    @classmethod
    def check_config(cls, cfg) -> None:
        """Checks of the loss's own settings that need no model (ConfigError); run by config.validate."""

    @classmethod
    def data_shape(cls, cfg) -> str:
        """The record shape this run trains on."""
        return cfg.loss.data_shape

    def __init__(self, cfg, accelerator, policy, tokenizer, train_batches: Batches, eval_items: list,
                 eval_prompts: list, scorer, run_dir: pathlib.Path, logger):
        self.cfg, self.accelerator, self.tokenizer = cfg, accelerator, tokenizer
        self.batches, self.eval_items, self.eval_prompts = train_batches, eval_items, eval_prompts
        self.scorer = scorer if self.generates else None
        self.run_dir, self.logger = run_dir, logger
        self.total_steps = count_steps(cfg, train_batches.per_epoch)
        self.reference = None
        self.setup(policy)
        modules = self.trained_modules(policy)
        fsdp = cfg.distributed == "fsdp"
        if fsdp:  # FSDP2 on torch's own process group; the optimizer over the sharded parameters
            compute = resolve_dtype(cfg.model.dtype) if accelerator.device.type == "cuda" else torch.float32
            for module in [m for m, _ in modules] + [getattr(self.reference, "copy", None)]:
                if module is not None:
                    distributed.shard(module, accelerator.device, compute)
        groups = [{"params": [p for p in module.parameters() if p.requires_grad], **settings}
                  for module, settings in modules]
        if fsdp:
            self.modules, self.optimizer = [m for m, _ in modules], make_optimizer(cfg, groups, sharded=True)
        elif cfg.distributed == "deepspeed":  # one engine, one module (check_config refuses PPO's two)
            self.optimizer = make_optimizer(cfg, groups, sharded=True)
            self.modules = [distributed.deepspeed_engine(cfg, accelerator, modules[0][0], self.optimizer)]
        else:
            *self.modules, self.optimizer = accelerator.prepare(*[m for m, _ in modules], make_optimizer(cfg, groups))
        self.policy = self.modules[0]
        # Whether every forward is collective (parameters gathered from the ranks): then all ranks run
        # as many forwards as each other, in eval and generation too.
        self.sharded = fsdp or distributed.zero_stage(self.policy) == 3
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.total_steps, cfg.warmup, cfg.lr_schedule))
        self.step = self.examples = self.tokens = 0
        self.eval_metrics: dict = {}
        self.eval_step = -1
        self.best: Optional[dict] = None  # {"value", "checkpoint"} under keep_best_metric
        self.nonfinite_steps = 0  # steps skipped for a non-finite loss or gradient (max_nonfinite_steps)
        self.stop_signals: list[int] = []  # SIGTERM / SIGUSR1 / SIGINT received: save and exit at the step's end

    # -- what a subclass provides

    def setup(self, policy) -> None:
        """Build what the trainer needs besides the policy (a reference, a value head), before `prepare`."""

    def trained_modules(self, policy) -> list[tuple[torch.nn.Module, dict]]:
        """The modules the optimizer updates, each with its parameter group's settings: `lr` if not
        the run's, and `max_grad_norm`, the norm its gradients are clipped to."""
        return [(policy, {"max_grad_norm": self.cfg.model.max_grad_norm})]

    def uses_reference(self) -> bool:
        return self.loss_uses_reference(self.cfg.loss.name)

    def microbatch_loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def normalizer(self, batch: dict) -> int:
        """How many units (tokens, examples) the microbatch's loss sum is over."""
        raise NotImplementedError

    def begin_step(self, microbatches: list[dict]) -> list[dict]:
        """This rank's microbatches of a step, before its first forward: the ones to train on."""
        return microbatches

    def checkpoint_states(self) -> dict:
        """What a checkpoint holds besides the weights: file name -> object with state_dict() and
        load_state_dict(). Saved in every checkpoint; each one must be there to resume."""
        return {"optimizer.pt": self.optimizer, "scheduler.pt": self.scheduler}

    # -- the cadence

    def _reduce(self, stats: dict, split: str) -> dict:
        names = sorted(stats)
        totals = all_reduce_sum(self.accelerator, torch.stack([torch.stack(stats[n]) for n in names]).double())
        return {n.format(split=split): s / c for n, (s, c) in zip(names, totals.tolist()) if c > 0}

    def train(self) -> bool:
        """Train to the end and save FINAL (True), or stop early on SIGTERM, SIGUSR1 or Ctrl-C after
        saving a step-N checkpoint (False): `resume=auto` continues from it. A second Ctrl-C stops at once.
        A signal that stopped the run is then passed to the handler it had before the run, if any."""
        def stop(signum, _):
            if signum == signal.SIGINT:
                if self.stop_signals.count(signal.SIGINT):
                    raise KeyboardInterrupt
                log.warning("interrupted: finishing step %d, then saving; press Ctrl-C again to quit without "
                            "saving", self.step + 1)
            self.stop_signals.append(signum)

        handlers = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
        try:
            finished = self._train()
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        # step-N is saved: now whoever handled the signal before this run (submitit's requeue on a
        # cluster) hears of it too
        for sig in dict.fromkeys(self.stop_signals):
            if callable(handlers[sig]) and handlers[sig] is not signal.default_int_handler:
                handlers[sig](sig, None)
        return finished

    def _train(self) -> bool:
        cfg = self.cfg
        if cfg.do_first_eval and self.step == 0:
            self.evaluate()
        window_tokens, window_start = self.tokens, time.time()
        while self.step < self.total_steps:
            stats, scalars = self.train_step()
            self.step += 1
            if self.step == 1 or self.step % cfg.log_every == 0 or self.step == self.total_steps:
                metrics = self._reduce(stats, "train") | scalars
                now = time.time()
                metrics["tokens_per_second"] = (self.tokens - window_tokens) / (now - window_start)
                if cfg.max_nonfinite_steps:
                    metrics["nonfinite_steps"] = self.nonfinite_steps
                if torch.cuda.is_available():
                    metrics["gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
                window_tokens, window_start = self.tokens, now
                self.logger.log(self.counters() | metrics)
            if self.step == self.total_steps:
                break
            if self.step % cfg.eval_every == 0:
                self.evaluate()
            saved = cfg.intermediate_checkpoints and self.step % cfg.save_every == 0
            if saved:
                self.save(f"step-{self.step}")
            # Every rank stops at the same step, whichever of them got the signal.
            if int(all_reduce_sum(self.accelerator, torch.tensor(len(self.stop_signals)))):
                if not saved:
                    self.save(f"step-{self.step}")
                log.warning("stopping at step %d on a signal; step-%d is saved: run the same command again "
                            "(resume=auto) to continue", self.step, self.step)
                return False
        self.evaluate()
        self.save("FINAL")
        return True

    # -- one step

    def train_step(self) -> tuple[dict, dict]:
        """One optimizer step on the next global batch: (stats to reduce over ranks, global scalars)."""
        epoch, index = divmod(self.step, self.batches.per_epoch)
        microbatches = [collate(mb, self.tokenizer.pad_token_id) for mb in self.batches.microbatches(epoch, index)]
        microbatches = self.begin_step(microbatches)
        lr = self.scheduler.get_last_lr()[0]
        stats, grad_norm = self.optimize(microbatches)
        self.scheduler.step()
        self.examples += self.cfg.model.batch_size
        tokens = sum(int(batch["attention_mask"].sum()) for batch in microbatches)
        self.tokens += int(all_reduce_sum(self.accelerator, torch.tensor(tokens)))
        return stats, {"grad_norm": grad_norm, "lr": lr}

    def optimize(self, microbatches: list[dict]) -> tuple[defaultdict, float]:
        """Accumulate the gradient of the mean loss over this step's microbatches (all ranks), clip each
        parameter group to its max_grad_norm, and step: (stats, the first group's gradient norm)."""
        world = self.accelerator.num_processes
        units = all_reduce_sum(self.accelerator, torch.tensor(float(sum(self.normalizer(b) for b in microbatches))))
        stats = new_stats()
        loss_total = torch.zeros((), dtype=torch.float64)
        for i, batch in enumerate(microbatches):
            # gradients are averaged over ranks once, at the last microbatch
            with distributed.no_sync(self.accelerator, self.modules) if i < len(microbatches) - 1 else nullcontext():
                loss_sum, batch_stats = self.microbatch_loss(self.policy, batch)
                distributed.backward(self.accelerator, self.policy, loss_sum * world / units)
            add_stats(stats, batch_stats)
            loss_total += loss_sum.detach().double().cpu()
        if distributed.is_deepspeed(self.policy):
            # the engine reduces, clips to max_grad_norm, and skips the update if a gradient is not finite
            self.policy.step()
            norms = [self.policy.get_global_grad_norm()]
            self._finite(loss_total * world / units, norms)
            return stats, float(norms[0])
        norms = [distributed.clip_grad_norm(self.accelerator, group["params"], group["max_grad_norm"])
                 for group in self.optimizer.param_groups]
        if self._finite(loss_total * world / units, norms):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return stats, float(norms[0])

    def _finite(self, loss: torch.Tensor, grad_norms: list) -> bool:
        """Whether this step's loss (on every rank) and gradient norms are finite. If not, the step is
        skipped while fewer than `max_nonfinite_steps` have been; otherwise the run stops, unsaved."""
        bad = all_reduce_sum(self.accelerator, torch.tensor(float(not torch.isfinite(loss)))).item() > 0
        bad = bad or not all(math.isfinite(float(norm)) for norm in grad_norms)
        if not bad:
            return True
        what = f"loss {float(loss):.4g}, gradient norm {float(grad_norms[0]):.4g}"
        if self.nonfinite_steps >= self.cfg.max_nonfinite_steps:
            raise TrainingError(
                f"non-finite numbers at step {self.step + 1} ({what}): stopped before applying or saving it; "
                f"lower lr, train in bfloat16 or float32, or let up to N such steps be skipped with "
                f"max_nonfinite_steps=N")
        self.nonfinite_steps += 1
        log.warning("step %d skipped: %s (%d of max_nonfinite_steps=%d)", self.step + 1, what,
                    self.nonfinite_steps, self.cfg.max_nonfinite_steps)
        return False

    def token_logps(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probabilities of the labels under `model`, and the mask of label positions."""
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        return token_logps(model, head, batch, self.accelerator.device)

    def sequence_logps(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed response log-probs and response token counts, one per row."""
        logps, mask = self.token_logps(model, batch)
        return logps.sum(-1), mask.sum(-1)

    def counters(self) -> dict:
        return {"step": self.step, "examples": self.examples, "tokens": self.tokens}

    # -- evaluation

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Metrics on the fixed eval subset (the same examples every time), plus generation scores."""
        model = self.accelerator.unwrap_model(self.policy)
        was_training = model.training
        model.eval()
        metrics = self._reduce(self.eval_stats(model), "eval")
        model.train(was_training)
        self.eval_metrics, self.eval_step = metrics, self.step
        self.logger.log(self.counters() | metrics)
        return metrics

    def eval_stats(self, model) -> defaultdict:
        """This rank's share of the eval statistics: the loss's on eval examples, and generation scores."""
        size = max(1, self.cfg.model.eval_batch_size // self.accelerator.num_processes)
        stats = new_stats()
        for chunk, real in distributed.my_chunks(self.eval_items, size, self.accelerator, self.sharded):
            batch_stats = self.microbatch_loss(model, collate(chunk, self.tokenizer.pad_token_id))[1]
            if real:
                add_stats(stats, batch_stats)
        if self.scorer is not None:
            stats |= self.generation_scores(model, self.eval_prompts)
        return stats

    def generation_scores(self, model, prompts: list) -> defaultdict:
        """Greedy generations for this rank's share of the held-out prompts, judged by the dataset's scorer."""
        totals = new_stats()
        for chunk, real in distributed.my_chunks(prompts, self.cfg.model.eval_batch_size, self.accelerator,
                                                 self.sharded):
            out = generate(model, [p.ids for p in chunk], self.tokenizer, self.cfg.max_new_tokens,
                           self.accelerator.device, synced=self.sharded)
            for prompt, row, mask in zip(chunk if real else [], out.responses, out.response_mask):
                text = self.tokenizer.decode(row[mask], skip_special_tokens=True)
                add_stats(totals, {f"generations_{{split}}/{name}": (float(ok), 1)
                                   for name, ok in self.scorer(prompt.text, text).items()})
        return totals

    # -- checkpoints

    def trainer_state(self) -> dict:
        epoch, index = divmod(self.step, self.batches.per_epoch)
        return self.counters() | {"epoch": epoch, "batch_index": index, "batches_per_epoch": self.batches.per_epoch,
                                  "batch_size": self.cfg.model.batch_size, "world_size": self.accelerator.num_processes,
                                  "wandb_run_id": self.logger.wandb_id, "best": self.best,
                                  "eval_metrics": self.eval_metrics, "eval_step": self.eval_step,
                                  "nonfinite_steps": self.nonfinite_steps}

    def save(self, name: str) -> pathlib.Path:
        """Save `name` (step-N or FINAL) under the run dir, then rotate old step-N dirs. Collective."""
        acc, cfg = self.accelerator, self.cfg
        directory = self.run_dir / name
        model = acc.unwrap_model(self.policy)
        in_shards = cfg.checkpoint_format == "sharded" and name != "FINAL"  # FINAL is always whole
        weights = None if in_shards else full_state_dict(self.policy)
        rng = gather(acc, checkpoint.rng_state())
        if cfg.model.use_peft and name == "FINAL":
            weights, model = merged_lora_state_dict(model, weights), model.get_base_model()
        best_before = self.best
        if cfg.keep_best_metric and name != "FINAL" and self.eval_step == self.step:
            value = self.eval_metrics.get(cfg.keep_best_metric)
            sign = 1 if cfg.keep_best_mode == "min" else -1
            if value is not None and (self.best is None or sign * value < sign * self.best["value"]):
                self.best = {"value": value, "checkpoint": name}
        states = self.checkpoint_states()
        if in_shards:
            del states["optimizer.pt"]  # in the shards, with the weights
        files = {name: distributed.gather_state(state, self.modules) for name, state in states.items()} | {
            "rng.pt": rng, checkpoint.TRAINER_STATE: self.trainer_state(),
            "metrics.json": self.eval_metrics | self.counters() | {"wandb_run_id": self.logger.wandb_id},
            "run_config.yaml": OmegaConf.to_yaml(cfg, resolve=True)}
        error = self._save_shards(directory) if in_shards else None
        if acc.is_main_process and not error:
            try:
                checkpoint.save(directory, model, weights, self.tokenizer, files)
                if name != "FINAL":
                    checkpoint.rotate(self.run_dir, cfg.keep_last_n, self.best and self.best["checkpoint"])
            except CheckpointError as e:
                error = str(e)
        error = broadcast(acc, error)
        if error:
            self.best = best_before
            raise CheckpointError(error)
        log.info("saved %s", directory)
        return directory

    def _save_shards(self, directory: pathlib.Path):
        """Every rank writes its shard of the weights and optimizer state into `.unfinished/NAME/shards`;
        the error of any rank, or None."""
        acc = self.accelerator
        if acc.is_main_process:
            checkpoint.unfinished(directory)
        acc.wait_for_everyone()
        try:
            distributed.save_shards(checkpoint.unfinished(directory, fresh=False) / checkpoint.SHARDS, self.policy,
                                    self.modules, self.optimizer)
            error = None
        except Exception as e:  # a full disk on one rank, say: every rank must hear of it
            error = f"could not save {directory}: {type(e).__name__}: {first_line(e)} (earlier checkpoints are untouched)"
        return next((e for e in gather(acc, error) if e), None)

    def restore(self, snapshot: checkpoint.Snapshot) -> None:
        """Continue from a checkpoint: weights, the named states, counters, data position, RNG."""
        acc, state = self.accelerator, snapshot.state
        if (state["batch_size"], state["batches_per_epoch"]) != (self.cfg.model.batch_size, self.batches.per_epoch):
            raise CheckpointError(
                f"{snapshot.directory} was made with model.batch_size={state['batch_size']} and "
                f"{state['batches_per_epoch']} batches per epoch, this run has {self.cfg.model.batch_size} and "
                f"{self.batches.per_epoch}: its place in the data order would not carry over")
        model = acc.unwrap_model(self.policy)
        if snapshot.shards:
            try:
                distributed.load_shards(snapshot.shards, self.policy, self.modules, self.optimizer)
            except Exception as e:  # another model or optimizer: names or shapes that are not in the shards
                raise CheckpointError(f"{snapshot.shards} does not fit this run: {first_line(e)[:300]}") from None
        elif snapshot.adapter != self.cfg.model.use_peft:
            raise CheckpointError(f"{snapshot.directory} holds {'a LoRA adapter' if snapshot.adapter else 'full weights'}"
                                  f" but model.use_peft={self.cfg.model.use_peft}")
        else:
            with distributed.writable_weights(self.policy):
                self._load_weights(model, snapshot)
        for name, target in self.checkpoint_states().items():
            if snapshot.shards and name == "optimizer.pt":
                continue
            if name not in snapshot.files:
                raise CheckpointError(f"{snapshot.directory} has no {name}: it can't be continued by this run "
                                      f"({type(self).__name__} saves it in every checkpoint)")
            try:
                distributed.load_state(target, snapshot.files[name], self.modules)
            except (RuntimeError, ValueError, KeyError) as e:
                raise CheckpointError(f"{snapshot.directory / name} does not fit this run: {first_line(e)}") from None
        self.step, self.examples, self.tokens = state["step"], state["examples"], state["tokens"]
        self.best, self.eval_metrics, self.eval_step = state["best"], state["eval_metrics"], state["eval_step"]
        self.nonfinite_steps = state.get("nonfinite_steps", 0)
        rng = snapshot.files["rng.pt"]
        if len(rng) == acc.num_processes:
            checkpoint.set_rng_state(rng[acc.process_index])
        else:
            log.warning("%s was saved by %d processes, this run has %d: RNG states not restored, so the "
                        "continuation is not bit-for-bit", snapshot.directory, len(rng), acc.num_processes)
        log.info("resumed from %s at step %d (epoch %d, batch %d)", snapshot.directory, self.step,
                 state["epoch"], state["batch_index"])

    @staticmethod
    def _load_weights(model, snapshot: checkpoint.Snapshot) -> None:
        if snapshot.adapter:
            from peft import set_peft_model_state_dict
            try:
                unexpected = set_peft_model_state_dict(model, snapshot.weights).unexpected_keys
            except RuntimeError as e:  # shapes differ: another base model or LoRA rank
                unexpected = [first_line(e, "size mismatch")]
            if unexpected:
                raise CheckpointError(f"{snapshot.directory}: adapter weights do not fit: {unexpected[:3]}")
        else:
            checkpoint.load_weights(model, snapshot.weights)
