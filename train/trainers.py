"""Trainers: BasicTrainer owns the loop; a subclass says how a microbatch becomes a loss.

A subclass implements `microbatch_loss(model, batch) -> (loss_sum, stats)` and `normalizer(batch)`.
The loss is a *sum* over the microbatch's units (tokens for SFT, examples for preference losses);
the trainer divides by the number of units in the whole global batch (all microbatches, all
ranks), so any split of a batch into ranks and accumulation steps gives the same gradient.
`stats` maps metric names (with `{split}` for train/eval) to (sum, count) pairs.
"""
import logging
import math
import pathlib
import time
from collections import defaultdict
from contextlib import nullcontext

import torch

from train import losses
from train.checkpoint import save_checkpoint
from train.data import Batches, collate
from train.distributed import all_reduce_sum

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


class BasicTrainer:
    def __init__(self, cfg, accelerator, policy, tokenizer, train_batches: Batches, eval_items: list,
                 eval_prompts: list, scorer, run_dir: pathlib.Path, logger):
        self.cfg, self.accelerator, self.tokenizer = cfg, accelerator, tokenizer
        self.batches, self.eval_items, self.eval_prompts, self.scorer = train_batches, eval_items, eval_prompts, scorer
        self.run_dir, self.logger = run_dir, logger
        self.total_steps = count_steps(cfg, train_batches.per_epoch)
        params = [p for p in policy.parameters() if p.requires_grad]
        optimizer = getattr(torch.optim, cfg.optimizer)(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.policy, self.optimizer = accelerator.prepare(policy, optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.total_steps, cfg.warmup, cfg.lr_schedule))
        self.step = self.examples = self.tokens = 0
        self.eval_metrics: dict = {}

    # -- what a subclass provides

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

    def train(self) -> None:
        cfg = self.cfg
        if cfg.do_first_eval:
            self.evaluate()
        window_tokens, window_start = 0, time.time()
        world = self.accelerator.num_processes
        while self.step < self.total_steps:
            epoch, index = divmod(self.step, self.batches.per_epoch)
            microbatches = [collate(mb, self.tokenizer.pad_token_id) for mb in self.batches.microbatches(epoch, index)]
            units = all_reduce_sum(self.accelerator, torch.tensor(float(sum(self.normalizer(b) for b in microbatches))))
            stats = defaultdict(lambda: [torch.zeros(()), torch.zeros(())])
            tokens = 0
            for i, batch in enumerate(microbatches):
                last = i == len(microbatches) - 1
                with nullcontext() if last else self.accelerator.no_sync(self.policy):
                    loss_sum, batch_stats = self.microbatch_loss(self.policy, batch)
                    self.accelerator.backward(loss_sum * world / units)
                for name, (s, c) in batch_stats.items():
                    stats[name][0] += s.detach().float().cpu()
                    stats[name][1] += float(c)
                tokens += int(batch["attention_mask"].sum())
            grad_norm = self.accelerator.clip_grad_norm_(self.policy.parameters(), cfg.model.max_grad_norm)
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)

            self.step += 1
            self.examples += cfg.model.batch_size
            step_tokens = int(all_reduce_sum(self.accelerator, torch.tensor(tokens)))
            self.tokens += step_tokens
            window_tokens += step_tokens
            if self.step == 1 or self.step % cfg.log_every == 0 or self.step == self.total_steps:
                metrics = self._reduce(stats, "train")
                now = time.time()
                metrics.update(grad_norm=float(grad_norm), lr=lr, tokens_per_second=window_tokens / (now - window_start))
                window_tokens, window_start = 0, now
                self.logger.log(self.counters() | metrics)
            if self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                self.evaluate()
            if cfg.intermediate_checkpoints and self.step % cfg.save_every == 0 and self.step < self.total_steps:
                self.save(f"step-{self.step}")
        self.evaluate()
        self.save("FINAL")

    def token_logps(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probabilities of the labels under `model`, and the mask of label positions."""
        device = self.accelerator.device
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        return losses.token_logps(logits, batch["labels"].to(device))

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
        self.eval_metrics = metrics
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

    def save(self, name: str) -> pathlib.Path:
        directory = self.run_dir / name
        save_checkpoint(directory, self.accelerator, self.policy, self.tokenizer, self.optimizer, self.scheduler,
                        self.eval_metrics | self.counters() | {"wandb_run_id": self.logger.wandb_id})
        log.info("saved %s", directory)
        return directory


class SFTTrainer(BasicTrainer):
    """Supervised fine-tuning: mean token cross-entropy over the response tokens of a global batch."""

    def microbatch_loss(self, model, batch):
        logps, mask = self.token_logps(model, batch)
        loss = losses.sft_loss(logps, mask)
        return loss, {"loss/{split}": (loss.detach(), mask.sum())}

    def normalizer(self, batch):
        return int((batch["labels"][:, 1:] != -100).sum())


TRAINERS = {cls.__name__: cls for cls in (SFTTrainer,)}
