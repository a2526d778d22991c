"""Trainers: BasicTrainer owns the loop; a subclass says how a microbatch becomes a loss.

A subclass implements `microbatch_loss(model, batch) -> (loss_sum, stats)` and `normalizer(batch)`.
The loss is a *sum* over the microbatch's units (tokens for SFT, examples for preference losses);
the trainer divides by the number of units in the whole global batch (all microbatches, all
ranks), so any split of a batch into ranks and accumulation steps gives the same gradient.
`stats` maps metric names (with `{split}` for train/eval) to (sum, count) pairs.

Preference trainers compare the policy with a frozen reference: a copy of the initial policy, the
adapter-disabled base under LoRA (no second copy), or log-probs cached once before training.
"""
import copy
import inspect
import logging
import math
import pathlib
import signal
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from typing import Optional

import torch
from omegaconf import OmegaConf

from train import checkpoint, losses, reference
from train.data import Batches, collate
from train.distributed import all_reduce_sum, broadcast, full_state_dict, gather
from train.errors import CheckpointError, TrainingError, first_line
from train.models import merged_lora_state_dict

log = logging.getLogger(__name__)


def lr_lambda(total_steps: int, warmup: float, schedule: str):
    """Linear warmup over the first `warmup` fraction of steps, then the schedule down towards 0."""
    warmup_steps = round(warmup * total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "linear":
            return 1.0 - progress
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor


def count_steps(cfg, batches_per_epoch: int) -> int:
    """Optimizer steps in the run: n_examples worth of batches if set, else n_epochs epochs."""
    if cfg.n_examples is not None:
        return cfg.n_examples // cfg.model.batch_size
    return cfg.n_epochs * batches_per_epoch


def make_optimizer(cfg, params) -> torch.optim.Optimizer:
    """`cfg.optimizer` (a torch.optim class that config.OPTIMIZERS allows) over `params`."""
    optimizer_class = getattr(torch.optim, cfg.optimizer)
    accepted = inspect.signature(optimizer_class).parameters
    options = {"weight_decay": cfg.weight_decay} if "weight_decay" in accepted else {}
    # The fused kernel (Adam, AdamW, SGD, Adagrad) is several times faster, on CPU too.
    if "fused" in accepted:
        options["fused"] = True
    return optimizer_class(params, lr=cfg.lr, **options)


def disable_dropout(model) -> None:
    """Dropout off, so that policy and reference agree exactly at the start (first DPO loss = ln 2)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def token_logps(model, head, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of a batch's labels under `model` (see losses.token_logps).

    Only the hidden states that predict a label go through the vocabulary projection `head`: a hook
    picks them out inside the model's own forward, so DDP, PEFT and logit soft-capping after the head
    all still apply, and prompt and padding positions never become logits.
    """
    labels = batch["labels"].to(device)
    predicts = torch.zeros(labels.shape, dtype=torch.bool, device=device)
    predicts[:, :-1] = labels[:, 1:] != -100
    hook = head.register_forward_pre_hook(lambda _, args: (args[0][predicts],) + args[1:])
    try:
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                       use_cache=False).logits
    finally:
        hook.remove()
    return losses.token_logps(logits, labels)


class BasicTrainer:
    model_class = "causal_lm"  # or "sequence_classification"
    eval_data_shape = None  # the data shape eval prefers, if not the loss's own
    generates = True  # score greedy generations on datasets with a scorer
    eval_metrics = ("loss/eval",)  # what evaluate() reports, besides generation scores

    @classmethod
    def loss_parameters(cls, loss_name: str) -> set[str]:
        """The hyperparameters (loss yaml keys besides name, trainer, data_shape) this trainer's loss takes."""
        return set()

    def __init__(self, cfg, accelerator, policy, tokenizer, train_batches: Batches, eval_items: list,
                 eval_prompts: list, scorer, run_dir: pathlib.Path, logger):
        self.cfg, self.accelerator, self.tokenizer = cfg, accelerator, tokenizer
        self.batches, self.eval_items, self.eval_prompts = train_batches, eval_items, eval_prompts
        self.scorer = scorer if self.generates else None
        self.run_dir, self.logger = run_dir, logger
        self.total_steps = count_steps(cfg, train_batches.per_epoch)
        self.reference = None
        if self.uses_reference():
            disable_dropout(policy)
            self._setup_reference(policy)
        optimizer = make_optimizer(cfg, [p for p in policy.parameters() if p.requires_grad])
        self.policy, self.optimizer = accelerator.prepare(policy, optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.total_steps, cfg.warmup, cfg.lr_schedule))
        self.step = self.examples = self.tokens = 0
        self.eval_metrics: dict = {}
        self.eval_step = -1
        self.best: Optional[dict] = None  # {"value", "checkpoint"} under keep_best_metric
        self.nonfinite_steps = 0  # steps skipped for a non-finite loss or gradient (max_nonfinite_steps)
        self.stop_signals: list[int] = []  # SIGTERM / SIGUSR1 / SIGINT received: save and exit at the step's end

    # -- what a subclass provides

    @classmethod
    def loss_uses_reference(cls, loss_name: str) -> bool:
        """Whether the loss compares the policy with a frozen reference model."""
        return False

    def uses_reference(self) -> bool:
        return self.loss_uses_reference(self.cfg.loss.name)

    def microbatch_loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def normalizer(self, batch: dict) -> int:
        """How many units (tokens, examples) the microbatch's loss sum is over."""
        raise NotImplementedError

    # -- the loop

    def _reduce(self, stats: dict, split: str) -> dict:
        names = sorted(stats)
        totals = all_reduce_sum(self.accelerator, torch.stack([torch.stack(stats[n]) for n in names]).double())
        return {n.format(split=split): s / c for n, (s, c) in zip(names, totals.tolist()) if c > 0}

    def train(self) -> bool:
        """Train to the end and save FINAL (True), or stop early on SIGTERM, SIGUSR1 or Ctrl-C after
        saving a step-N checkpoint (False): `resume=auto` continues from it. A second Ctrl-C stops at once."""
        def stop(signum, _):
            if signum == signal.SIGINT:
                if self.stop_signals.count(signal.SIGINT):
                    raise KeyboardInterrupt
                log.warning("interrupted: finishing step %d, then saving; press Ctrl-C again to quit without "
                            "saving", self.step + 1)
            self.stop_signals.append(signum)

        handlers = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
        try:
            return self._train()
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    def _train(self) -> bool:
        cfg = self.cfg
        if cfg.do_first_eval and self.step == 0:
            self.evaluate()
        window_tokens, window_start = 0, time.time()
        world = self.accelerator.num_processes
        while self.step < self.total_steps:
            epoch, index = divmod(self.step, self.batches.per_epoch)
            microbatches = [collate(mb, self.tokenizer.pad_token_id) for mb in self.batches.microbatches(epoch, index)]
            self.begin_step(microbatches)
            units = all_reduce_sum(self.accelerator, torch.tensor(float(sum(self.normalizer(b) for b in microbatches))))
            stats = defaultdict(lambda: [torch.zeros(()), torch.zeros(())])
            tokens, loss_total = 0, torch.zeros((), dtype=torch.float64)
            for i, batch in enumerate(microbatches):
                last = i == len(microbatches) - 1
                with nullcontext() if last else self.accelerator.no_sync(self.policy):
                    loss_sum, batch_stats = self.microbatch_loss(self.policy, batch)
                    self.accelerator.backward(loss_sum * world / units)
                for name, (s, c) in batch_stats.items():
                    stats[name][0] += s.detach().float().cpu()
                    stats[name][1] += float(c)
                loss_total += loss_sum.detach().double().cpu()
                tokens += int(batch["attention_mask"].sum())
            grad_norm = self.accelerator.clip_grad_norm_(self.policy.parameters(), cfg.model.max_grad_norm)
            lr = self.scheduler.get_last_lr()[0]
            if self._finite(loss_total * world / units, grad_norm):
                self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if cfg.sync_reference_every and (self.step + 1) % cfg.sync_reference_every == 0:
                self._sync_reference()

            self.step += 1
            self.examples += cfg.model.batch_size
            step_tokens = int(all_reduce_sum(self.accelerator, torch.tensor(tokens)))
            self.tokens += step_tokens
            window_tokens += step_tokens
            if self.step == 1 or self.step % cfg.log_every == 0 or self.step == self.total_steps:
                metrics = self._reduce(stats, "train")
                now = time.time()
                metrics.update(grad_norm=float(grad_norm), lr=lr, tokens_per_second=window_tokens / (now - window_start))
                if cfg.max_nonfinite_steps:
                    metrics["nonfinite_steps"] = self.nonfinite_steps
                window_tokens, window_start = 0, now
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

    def _finite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """Whether this step's loss (on every rank) and gradient norm are finite. If not, the step is
        skipped while fewer than `max_nonfinite_steps` have been; otherwise the run stops, unsaved."""
        bad = all_reduce_sum(self.accelerator, torch.tensor(float(not torch.isfinite(loss)))).item() > 0
        bad = bad or not math.isfinite(float(grad_norm))
        if not bad:
            return True
        what = f"loss {float(loss):.4g}, gradient norm {float(grad_norm):.4g}"
        if self.nonfinite_steps >= self.cfg.max_nonfinite_steps:
            raise TrainingError(
                f"non-finite numbers at step {self.step + 1} ({what}): stopped before applying or saving it; "
                f"lower lr, train in bfloat16 or float32, or let up to N such steps be skipped with "
                f"max_nonfinite_steps=N")
        self.nonfinite_steps += 1
        log.warning("step %d skipped: %s (%d of max_nonfinite_steps=%d)", self.step + 1, what,
                    self.nonfinite_steps, self.cfg.max_nonfinite_steps)
        return False

    def begin_step(self, microbatches: list[dict]) -> None:
        """Called with all of this rank's microbatches before an optimizer step's first forward."""

    def token_logps(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probabilities of the labels under `model`, and the mask of label positions."""
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        return token_logps(model, head, batch, self.accelerator.device)

    def sequence_logps(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed response log-probs and response token counts, one per row."""
        logps, mask = self.token_logps(model, batch)
        return logps.sum(-1), mask.sum(-1)

    # -- the reference model

    def _setup_reference(self, policy) -> None:
        cfg = self.cfg
        if cfg.cache_reference_logprobs:
            weights = policy.get_base_model() if cfg.model.use_peft else policy
            splits = {"train": self.batches.examples, "eval": self.eval_items}
            path = reference.cache_path(cfg.cache_dir, reference.weights_digest(weights), splits)
            policy.to(self.accelerator.device)
            reference.load_or_compute(path, splits, lambda batch: self._reference_columns(policy, batch),
                                      lambda items: collate(items, self.tokenizer.pad_token_id),
                                      max(1, cfg.model.eval_batch_size // self.accelerator.num_processes),
                                      self.accelerator)
        elif not cfg.model.use_peft:
            self.reference = copy.deepcopy(policy).requires_grad_(False).eval().to(self.accelerator.device)

    @contextmanager
    def _reference_model(self, policy):
        """The frozen reference: its own copy, the policy with its LoRA adapter switched off, or (only
        while filling the cache, before any step) the initial policy itself."""
        if self.reference is not None:
            yield self.reference
        elif self.cfg.model.use_peft:
            with policy.disable_adapter():
                yield policy
        else:
            yield policy

    @torch.no_grad()
    def _reference_sequence_logps(self, policy, batch: dict) -> torch.Tensor:
        with self._reference_model(policy) as model:
            return self.sequence_logps(model, batch)[0]

    def _reference_columns(self, policy, batch: dict) -> torch.Tensor:
        """(n, k) reference log-probs as cached: one column per response, then one for the KTO mismatch."""
        columns = self._reference_sequence_logps(policy, batch).view(-1, batch["n"]).T
        if "kl" in batch:
            columns = torch.cat([columns, self._reference_sequence_logps(policy, batch["kl"])[:, None]], dim=1)
        return columns

    def reference_logps(self, batch: dict) -> torch.Tensor:
        """Reference log-probs of the batch's rows (chosen rows, then rejected): cached, or computed now."""
        if "reference_logps" in batch:
            rows = batch["reference_logps"][:, :len(batch["labels"]) // batch["n"]].T.flatten()
            return rows.to(self.accelerator.device, torch.float32)
        return self._reference_sequence_logps(self.accelerator.unwrap_model(self.policy), batch)

    def reference_mismatch_logps(self, batch: dict) -> torch.Tensor:
        """Reference log-probs of a binary batch's KL rows (each prompt with another's response)."""
        if "reference_logps" in batch:
            return batch["reference_logps"][:, -1].to(self.accelerator.device, torch.float32)
        return self._reference_sequence_logps(self.accelerator.unwrap_model(self.policy), batch["kl"])

    @torch.no_grad()
    def _sync_reference(self) -> None:
        """TR-DPO (Gorbatovski et al. 2024): reference <- alpha * policy + (1 - alpha) * reference."""
        alpha = self.cfg.sync_reference_alpha
        policy = self.accelerator.unwrap_model(self.policy)
        for ref, new in zip(self.reference.parameters(), policy.parameters()):
            ref.mul_(1 - alpha).add_(new.detach(), alpha=alpha)

    def counters(self) -> dict:
        return {"step": self.step, "examples": self.examples, "tokens": self.tokens}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Metrics on the fixed eval subset (the same examples every time), plus generation scores."""
        model = self.accelerator.unwrap_model(self.policy)
        was_training = model.training
        model.eval()
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        size = max(1, self.cfg.model.eval_batch_size // world)
        mine = self.eval_items[rank::world]
        stats = defaultdict(lambda: [torch.zeros(()), torch.zeros(())])
        for start in range(0, len(mine), size):
            _, batch_stats = self.microbatch_loss(model, collate(mine[start:start + size], self.tokenizer.pad_token_id))
            for name, (s, c) in batch_stats.items():
                stats[name][0] += s.float().cpu()
                stats[name][1] += float(c)
        if self.scorer is not None:
            for name, (s, c) in self.generation_scores(model, self.eval_prompts[rank::world]).items():
                stats[name] = [s, c]
        metrics = self._reduce(stats, "eval")
        model.train(was_training)
        self.eval_metrics, self.eval_step = metrics, self.step
        self.logger.log(self.counters() | metrics)
        return metrics

    def generation_scores(self, model, prompts: list) -> dict:
        """Greedy generations for held-out prompts, judged by the dataset's scorer."""
        totals = defaultdict(lambda: [torch.zeros(()), torch.zeros(())])
        tokenizer = self.tokenizer
        for start in range(0, len(prompts), self.cfg.model.eval_batch_size):
            chunk = prompts[start:start + self.cfg.model.eval_batch_size]
            ids = [p.ids for p in chunk]
            width = max(map(len, ids))
            input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(x)) + x for x in ids])
            attention = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
            device = self.accelerator.device
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                 max_new_tokens=self.cfg.max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            for prompt, row in zip(chunk, out[:, width:]):
                text = tokenizer.decode(row, skip_special_tokens=True)
                for name, ok in self.scorer(prompt.text, text).items():
                    totals[f"generations_{{split}}/{name}"][0] += float(ok)
                    totals[f"generations_{{split}}/{name}"][1] += 1.0
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
        weights = full_state_dict(self.policy)
        rng = gather(acc, checkpoint.rng_state())
        if cfg.model.use_peft and name == "FINAL":
            weights, model = merged_lora_state_dict(model, weights), model.get_base_model()
        best_before = self.best
        if cfg.keep_best_metric and name != "FINAL" and self.eval_step == self.step:
            value = self.eval_metrics.get(cfg.keep_best_metric)
            sign = 1 if cfg.keep_best_mode == "min" else -1
            if value is not None and (self.best is None or sign * value < sign * self.best["value"]):
                self.best = {"value": value, "checkpoint": name}
        error = None
        if acc.is_main_process:
            try:
                checkpoint.save(directory, model, weights, self.tokenizer, self.optimizer, self.scheduler,
                                self.eval_metrics | self.counters() | {"wandb_run_id": self.logger.wandb_id},
                                self.trainer_state(), rng, OmegaConf.to_yaml(cfg, resolve=True),
                                self.reference.state_dict() if cfg.sync_reference_every else None)
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

    def restore(self, snapshot: checkpoint.Snapshot) -> None:
        """Continue from a checkpoint: weights, optimizer, scheduler, counters, data position, RNG."""
        acc, state = self.accelerator, snapshot.state
        if (state["batch_size"], state["batches_per_epoch"]) != (self.cfg.model.batch_size, self.batches.per_epoch):
            raise CheckpointError(
                f"{snapshot.directory} was made with model.batch_size={state['batch_size']} and "
                f"{state['batches_per_epoch']} batches per epoch, this run has {self.cfg.model.batch_size} and "
                f"{self.batches.per_epoch}: its place in the data order would not carry over")
        model = acc.unwrap_model(self.policy)
        if snapshot.adapter != self.cfg.model.use_peft:
            raise CheckpointError(f"{snapshot.directory} holds {'a LoRA adapter' if snapshot.adapter else 'full weights'}"
                                  f" but model.use_peft={self.cfg.model.use_peft}")
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
        if snapshot.reference is not None and self.reference is not None:
            checkpoint.load_weights(self.reference, snapshot.reference)
        self.optimizer.load_state_dict(snapshot.optimizer)
        self.scheduler.load_state_dict(snapshot.scheduler)
        self.step, self.examples, self.tokens = state["step"], state["examples"], state["tokens"]
        self.best, self.eval_metrics, self.eval_step = state["best"], state["eval_metrics"], state["eval_step"]
        self.nonfinite_steps = state.get("nonfinite_steps", 0)
        if len(snapshot.rng) == acc.num_processes:
            checkpoint.set_rng_state(snapshot.rng[acc.process_index])
        else:
            log.warning("%s was saved by %d processes, this run has %d: RNG states not restored, so the "
                        "continuation is not bit-for-bit", snapshot.directory, len(snapshot.rng), acc.num_processes)
        log.info("resumed from %s at step %d (epoch %d, batch %d)", snapshot.directory, self.step,
                 state["epoch"], state["batch_index"])


class SFTTrainer(BasicTrainer):
    """Supervised fine-tuning: mean token cross-entropy over the response tokens of a global batch."""

    def microbatch_loss(self, model, batch):
        logps, mask = self.token_logps(model, batch)
        loss = losses.sft_loss(logps, mask)
        return loss, {"loss/{split}": (loss.detach(), mask.sum())}

    def normalizer(self, batch):
        return int((batch["labels"][:, 1:] != -100).sum())


def _loss_hyperparameters(cfg) -> dict:
    return {k: v for k, v in cfg.loss.items() if k not in ("name", "trainer", "data_shape")}


PAIR_METRICS = ("rewards_eval/chosen", "rewards_eval/rejected", "rewards_eval/accuracies", "rewards_eval/margins")
LOGPS_METRICS = ("logps_eval/chosen", "logps_eval/rejected")


def _pair_stats(chosen_rewards, rejected_rewards, chosen_logps=None, rejected_logps=None) -> dict:
    n = chosen_rewards.numel()
    stats = {"rewards_{split}/chosen": (chosen_rewards.sum(), n), "rewards_{split}/rejected": (rejected_rewards.sum(), n),
             "rewards_{split}/accuracies": ((chosen_rewards > rejected_rewards).sum(), n),
             "rewards_{split}/margins": ((chosen_rewards - rejected_rewards).sum(), n)}
    if chosen_logps is not None:
        stats |= {"logps_{split}/chosen": (chosen_logps.sum(), n), "logps_{split}/rejected": (rejected_logps.sum(), n)}
    return stats


class PairedPreferenceTrainer(BasicTrainer):
    """Chosen and rejected in one concatenated forward pass; the loss named by `loss.name` from
    train.losses.PAIRED_LOSSES, called with the loss yaml's hyperparameters (config.py checks that
    they are the function's)."""
    eval_metrics = ("loss/eval", *PAIR_METRICS, *LOGPS_METRICS)

    @classmethod
    def loss_parameters(cls, loss_name):
        if loss_name not in losses.PAIRED_LOSSES:
            raise KeyError(f"'{loss_name}' is not a paired loss; paired losses: {', '.join(sorted(losses.PAIRED_LOSSES))}")
        return set(inspect.signature(losses.PAIRED_LOSSES[loss_name]).parameters) - {"p"}

    def __init__(self, cfg, *args, **kwargs):
        self.loss_fn = losses.PAIRED_LOSSES[cfg.loss.name]
        self.hyperparameters = _loss_hyperparameters(cfg)
        super().__init__(cfg, *args, **kwargs)

    @classmethod
    def loss_uses_reference(cls, loss_name):
        return loss_name not in losses.REFERENCE_FREE

    def pair_logps(self, model, batch) -> losses.PairLogps:
        logps, counts = self.sequence_logps(model, batch)
        n = batch["n"]
        pair = losses.PairLogps(logps[:n], logps[n:], counts[:n], counts[n:])
        if self.uses_reference():
            ref = self.reference_logps(batch)
            pair.ref_chosen, pair.ref_rejected = ref[:n], ref[n:]
        return pair

    def microbatch_loss(self, model, batch):
        p = self.pair_logps(model, batch)
        loss = self.loss_fn(p, **self.hyperparameters).sum()
        beta = self.hyperparameters.get("beta", 1.0)
        with torch.no_grad():  # implicit rewards; per-token averages for reference-free losses
            if self.uses_reference():
                chosen, rejected = beta * p.chosen_logratios, beta * p.rejected_logratios
            else:
                chosen, rejected = beta * p.chosen_average, beta * p.rejected_average
        return loss, {"loss/{split}": (loss.detach(), batch["n"])} | _pair_stats(chosen, rejected, p.chosen, p.rejected)

    def normalizer(self, batch):
        return batch["n"]


class UnpairedPreferenceTrainer(BasicTrainer):
    """Binary feedback: each example is one response marked desirable or not. Eval uses pairs when
    the data has them, so reward accuracy is comparable with paired methods."""
    eval_data_shape = "pairwise"

    @classmethod
    def loss_uses_reference(cls, loss_name):
        return True

    def normalizer(self, batch):
        return batch["n"]


class KTOTrainer(UnpairedPreferenceTrainer):
    """KTO. The reference point z0 is the detached, clamped mean log-ratio of (prompt, another
    prompt's response) pairs over the whole optimizer step: all microbatches, all ranks."""
    # accuracies and margins only when the eval data has pairs
    eval_metrics = ("loss/eval", "rewards_eval/KL", *PAIR_METRICS, *LOGPS_METRICS)

    @classmethod
    def loss_parameters(cls, loss_name):
        return set(inspect.signature(losses.kto).parameters) - {"logratios", "desirable", "reference_point"}

    def __init__(self, cfg, *args, **kwargs):
        self.hyperparameters = _loss_hyperparameters(cfg)
        self.reference_point = torch.zeros(())
        super().__init__(cfg, *args, **kwargs)
        desirable = sum(1 for it in self.batches.examples if it.desirable)
        undesirable = len(self.batches.examples) - desirable
        h = self.hyperparameters
        ratio = h["desirable_weight"] * desirable / max(1e-12, h["undesirable_weight"] * undesirable)
        if not 1 <= ratio <= 4 / 3:
            log.warning("KTO: desirable_weight*n_desirable / (undesirable_weight*n_undesirable) = %.3g is outside "
                        "[1, 4/3], the range the KTO paper recommends (n = %d desirable, %d undesirable)",
                        ratio, desirable, undesirable)

    @torch.no_grad()
    def begin_step(self, microbatches):
        policy = self.accelerator.unwrap_model(self.policy)
        total, count = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        for batch in microbatches:
            policy_kl = self.sequence_logps(policy, batch["kl"])[0]
            total += (policy_kl - self.reference_mismatch_logps(batch)).sum().double().cpu()
            count += batch["n"]
        total, count = all_reduce_sum(self.accelerator, torch.stack([total, count]))
        self.reference_point = losses.kto_reference_point(total, count).float()

    def microbatch_loss(self, model, batch):
        logps, _ = self.sequence_logps(model, batch)
        n = batch["n"]
        if "desirable" in batch:  # binary examples
            desirable = batch["desirable"].to(logps.device)
        else:  # pairs, at eval: chosen desirable, rejected undesirable
            desirable = torch.arange(2 * n, device=logps.device) < n
        logratios = logps - self.reference_logps(batch)
        h = self.hyperparameters
        loss = losses.kto(logratios, desirable, self.reference_point.to(logps.device), **h).sum()
        rewards = (h["beta"] * logratios).detach()
        stats = {"loss/{split}": (loss.detach(), len(logps)), "rewards_{split}/KL": (self.reference_point, 1)}
        if "desirable" in batch:
            stats |= {"rewards_{split}/chosen": (rewards[desirable].sum(), desirable.sum()),
                      "rewards_{split}/rejected": (rewards[~desirable].sum(), (~desirable).sum()),
                      "logps_{split}/chosen": (logps[desirable].detach().sum(), desirable.sum()),
                      "logps_{split}/rejected": (logps[~desirable].detach().sum(), (~desirable).sum())}
        else:
            stats |= _pair_stats(rewards[:n], rewards[n:], logps[:n].detach(), logps[n:].detach())
        return loss, stats


class BradleyTerryTrainer(BasicTrainer):
    """A reward model: a sequence-classification head scoring chosen above rejected. Its FINAL loads
    with AutoModelForSequenceClassification (one output: the reward)."""
    model_class = "sequence_classification"
    generates = False
    eval_metrics = ("loss/eval", *PAIR_METRICS)

    def microbatch_loss(self, model, batch):
        device = self.accelerator.device
        scores = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                       use_cache=False).logits[:, 0].float()
        n = batch["n"]
        loss = losses.bradley_terry(scores[:n], scores[n:]).sum()
        return loss, {"loss/{split}": (loss.detach(), n)} | _pair_stats(scores[:n].detach(), scores[n:].detach())

    def normalizer(self, batch):
        return batch["n"]


TRAINERS = {cls.__name__: cls for cls in (SFTTrainer, PairedPreferenceTrainer, KTOTrainer, BradleyTerryTrainer)}
