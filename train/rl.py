"""PPO building blocks: pure functions of per-token tensors (no trainer state, no collectives).

Layout: response-aligned (B, T) tensors. Row b holds sample b's response tokens left-aligned, and
`mask` (B, T, bool) is True on its real tokens: a contiguous prefix that includes the EOS when the
response has one, never empty. Every (B, T) output is exactly 0 on padding, whatever garbage the
inputs hold there (e.g. a filler log-prob), so callers may sum without re-masking.

Losses return *sums* over real tokens, never means: the trainer divides by the global token count,
which keeps micro-batched gradient accumulation equal to one full batch. Facts and defaults are in
shared/research/ppo.md (a); the tests (tests/test_rl.py) follow its list (f).
"""
import math

import torch

LOG_RATIO_LIMIT = 20.0  # clamp log-ratios before exp: exp(20) ~ 5e8 is finite in every float dtype we use
KL_ESTIMATORS = ("k1", "k2", "k3")


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x on real tokens, exactly 0 elsewhere (`where`, not `*`, so NaN/inf garbage cannot leak)."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def kl_estimate(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (Schulman's k1/k2/k3).

    k1 = log pi - log pi_ref: unbiased, but negative on some tokens and high-variance; its expected
    gradient on on-policy samples is 0, so it belongs in the reward, not in the loss.
    k2 = (log ratio)^2 / 2: biased, non-negative.  k3 = (rho - 1) - log rho with rho = pi_ref / pi:
    unbiased, non-negative, lower variance. The log-ratio is clamped to +-LOG_RATIO_LIMIT so k3's exp
    cannot overflow.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")
    log_ratio = (logps - ref_logps).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio ** 2
    return torch.expm1(-log_ratio) + log_ratio


def _last_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's last real token (the EOS when there is one): mask is a prefix."""
    return mask.sum(dim=1) - 1


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards: -kl_coef * kl on every real token, plus the sequence score on the last
    real token. The score goes on the EOS itself, not one slot later as TRL does: there, with
    lambda < 1, the EOS token's advantage would only see lambda * score (trl#1893)."""
    rewards = _masked(-kl_coef * kl, mask)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    return rewards.index_put((rows, _last_index(mask)), scores.to(rewards.dtype), accumulate=True)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2015, arXiv 1506.02438), backwards in time:
    delta_t = r_t + gamma V_{t+1} - V_t with V = 0 past the last real token (the episode ends
    there, so nothing is bootstrapped), A_t = delta_t + gamma lam A_{t+1}; returns = A + V are the
    value targets (taken before any advantage whitening). Both are 0 on padding."""
    rewards, values = _masked(rewards, mask), _masked(values, mask)  # padding counts as V = 0, r = 0
    advantages = []
    next_value = next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = _masked(delta + gamma * lam * next_advantage, mask[:, t])
        next_value = values[:, t]
        advantages.append(next_advantage)
    advantages = torch.stack(advantages[::-1], dim=1)
    return advantages, advantages + values  # both already 0 on padding


def masked_moments(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """float64 [count, sum, sum of squares] over real tokens. Sums, so that a caller can all-reduce
    them across ranks and whiten with the statistics of the whole rollout batch."""
    x = _masked(x.double(), mask)
    return torch.stack([mask.sum().double(), x.sum(), (x * x).sum()])


def whiten(x: torch.Tensor, mask: torch.Tensor, moments: torch.Tensor, shift_mean: bool = True,
           eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with the mean and unbiased (Bessel) variance from `moments`
    (see masked_moments), as TRL's masked_whiten. shift_mean=False adds the mean back: reward
    whitening rescales the rewards but keeps their sign and mean. 0 on padding; dtype of x."""
    count, total, total_sq = moments.double().unbind()
    if count.item() < 2:
        raise ValueError(f"whiten needs at least 2 real tokens for an unbiased variance, got {count.item():g}")
    mean = total / count
    var = ((total_sq - count * mean * mean) / (count - 1)).clamp(min=0)  # clamp: rounding near var 0
    out = (x.double() - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return _masked(out, mask).to(x.dtype)


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_low: float, clip_high: float | None = None) -> tuple[torch.Tensor, dict]:
    """PPO clipped surrogate (Schulman et al. 2017, arXiv 1707.06347), per token
    max(-A rho, -A clip(rho, 1 - clip_low, 1 + clip_high)) with rho = pi / pi_old against the
    rollout policy (never the reference). clip_high defaults to clip_low; a larger one (DAPO 0.28)
    lets unlikely tokens rise. Gradient flows through logps only.

    Returns the loss summed over real tokens and a dict of sums over real tokens: "clipped" (tokens
    whose clipped term is active and differs, so their gradient is 0), "approx_kl"
    (0.5 (log pi - log pi_old)^2) and "ratio". On the first minibatch of an epoch-0 update rho == 1
    and "clipped" == 0: a check that old log-probs match the training forward.
    """
    high = clip_low if clip_high is None else clip_high
    # Mask the log-ratio first: padding then has ratio 1 (never counted as clipped) and an exactly
    # zero gradient, even where the caller's filler log-probs or advantages are inf or NaN.
    log_ratio = _masked(logps - old_logps.detach(), mask)
    advantages = advantages.detach()
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + high)
    loss = torch.maximum(unclipped, clipped)
    with torch.no_grad():  # summed in at least float32: a bf16 count stops being exact past 256
        acc = torch.promote_types(logps.dtype, torch.float32)
        stats = {
            "clipped": _masked(clipped > unclipped, mask).sum(dtype=acc),
            "approx_kl": (0.5 * log_ratio.to(acc) ** 2).sum(),
            "ratio": _masked(ratio.to(acc), mask).sum(),
        }
    return _masked(loss, mask).sum(), stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss (as in OpenAI baselines / TRL / OpenRLHF), per token
    0.5 max((V - R)^2, (clip(V, V_old - clip, V_old + clip) - R)^2): the pessimistic of the two
    keeps the value head from moving far from its rollout predictions in one update. Returns the
    sum over real tokens and the count of tokens where the clipped term is strictly larger."""
    values = _masked(values, mask)  # as in policy_loss: padding gets a loss and a gradient of exactly 0
    old_values, returns = _masked(old_values.detach(), mask), _masked(returns.detach(), mask)
    clipped_values = torch.clamp(values, old_values - clip, old_values + clip)  # exactly V when inside
    unclipped_sq, clipped_sq = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * torch.maximum(unclipped_sq, clipped_sq)
    with torch.no_grad():
        n_clipped = (clipped_sq > unclipped_sq).sum(dtype=torch.promote_types(values.dtype, torch.float32))
    return _masked(loss, mask).sum(), n_clipped


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim, as logsumexp(z) - sum softmax(z) z, which never
    exponentiates a large logit. Half-precision logits are upcast to float32 (a vocab-sized sum)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over real tokens: 1 for a perfect critic, 0 for one that predicts
    the mean, negative for worse; nan when the returns are constant."""
    v, r = values.detach().double()[mask], returns.detach().double()[mask]
    var_r = r.var(unbiased=False).item()
    if var_r == 0:
        return math.nan
    return 1.0 - (r - v).var(unbiased=False).item() / var_r


def adaptive_kl_coef(coef: float, kl: float, target: float, n_steps: int, horizon: float) -> float:
    """Adaptive KL controller (Ziegler et al. 2019, arXiv 1909.08593): nudge beta towards the KL
    target, at most +-20% per horizon: beta * (1 + clip(KL / target - 1, -0.2, 0.2) n_steps / horizon)."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * n_steps / horizon)
