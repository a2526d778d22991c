"""Losses: pure functions of log-probabilities, and the one helper that makes those from logits."""
import torch
import torch.nn.functional as F


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each label token, and the mask of positions that count.

    logits: (B, T, V) from inputs (B, T); labels: (B, T) with -100 where nothing is predicted.
    Position t's logits predict label t+1. Cross-entropy gathers the label's log-probability
    without keeping a second full-vocabulary tensor around.
    """
    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != -100
    logps = -F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                             reduction="none").view(labels.shape)
    return logps * mask, mask


def sft_loss(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood of the response tokens: -sum_t log p(y_t | x, y_<t).

    Returned as a sum so the trainer can normalise by the token count of the whole global batch,
    which makes gradient accumulation and data parallelism exactly equivalent to one big batch.
    """
    return -(logps * mask).sum()
