"""train/rl.py (PPO building blocks) against independent computations: plain-Python float64 loops,
exact sums over a categorical support, and hand-worked numbers. Follows shared/research/ppo.md (f).

Inputs are float64 so comparisons can be tight; padding positions hold garbage (NaN, huge values)
to show that it never leaks into the real tokens or into the exactly-zero padding of the outputs.
"""
import math

import numpy as np
import pytest
import torch

from train import rl

NAN = float("nan")


def prefix_mask(lengths: list[int], T: int) -> torch.Tensor:
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]


def with_garbage(x: torch.Tensor, mask: torch.Tensor, value: float = NAN) -> torch.Tensor:
    return torch.where(mask, x, torch.full_like(x, value))


def assert_close(got: torch.Tensor, expected: torch.Tensor, what: str, atol: float = 1e-12):
    """|got - expected| <= atol elementwise (torch.testing.assert_close costs ~2 s to import lazily)."""
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    err = (got - expected).abs().max().item() if got.numel() else 0.0
    assert err <= atol, f"{what}: max |diff| {err:.3g} > {atol:g}\n got {got.tolist()}\n expected {expected.tolist()}"


def assert_zero_padding(x: torch.Tensor, mask: torch.Tensor, what: str):
    pad = x[~mask]
    assert torch.equal(pad, torch.zeros_like(pad)), f"{what}: padding must be exactly 0, got {pad.tolist()}"


# ------------------------------------------------------------------------------------- GAE

# A 2x5 toy: row 0 is a 3-token response (EOS at index 2) and 2 padding slots, row 1 fills all 5.
GAE_LENGTHS = [3, 5]
GAE_REWARDS = [[0.1, -0.2, 1.5, 0.0, 0.0], [-0.05, 0.3, -0.1, 0.2, -0.7]]
GAE_VALUES = [[0.4, 0.9, -0.3, 0.0, 0.0], [0.2, -0.6, 0.5, 1.1, 0.05]]


def gae_inputs():
    mask = prefix_mask(GAE_LENGTHS, 5)
    rewards = with_garbage(torch.tensor(GAE_REWARDS, dtype=torch.float64), mask, NAN)
    values = with_garbage(torch.tensor(GAE_VALUES, dtype=torch.float64), mask, 1e6)
    return rewards, values, mask


def gae_reference(gamma: float, lam: float) -> tuple[list[list[float]], list[list[float]]]:
    """GAE row by row in plain Python, straight from the definition."""
    advantages, returns = [], []
    for r, v, n in zip(GAE_REWARDS, GAE_VALUES, GAE_LENGTHS):
        adv = [0.0] * 5
        running = 0.0
        for t in reversed(range(n)):
            next_v = v[t + 1] if t + 1 < n else 0.0
            running = r[t] + gamma * next_v - v[t] + gamma * lam * running
            adv[t] = running
        advantages.append(adv)
        returns.append([adv[t] + v[t] if t < n else 0.0 for t in range(5)])
    return advantages, returns


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (1.0, 1.0), (0.9, 0.0), (0.99, 0.7)])
def test_gae_matches_python_loop(gamma, lam):
    rewards, values, mask = gae_inputs()
    advantages, returns = rl.gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = gae_reference(gamma, lam)
    assert_close(advantages, torch.tensor(ref_adv, dtype=torch.float64),
                 f"advantages vs the python loop (gamma={gamma}, lam={lam})")
    assert_close(returns, torch.tensor(ref_ret, dtype=torch.float64), "returns vs the python loop")
    assert_close(returns[mask], (advantages + values)[mask], "returns must be A + V on real tokens")
    assert_zero_padding(advantages, mask, "advantages")
    assert_zero_padding(returns, mask, "returns")


def monte_carlo_advantage(b: int, t: int, gamma: float) -> float:
    """lam = 1: the discounted reward-to-go minus V_t."""
    n = GAE_LENGTHS[b]
    return sum(gamma ** k * GAE_REWARDS[b][t + k] for k in range(n - t)) - GAE_VALUES[b][t]


def one_step_td_advantage(b: int, t: int, gamma: float) -> float:
    """lam = 0: r_t + gamma V_{t+1} - V_t, with V = 0 after the last real token."""
    next_v = GAE_VALUES[b][t + 1] if t + 1 < GAE_LENGTHS[b] else 0.0
    return GAE_REWARDS[b][t] + gamma * next_v - GAE_VALUES[b][t]


@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("lam, expected", [(1.0, monte_carlo_advantage), (0.0, one_step_td_advantage)])
def test_gae_at_lambda_one_is_monte_carlo_and_at_zero_one_step_td(gamma, lam, expected):
    rewards, values, mask = gae_inputs()
    advantages, _ = rl.gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(GAE_LENGTHS):
        for t in range(n):
            assert advantages[b, t].item() == pytest.approx(expected(b, t, gamma), abs=1e-12), \
                f"row {b} t {t}: A != {expected.__name__} (lam={lam})"


# ------------------------------------------------------------------------------ KL estimators

def categorical(seed: int, k: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(k, generator=g, dtype=torch.float64) * 1.5,
            torch.randn(k, generator=g, dtype=torch.float64) * 1.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_estimators_expectations_exact(seed):
    """E_{x~p}[k(x)], summed exactly over the support: k1 and k3 are unbiased for KL(p || q), k2 is not."""
    p_logits, q_logits = categorical(seed)
    logp, logq = p_logits.log_softmax(0), q_logits.log_softmax(0)
    p = logp.exp()
    exact_kl = float(sum(p[i] * (logp[i] - logq[i]) for i in range(len(p))))
    expectations = {}
    for name in rl.KL_ESTIMATORS:
        per_x = rl.kl_estimate(logp[None], logq[None], name)[0]  # one "token" per support point
        expectations[name] = float((p * per_x).sum())
    assert expectations["k1"] == pytest.approx(exact_kl, rel=1e-12), "k1 must be unbiased"
    assert expectations["k3"] == pytest.approx(exact_kl, rel=1e-12), "k3 must be unbiased"
    assert abs(expectations["k2"] - exact_kl) > 1e-4, "k2 is biased; equal here would mean a wrong formula"
    k3 = rl.kl_estimate(logp[None], logq[None], "k3")
    assert (k3 >= 0).all(), f"k3 must be non-negative, got {k3.tolist()}"


def test_kl_estimators_formulas_and_clamp():
    logps = torch.tensor([[-1.0, -3.0, 40.0, -40.0]], dtype=torch.float64)
    ref = torch.tensor([[-2.0, -0.5, 0.0, 0.0]], dtype=torch.float64)
    lr = [1.0, -2.5, 20.0, -20.0]  # the last two clamped to +-LOG_RATIO_LIMIT
    expected = {"k1": lr, "k2": [0.5 * x * x for x in lr], "k3": [math.exp(-x) - 1 + x for x in lr]}
    for name, values in expected.items():
        got = rl.kl_estimate(logps, ref, name)[0].tolist()
        assert got == pytest.approx(values, rel=1e-12), f"{name}: {got} != {values}"
        assert all(math.isfinite(x) for x in got), f"{name} must stay finite on extreme log-ratios"
    assert (rl.kl_estimate(logps, ref, "k3") >= 0).all()
    with pytest.raises(ValueError, match="k1.*k2.*k3"):
        rl.kl_estimate(logps, ref, "k4")


@pytest.mark.parametrize("seed", [0, 3])
def test_k1_as_loss_has_zero_expected_gradient(seed):
    """Why k1 goes in the reward, not the loss: on on-policy samples E_p[grad k1] = sum_x p grad log p
    = grad sum_x p = 0, while grad KL(p || q) is not 0. (k2 as a loss gives exactly grad KL.)"""
    p_logits, q_logits = categorical(seed)
    logq = q_logits.log_softmax(0)

    def expected_gradient(estimator: str) -> torch.Tensor:
        theta = p_logits.clone().requires_grad_()
        logp = theta.log_softmax(0)
        per_x = rl.kl_estimate(logp[None], logq[None], estimator)[0]
        (logp.exp().detach() * per_x).sum().backward()  # samples x ~ p: the weights carry no gradient
        return theta.grad

    theta = p_logits.clone().requires_grad_()
    logp = theta.log_softmax(0)
    (logp.exp() * (logp - logq)).sum().backward()
    kl_grad = theta.grad
    assert kl_grad.norm() > 1e-2, "test needs p != q"
    k1_grad = expected_gradient("k1")
    assert_close(k1_grad, torch.zeros_like(k1_grad), "expected gradient of k1-as-loss must be 0")
    assert_close(expected_gradient("k2"), kl_grad, "expected gradient of k2-as-loss must equal grad KL")


# ------------------------------------------------------------------------------ token rewards

def test_token_rewards_score_on_last_real_token():
    lengths = [3, 5, 1]  # EOS at index 2; no EOS (fills all T = 5, score on the last token); 1 token
    T, coef = 5, 0.05
    mask = prefix_mask(lengths, T)
    g = torch.Generator().manual_seed(0)
    kl = with_garbage(torch.randn(3, T, generator=g, dtype=torch.float64), mask, NAN)
    scores = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    rewards = rl.token_rewards(scores, kl, mask, coef)
    for b, n in enumerate(lengths):
        for t in range(T):
            if t < n:
                expected = -coef * kl[b, t].item() + (scores[b].item() if t == n - 1 else 0.0)
            else:
                expected = 0.0
            assert rewards[b, t].item() == pytest.approx(expected, abs=1e-12), \
                f"row {b} (length {n}) t {t}: {rewards[b, t].item()} != {expected}"
    assert_zero_padding(rewards, mask, "rewards")
    # The score sits at the EOS, not one slot after it (the TRL off-by-one).
    assert rewards[0, 3].item() == 0.0 and rewards[2, 1].item() == 0.0
    assert rewards.sum().item() == pytest.approx(scores.sum().item() - coef * kl[mask].sum().item(), abs=1e-12)


# ------------------------------------------------------------------------------ policy loss

# (A, ratio, expected per-token loss, clipped?, expected d loss / d logps) for clip_low = clip_high = 0.2.
# d(-A rho)/d log pi = -A rho when the unclipped term is active, 0 when the clipped one is.
POLICY_CASES_SYMMETRIC = [
    (2.0, 1.1, -2.2, False, -2.2),    # A > 0, inside
    (2.0, 1.5, -2.4, True, 0.0),      # A > 0, above 1.2: -2 * 1.2, gradient stopped
    (2.0, 0.5, -1.0, False, -1.0),    # A > 0, below 0.8: unclipped -1.0 > -1.6, still pushes up
    (-0.5, 0.5, 0.4, True, 0.0),      # A < 0, below 0.8: max(0.25, 0.4), gradient stopped
    (-0.5, 1.5, 0.75, False, 0.75),   # A < 0, above 1.2: max(0.75, 0.6), still pushes down
    (-0.5, 0.9, 0.45, False, 0.45),   # A < 0, inside
    (0.0, 1.5, 0.0, False, 0.0),      # A = 0: both terms 0, a tie is not "clipped"
]
# clip_low = 0.2, clip_high = 0.28 (DAPO): the upper bound moves, the lower one does not.
POLICY_CASES_ASYMMETRIC = [
    (2.0, 1.25, -2.5, False, -2.5),   # inside [0.8, 1.28] (clipped with the symmetric 0.2)
    (2.0, 1.5, -2.56, True, 0.0),     # -2 * 1.28
    (-0.5, 0.7, 0.4, True, 0.0),      # max(0.35, 0.5 * 0.8)
    (-0.5, 0.85, 0.425, False, 0.425),
]


@pytest.mark.parametrize("cases,clip_high", [(POLICY_CASES_SYMMETRIC, None), (POLICY_CASES_ASYMMETRIC, 0.28)],
                         ids=["symmetric", "asymmetric"])
def test_policy_loss_by_hand(cases, clip_high):
    n = len(cases)
    mask = prefix_mask([n], n + 2)  # two padding slots holding garbage
    logps = torch.full((1, n + 2), NAN, dtype=torch.float64)
    logps[0, :n] = torch.linspace(-3.0, -0.5, n, dtype=torch.float64)
    logps.requires_grad_()
    ratios = torch.tensor([c[1] for c in cases], dtype=torch.float64)
    old_logps = torch.full((1, n + 2), 1.0, dtype=torch.float64)  # TRL's INVALID_LOGPROB filler
    old_logps[0, :n] = logps.detach()[0, :n] - ratios.log()  # so that exp(logps - old) = ratio
    old_logps.requires_grad_()
    advantages = torch.full((1, n + 2), NAN, dtype=torch.float64)
    advantages[0, :n] = torch.tensor([c[0] for c in cases], dtype=torch.float64)
    advantages.requires_grad_()

    loss, stats = rl.policy_loss(logps, old_logps, advantages, mask, 0.2, clip_high)
    loss.backward()
    assert loss.item() == pytest.approx(sum(c[2] for c in cases), abs=1e-12), "summed loss"
    assert stats["clipped"].item() == sum(c[3] for c in cases), "clipped count"
    assert stats["ratio"].item() == pytest.approx(sum(c[1] for c in cases), abs=1e-12), "ratio sum"
    assert stats["approx_kl"].item() == pytest.approx(sum(0.5 * math.log(c[1]) ** 2 for c in cases), abs=1e-12)
    expected_grad = [c[4] for c in cases] + [0.0, 0.0]
    assert logps.grad[0].tolist() == pytest.approx(expected_grad, abs=1e-12), \
        "gradient: -A rho where unclipped, 0 where clipped, exactly 0 on padding"
    assert old_logps.grad is None and advantages.grad is None, "gradient must flow through logps only"
    # Per token: each case alone gives its own loss (the sum is not hiding offsetting errors).
    for i, (a, ratio, expected, _, _) in enumerate(cases):
        one, _ = rl.policy_loss(logps.detach()[:, i:i + 1], old_logps.detach()[:, i:i + 1],
                                advantages.detach()[:, i:i + 1], mask[:, i:i + 1], 0.2, clip_high)
        assert one.item() == pytest.approx(expected, abs=1e-12), f"case {i}: A={a}, ratio={ratio}"


def test_policy_loss_ratio_one_first_minibatch():
    """Old log-probs equal to the new ones (first minibatch of epoch 0): rho = 1, loss = -sum A, no clipping."""
    mask = prefix_mask([4, 2, 6], 6)
    g = torch.Generator().manual_seed(1)
    logps = -torch.rand(3, 6, generator=g, dtype=torch.float64) * 5
    advantages = with_garbage(torch.randn(3, 6, generator=g, dtype=torch.float64), mask, 0.0)
    loss, stats = rl.policy_loss(logps, logps.clone(), advantages, mask, 0.2)
    assert loss.item() == pytest.approx(-advantages[mask].sum().item(), abs=1e-12)
    assert stats["clipped"].item() == 0
    assert stats["ratio"].item() == mask.sum().item()
    assert stats["approx_kl"].item() == 0.0


# ------------------------------------------------------------------------------ value loss

# (V, V_old, R, expected 0.5 max(...), clipped?, d loss / dV) with clip = 0.2.
VALUE_CASES = [
    (1.0, 0.9, 0.0, 0.5, False, 1.0),      # inside [0.7, 1.1]: both terms equal
    (1.5, 1.0, 0.0, 1.125, False, 1.5),    # above, clip V=1.2: 2.25 vs 1.44, unclipped wins
    (1.5, 1.0, 2.0, 0.32, True, 0.0),      # above, clip V=1.2: 0.25 vs 0.64, clipped wins
    (0.5, 1.0, 0.0, 0.32, True, 0.0),      # below, clip V=0.8: 0.25 vs 0.64, clipped wins
    (0.5, 1.0, 1.0, 0.125, False, -0.5),   # below, clip V=0.8: 0.25 vs 0.04, unclipped wins
]


def test_value_loss_by_hand():
    n = len(VALUE_CASES)
    mask = prefix_mask([n], n + 1)
    cols = list(zip(*VALUE_CASES))
    values = torch.tensor([*cols[0], NAN], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([*cols[1], 1e6], dtype=torch.float64)
    returns = torch.tensor([*cols[2], NAN], dtype=torch.float64)
    loss, n_clipped = rl.value_loss(values[None], old[None], returns[None], mask, 0.2)
    loss.backward()
    assert loss.item() == pytest.approx(sum(cols[3]), abs=1e-12)
    assert n_clipped.item() == sum(cols[4])
    assert values.grad.tolist() == pytest.approx([*cols[5], 0.0], abs=1e-12)
    for i, case in enumerate(VALUE_CASES):
        one, c = rl.value_loss(values.detach()[None, i:i + 1], old[None, i:i + 1], returns[None, i:i + 1],
                               mask[:, i:i + 1], 0.2)
        assert one.item() == pytest.approx(case[3], abs=1e-12) and c.item() == case[4], f"case {i}: {case}"


# ------------------------------------------------------------------------------ whitening

def whiten_inputs():
    mask = prefix_mask([4, 2, 3], 4)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64) * 3 + 1.5
    return x, mask


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_against_numpy(shift_mean):
    x, mask = whiten_inputs()
    real = x[mask].numpy()
    mean, var = real.mean(), real.var(ddof=1)
    expected = (real - mean) / np.sqrt(var + 1e-8) + (0.0 if shift_mean else mean)
    out = rl.whiten(x, mask, rl.masked_moments(x, mask), shift_mean=shift_mean)
    np.testing.assert_allclose(out[mask].numpy(), expected, rtol=1e-12, atol=1e-12)
    assert_zero_padding(out, mask, "whitened")
    if shift_mean:
        assert out[mask].mean().item() == pytest.approx(0.0, abs=1e-12)
        assert out[mask].std(unbiased=True).item() == pytest.approx(1.0, abs=1e-6)
    else:
        assert out[mask].mean().item() == pytest.approx(mean, abs=1e-12), "shift_mean=False must keep the mean"


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_padding_invariance(shift_mean):
    """Extra padding columns and a padding row, full of garbage, change nothing on the real tokens."""
    x, mask = whiten_inputs()
    base = rl.whiten(x, mask, rl.masked_moments(x, mask), shift_mean=shift_mean)
    big_x = torch.full((4, 7), 1e6, dtype=torch.float64)
    big_x[1, 5] = NAN
    big_x[:3, :4] = torch.where(mask, x, torch.full_like(x, -7e5))
    big_mask = torch.zeros(4, 7, dtype=torch.bool)
    big_mask[:3, :4] = mask
    out = rl.whiten(big_x, big_mask, rl.masked_moments(big_x, big_mask), shift_mean=shift_mean)
    assert_close(out[:3, :4], base, "padding changed the whitened real tokens")
    assert_zero_padding(out, big_mask, "whitened (padded)")


def test_whiten_moments_add_across_ranks():
    """Summed moments of two shards (what an all-reduce gives) whiten each shard as the whole batch."""
    x, mask = whiten_inputs()
    moments = rl.masked_moments(x[:1], mask[:1]) + rl.masked_moments(x[1:], mask[1:])
    assert moments.dtype == torch.float64
    assert_close(moments, rl.masked_moments(x, mask), "moments of shards must add up to the whole")
    whole = rl.whiten(x, mask, rl.masked_moments(x, mask))
    shards = torch.cat([rl.whiten(x[:1], mask[:1], moments), rl.whiten(x[1:], mask[1:], moments)])
    assert_close(shards, whole, "whitening shards with all-reduced moments")
    assert rl.whiten(x.float(), mask, moments).dtype == torch.float32, "output keeps x's dtype"
    with pytest.raises(ValueError):
        rl.whiten(x, prefix_mask([1, 0, 0], 4), rl.masked_moments(x, prefix_mask([1, 0, 0], 4)))


# ------------------------------------------------------------------------------ metrics, KL controller

@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_entropy_against_definition(offset):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 7, generator=g, dtype=torch.float64) * 4 + offset  # large offset: stability
    got = rl.entropy(logits)
    z = logits.numpy() - offset  # softmax is shift-invariant; the reference works on small numbers
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    expected = -(p * np.log(p)).sum(-1)
    assert got.shape == (2, 3)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-9 if offset else 1e-12)
    uniform = rl.entropy(torch.zeros(5, dtype=torch.float64))
    assert uniform.item() == pytest.approx(math.log(5), abs=1e-12), "uniform over 5 has entropy log 5"


def test_explained_variance_against_numpy():
    mask = prefix_mask([3, 5], 5)
    g = torch.Generator().manual_seed(4)
    returns = with_garbage(torch.randn(2, 5, generator=g, dtype=torch.float64), mask, NAN)
    values = with_garbage(returns + 0.3 * torch.randn(2, 5, generator=g, dtype=torch.float64), mask, 1e6)
    r, v = returns[mask].numpy(), values[mask].numpy()
    expected = 1 - np.var(r - v) / np.var(r)
    assert rl.explained_variance(values, returns, mask) == pytest.approx(expected, abs=1e-12)
    assert rl.explained_variance(returns, returns, mask) == pytest.approx(1.0, abs=1e-12), "perfect critic"
    constant = torch.where(mask, torch.ones_like(returns), returns)
    assert math.isnan(rl.explained_variance(values, constant, mask)), "constant returns: nan"


@pytest.mark.parametrize("kl,expected", [
    (9.0, 0.15 * (1 + 0.2 * 512 / 10000)),    # KL/target - 1 = 0.5, clipped to +0.2
    (3.0, 0.15 * (1 - 0.2 * 512 / 10000)),    # -0.5, clipped to -0.2
    (6.6, 0.15 * (1 + 0.1 * 512 / 10000)),    # 0.1, inside the clip
    (6.0, 0.15),                              # on target: unchanged
])
def test_adaptive_kl_coef(kl, expected):
    got = rl.adaptive_kl_coef(0.15, kl, target=6.0, n_steps=512, horizon=10000)
    assert got == pytest.approx(expected, rel=1e-12), f"kl={kl}: {got} != {expected}"
