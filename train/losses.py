"""Losses: pure functions of log-probabilities.

Notation (per example; sums over response tokens only):
    pi_w, pi_l     log pi_theta(y_w | x), log pi_theta(y_l | x)   policy, chosen / rejected
    ref_w, ref_l   the same under the frozen reference model
    s_w = pi_w - ref_w, s_l = pi_l - ref_l                        log-ratios ("implicit rewards" / beta)
    h = s_w - s_l                                                 the DPO margin
    n_w, n_l       response token counts;  avg_w = pi_w / n_w    per-token averages

Every paired loss takes a `PairLogps` and its hyperparameters (the keys of its yaml in
config/loss/) and returns one loss per pair; the trainer averages over the global batch. Where
TRL implements the same loss type, these give the same numbers (tests/test_losses.py checks).
A new paired loss is a function here decorated with `@paired_loss("name")` plus a yaml.
"""
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

LOSS_KEYS = ("name", "trainer", "data_shape")  # every loss yaml has these; the rest are hyperparameters
PAIRED_LOSSES: dict[str, Callable] = {}
REFERENCE_FREE: set[str] = set()


def paired_loss(name: str, reference: bool = True):
    """Register a paired loss under `name` (the `loss.name` that selects it)."""
    def register(fn):
        PAIRED_LOSSES[name] = fn
        if not reference:
            REFERENCE_FREE.add(name)
        return fn
    return register


@dataclass
class PairLogps:
    chosen: torch.Tensor  # (B,) summed log-probs
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor  # (B,) response token counts
    rejected_tokens: torch.Tensor
    ref_chosen: Optional[torch.Tensor] = None  # None for reference-free losses
    ref_rejected: Optional[torch.Tensor] = None

    @property
    def chosen_logratios(self) -> torch.Tensor:
        return self.chosen - self.ref_chosen

    @property
    def rejected_logratios(self) -> torch.Tensor:
        return self.rejected - self.ref_rejected

    @property
    def margin(self) -> torch.Tensor:
        return self.chosen_logratios - self.rejected_logratios

    @property
    def chosen_average(self) -> torch.Tensor:
        return self.chosen / self.chosen_tokens.clamp(min=1)

    @property
    def rejected_average(self) -> torch.Tensor:
        return self.rejected / self.rejected_tokens.clamp(min=1)


def _smoothed_sigmoid(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1 - e) log sigmoid(z) - e log sigmoid(-z): a sigmoid loss whose labels flip with probability e."""
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


# ------------------------------------------------------------------------ the DPO family

@paired_loss("dpo")
def dpo(p: PairLogps, beta: float) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, arXiv 2305.18290): -log sigmoid(beta * h). TRL: `sigmoid`."""
    return -F.logsigmoid(beta * p.margin)


@paired_loss("cdpo")
def cdpo(p: PairLogps, beta: float, label_smoothing: float) -> torch.Tensor:
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"): labels flip with
    probability e: -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)."""
    return _smoothed_sigmoid(beta * p.margin, label_smoothing)


@paired_loss("ipo")
def ipo(p: PairLogps, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023, arXiv 2310.12036, eq. 17): (h_avg - 1/(2 beta))^2 with beta as tau, where
    h_avg uses per-token averaged log-ratios s/n (as TRL does, confirmed with the IPO authors)."""
    h_avg = p.chosen_logratios / p.chosen_tokens.clamp(min=1) - p.rejected_logratios / p.rejected_tokens.clamp(min=1)
    return (h_avg - 1 / (2 * beta)) ** 2


@paired_loss("slic", reference=False)
def slic(p: PairLogps, beta: float, lambda_coef: float) -> torch.Tensor:
    """SLiC-HF (Zhao et al. 2023, arXiv 2305.10425): calibration hinge plus an NLL regulariser on the
    chosen response: max(0, beta - pi_w + pi_l) - lambda * pi_w. Reference-free."""
    return torch.relu(beta - p.chosen + p.rejected) - lambda_coef * p.chosen


@paired_loss("simpo", reference=False)
def simpo(p: PairLogps, beta: float, gamma_beta_ratio: float) -> torch.Tensor:
    """SimPO (Meng et al. 2024, arXiv 2405.14734): -log sigmoid(beta (avg_w - avg_l) - gamma) with
    gamma = beta * gamma_beta_ratio. Reference-free. (TRL's CPO `simpo` with simpo_gamma = gamma.)"""
    return -F.logsigmoid(beta * (p.chosen_average - p.rejected_average - gamma_beta_ratio))


@paired_loss("hinge")
def hinge(p: PairLogps, beta: float) -> torch.Tensor:
    """Hinge loss on the margin (SLiC-style, as in RSO, Liu et al. 2023, arXiv 2309.06657): relu(1 - beta h)."""
    return torch.relu(1 - beta * p.margin)


@paired_loss("robust")
def robust(p: PairLogps, beta: float, label_smoothing: float) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024, arXiv 2403.00409): an unbiased loss under label noise e:
    (-(1 - e) log sigmoid(beta h) + e log sigmoid(-beta h)) / (1 - 2e)."""
    z = beta * p.margin
    return (-(1 - label_smoothing) * F.logsigmoid(z) + label_smoothing * F.logsigmoid(-z)) / (1 - 2 * label_smoothing)


@paired_loss("exo_pair")
def exo_pair(p: PairLogps, beta: float, label_smoothing: float) -> torch.Tensor:
    """EXO (Ji et al. 2024, arXiv 2402.00856, eq. 16): KL(q || p_e) for the two-way softmax
    q = sigmoid(+-beta h) against the smoothed target p_e = (1 - e, e), e > 0."""
    z = beta * p.margin
    return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-label_smoothing))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(label_smoothing)))


@paired_loss("nca_pair")
def nca_pair(p: PairLogps, beta: float) -> torch.Tensor:
    """NCA (Chen et al. 2024, arXiv 2402.05369): -log sigmoid(beta s_w) - 1/2 log sigmoid(-beta s_w)
    - 1/2 log sigmoid(-beta s_l): absolute rewards, so the chosen likelihood cannot fall freely."""
    w, l_ = beta * p.chosen_logratios, beta * p.rejected_logratios
    return -F.logsigmoid(w) - 0.5 * F.logsigmoid(-w) - 0.5 * F.logsigmoid(-l_)


@paired_loss("bco_pair")
def bco_pair(p: PairLogps, beta: float) -> torch.Tensor:
    """BCO on pairs (Jung et al. 2024, arXiv 2404.04656), without the running reward shift (as TRL):
    -log sigmoid(beta s_w) - log sigmoid(-beta s_l)."""
    return -F.logsigmoid(beta * p.chosen_logratios) - F.logsigmoid(-beta * p.rejected_logratios)


@paired_loss("sppo_hard")
def sppo_hard(p: PairLogps, beta: float) -> torch.Tensor:
    """SPPO with hard win probabilities (Wu et al. 2024, arXiv 2405.00675, eq. 4.7 with P in {0, 1}):
    (s_w - 1/(2 beta))^2 + (s_l + 1/(2 beta))^2."""
    return (p.chosen_logratios - 0.5 / beta) ** 2 + (p.rejected_logratios + 0.5 / beta) ** 2


@paired_loss("aot")
def aot(p: PairLogps, beta: float, label_smoothing: float) -> torch.Tensor:
    """AOT, paired (Melnyk et al. 2024, arXiv 2406.05882): sort the policy margins pi_w - pi_l and the
    reference margins ref_w - ref_l across the microbatch separately; smoothed sigmoid loss on the
    difference of the sorted values (first-order stochastic dominance)."""
    policy, _ = torch.sort(p.chosen - p.rejected, dim=0)
    reference, _ = torch.sort(p.ref_chosen - p.ref_rejected, dim=0)
    return _smoothed_sigmoid(beta * (policy - reference), label_smoothing)


@paired_loss("aot_unpaired")
def aot_unpaired(p: PairLogps, beta: float, label_smoothing: float) -> torch.Tensor:
    """AOT, unpaired (Melnyk et al. 2024): sort s_w and s_l across the microbatch separately; smoothed
    sigmoid loss on the difference of the sorted values."""
    chosen, _ = torch.sort(p.chosen_logratios, dim=0)
    rejected, _ = torch.sort(p.rejected_logratios, dim=0)
    return _smoothed_sigmoid(beta * (chosen - rejected), label_smoothing)


@paired_loss("apo_zero")
def apo_zero(p: PairLogps, beta: float) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, arXiv 2408.06266, eq. 7): raise the chosen, lower the
    rejected likelihood: (1 - sigmoid(beta s_w)) + sigmoid(beta s_l)."""
    return 1 - torch.sigmoid(beta * p.chosen_logratios) + torch.sigmoid(beta * p.rejected_logratios)


@paired_loss("apo_down")
def apo_down(p: PairLogps, beta: float) -> torch.Tensor:
    """APO-down (D'Oosterlinck et al. 2024, eq. 8): lower both, the rejected more:
    sigmoid(beta s_w) + (1 - sigmoid(beta h))."""
    return torch.sigmoid(beta * p.chosen_logratios) + 1 - torch.sigmoid(beta * p.margin)


@paired_loss("discopop")
def discopop(p: PairLogps, beta: float, tau: float) -> torch.Tensor:
    """DiscoPOP (Chris Lu et al. 2024, arXiv 2406.08414, eq. 5): a log-ratio modulated blend of the
    logistic and exponential losses, with z = beta h and m = sigmoid(z / tau):
    (1 - m) (-log sigmoid(z)) + m exp(-z)."""
    z = beta * p.margin
    m = torch.sigmoid(z / tau)
    return (1 - m) * -F.logsigmoid(z) + m * torch.exp(-z)


@paired_loss("sigmoid_norm")
def sigmoid_norm(p: PairLogps, beta: float) -> torch.Tensor:
    """Length-normalised DPO: -log sigmoid(beta (s_w / n_w - s_l / n_l)) (TRL `sigmoid_norm`;
    open-instruct's `dpo_norm`)."""
    h_avg = p.chosen_logratios / p.chosen_tokens.clamp(min=1) - p.rejected_logratios / p.rejected_tokens.clamp(min=1)
    return -F.logsigmoid(beta * h_avg)


@paired_loss("orpo", reference=False)
def orpo(p: PairLogps, beta: float) -> torch.Tensor:
    """ORPO (Hong et al. 2024, arXiv 2403.07691): the chosen response's per-token NLL plus an odds-ratio
    term, with odds(y) = P / (1 - P) for P = exp(avg): -avg_w - beta log sigmoid(log odds_w - log odds_l).
    Reference-free."""
    log_odds = (p.chosen_average - p.rejected_average) - (_log1mexp(p.chosen_average) - _log1mexp(p.rejected_average))
    return -p.chosen_average - beta * F.logsigmoid(log_odds)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 too (Maechler 2012): expm1 there, log1p elsewhere."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


# -------------------------------------------------------------------- unpaired and rewards

def kto(logratios: torch.Tensor, desirable: torch.Tensor, reference_point: torch.Tensor, beta: float,
        desirable_weight: float, undesirable_weight: float) -> torch.Tensor:
    """KTO (Ethayarajh et al. 2024, arXiv 2402.01306): with r = log pi_theta(y|x) - log pi_ref(y|x) and the
    reference point z0 (a detached KL estimate), a desirable y costs lambda_D (1 - sigmoid(beta (r - z0)))
    and an undesirable one lambda_U (1 - sigmoid(beta (z0 - r)))."""
    desirable_loss = desirable_weight * (1 - torch.sigmoid(beta * (logratios - reference_point)))
    undesirable_loss = undesirable_weight * (1 - torch.sigmoid(beta * (reference_point - logratios)))
    return torch.where(desirable, desirable_loss, undesirable_loss)


def kto_reference_point(kl_logratio_sum: torch.Tensor, kl_count: torch.Tensor) -> torch.Tensor:
    """z0 = max(0, mean log-ratio over mismatched (x, y') pairs), detached: an estimate of
    KL(pi_theta || pi_ref) that moves the reference point but carries no gradient."""
    return (kl_logratio_sum / kl_count.clamp(min=1)).clamp(min=0).detach()


def bradley_terry(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry reward-model loss (Bradley & Terry 1952; Ouyang et al. 2022): -log sigmoid(r_w - r_l)."""
    return -F.logsigmoid(chosen_scores - rejected_scores)


# ------------------------------------------------------------------ from logits, and SFT

def token_logps(label_logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each label token, and the mask of positions that count.

    labels: (B, T) with -100 where nothing is predicted; position t's logits predict label t+1, so
    the mask is `labels[:, 1:] != -100`. label_logits: (N, V), the logits of exactly the N masked
    positions in row-major order (the trainer projects only those through the vocabulary). Returns
    (B, T-1) log-probs, 0 off the mask. Cross-entropy's fused log-softmax keeps no second copy.
    """
    mask = labels[:, 1:] != -100
    logps = torch.zeros(mask.shape, dtype=torch.float32, device=label_logits.device)
    logps = logps.masked_scatter(mask, -F.cross_entropy(label_logits.float(), labels[:, 1:][mask], reduction="none"))
    return logps, mask


def sft_loss(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood of the response tokens: -sum_t log p(y_t | x, y_<t).

    Returned as a sum so the trainer can normalise by the token count of the whole global batch,
    which makes gradient accumulation and data parallelism exactly equivalent to one big batch.
    """
    return -(logps * mask).sum()
