"""Preference trainers: paired losses (DPO and relatives), KTO on binary feedback, and the
Bradley-Terry reward model.

Paired and KTO compare the policy with a frozen reference (train.reference.Reference): a copy of
the initial policy, the adapter-disabled base under LoRA, or log-probs cached once before training.
"""
import inspect
import logging

import torch

from train import losses, reference
from train.data import collate
from train.distributed import all_reduce_sum
from train.trainers.base import BasicTrainer

log = logging.getLogger(__name__)

PAIR_METRICS = ("rewards_eval/chosen", "rewards_eval/rejected", "rewards_eval/accuracies", "rewards_eval/margins")
LOGPS_METRICS = ("logps_eval/chosen", "logps_eval/rejected")


def loss_hyperparameters(cfg) -> dict:
    return {k: v for k, v in cfg.loss.items() if k not in losses.LOSS_KEYS}


def _pair_stats(chosen_rewards, rejected_rewards, chosen_logps=None, rejected_logps=None) -> dict:
    n = chosen_rewards.numel()
    stats = {"rewards_{split}/chosen": (chosen_rewards.sum(), n), "rewards_{split}/rejected": (rejected_rewards.sum(), n),
             "rewards_{split}/accuracies": ((chosen_rewards > rejected_rewards).sum(), n),
             "rewards_{split}/margins": ((chosen_rewards - rejected_rewards).sum(), n)}
    if chosen_logps is not None:
        stats |= {"logps_{split}/chosen": (chosen_logps.sum(), n), "logps_{split}/rejected": (rejected_logps.sum(), n)}
    return stats


class ReferenceTrainer(BasicTrainer):
    """A loss over sequence log-probs against the reference: its own copy, the adapter-off policy,
    or (cache_reference_logprobs) columns computed once with the initial policy before any step."""

    def __init__(self, cfg, *args, **kwargs):
        self.hyperparameters = loss_hyperparameters(cfg)
        super().__init__(cfg, *args, **kwargs)

    def setup(self, policy):
        from train.models import disable_dropout
        self.reference = None
        if not self.uses_reference():
            return
        disable_dropout(policy)
        cfg = self.cfg
        if cfg.cache_reference_logprobs:
            weights = policy.get_base_model() if cfg.model.use_peft else policy
            splits = {"train": self.batches.items, "eval": self.eval_items}
            path = reference.cache_path(cfg.cache_dir, reference.weights_digest(weights), splits)
            policy.to(self.accelerator.device)
            reference.load_or_compute(path, splits, lambda batch: self._reference_columns(policy, batch),
                                      lambda items: collate(items, self.tokenizer.pad_token_id),
                                      max(1, cfg.model.eval_batch_size // self.accelerator.num_processes),
                                      self.accelerator)
        else:
            self.reference = reference.Reference(policy, cfg.model.use_peft, self.accelerator.device)

    def train_step(self):
        result = super().train_step()
        if self.cfg.sync_reference_every and self.step % self.cfg.sync_reference_every == self.cfg.sync_reference_every - 1:
            self.reference.sync(self.accelerator.unwrap_model(self.policy), self.cfg.sync_reference_alpha)
        return result

    def checkpoint_states(self):
        states = super().checkpoint_states()
        if self.cfg.sync_reference_every:
            states["reference.safetensors"] = self.reference
        return states

    @torch.no_grad()
    def _reference_sequence_logps(self, policy, batch: dict) -> torch.Tensor:
        if self.reference is None:  # filling the cache, before any step: the initial policy is the reference
            if self.cfg.model.use_peft:
                with policy.disable_adapter():
                    return self.sequence_logps(policy, batch)[0]
            return self.sequence_logps(policy, batch)[0]
        with self.reference.model(policy) as model:
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

    def normalizer(self, batch):
        return batch["n"]


class PairedPreferenceTrainer(ReferenceTrainer):
    """Chosen and rejected in one concatenated forward pass; the loss named by `loss.name` from
    train.losses.PAIRED_LOSSES, called with the loss yaml's hyperparameters (config.py checks that
    they are the function's)."""
    eval_metrics = ("loss/eval", *PAIR_METRICS, *LOGPS_METRICS)

    @classmethod
    def loss_parameters(cls, loss_name):
        if loss_name not in losses.PAIRED_LOSSES:
            raise KeyError(f"'{loss_name}' is not a paired loss; paired losses: {', '.join(sorted(losses.PAIRED_LOSSES))}")
        return set(inspect.signature(losses.PAIRED_LOSSES[loss_name]).parameters) - {"p"}

    @classmethod
    def loss_uses_reference(cls, loss_name):
        return loss_name not in losses.REFERENCE_FREE

    def __init__(self, cfg, *args, **kwargs):
        self.loss_fn = losses.PAIRED_LOSSES[cfg.loss.name]
        super().__init__(cfg, *args, **kwargs)

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


class KTOTrainer(ReferenceTrainer):
    """KTO on binary feedback: each example is one response marked desirable or not. The reference
    point z0 is the detached, clamped mean log-ratio of (prompt, another prompt's response) pairs over
    the whole optimizer step: all microbatches, all ranks. Eval uses pairs when the data has them, so
    reward accuracy is comparable with paired methods."""
    eval_data_shape = "pairwise"
    # accuracies and margins only when the eval data has pairs
    eval_metrics = ("loss/eval", "rewards_eval/KL", *PAIR_METRICS, *LOGPS_METRICS)

    @classmethod
    def loss_parameters(cls, loss_name):
        return set(inspect.signature(losses.kto).parameters) - {"logratios", "desirable", "reference_point"}

    @classmethod
    def loss_uses_reference(cls, loss_name):
        return True

    def __init__(self, cfg, *args, **kwargs):
        self.reference_point = torch.zeros(())
        super().__init__(cfg, *args, **kwargs)
        desirable = int(self.batches.items.desirable.sum())
        undesirable = len(self.batches.items) - desirable
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
        return microbatches

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
