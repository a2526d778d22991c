"""Supervised fine-tuning."""
from train import losses
from train.trainers.base import BasicTrainer


class SFTTrainer(BasicTrainer):
    """Mean token cross-entropy over the response tokens of a global batch."""

    def microbatch_loss(self, model, batch):
        logps, mask = self.token_logps(model, batch)
        loss = losses.sft_loss(logps, mask)
        return loss, {"loss/{split}": (loss.detach(), mask.sum())}

    def normalizer(self, batch):
        return int((batch["labels"][:, 1:] != -100).sum())
