"""Every loss in train/losses.py against an independent float64 computation of its paper's formula,
and, where TRL 1.16 has the same loss, against TRL's own code run on the same inputs.

The independent references below are written per example in plain Python `math` from the
per-token log-probabilities; they never call train.losses. TRL is driven through its real
`DPOTrainer._compute_loss` / `KTOTrainer._compute_loss` (with a stub model that returns the
per-token log-probs built here) and through the experimental CPO/ORPO loss methods.
"""
import collections
import inspect
import math
import os
import pathlib
import re
import types

import numpy as np
import pytest
import torch
import yaml

from train import losses

ROOT = pathlib.Path(__file__).resolve().parents[1]
LOSS_DIR = ROOT / "config" / "loss"
NON_HYPERPARAMETERS = set(losses.LOSS_KEYS)


def assert_close(actual, expected, rtol, atol, msg=""):
    """np.testing on tensors (torch.testing.assert_close's first call costs seconds of imports)."""
    np.testing.assert_allclose(torch.as_tensor(actual).detach().double().numpy(),
                               torch.as_tensor(expected).detach().double().numpy(), rtol=rtol, atol=atol, err_msg=msg)


def loss_yaml(name: str) -> dict:
    return yaml.safe_load((LOSS_DIR / f"{name}.yaml").read_text())


def default_hyperparameters(name: str) -> dict:
    return {k: v for k, v in loss_yaml(name).items() if k not in NON_HYPERPARAMETERS}


PAIRED_YAMLS = sorted(f.stem for f in LOSS_DIR.glob("*.yaml")
                      if yaml.safe_load(f.read_text()).get("trainer") == "PairedPreferenceTrainer")


# --------------------------------------------------------------------------------- inputs

def make_batch(seed: int = 0, batch: int = 7, prompt_len: int = 2):
    """Per-token log-probs for chosen/rejected under policy and reference, with different token counts.

    Returns a list of per-example dicts: token counts, per-token policy log-probs and the summed log-probs.
    """
    rng = np.random.default_rng(seed)
    n_w = rng.integers(1, 13, size=batch)
    n_l = rng.integers(1, 13, size=batch)
    n_l[0], n_w[0] = 1, 9  # at least one strongly unequal pair
    assert (n_w != n_l).sum() >= batch // 2
    examples = []
    for i in range(batch):
        ex = {"n_w": int(n_w[i]), "n_l": int(n_l[i])}
        for side, n in (("w", n_w[i]), ("l", n_l[i])):
            tok = -rng.uniform(0.05, 2.5, size=n)
            ref_tok = np.minimum(tok + rng.normal(0.0, 0.6, size=n), -1e-3)
            ex[f"tok_{side}"] = [float(x) for x in tok]
            ex[f"pi_{side}"] = math.fsum(ex[f"tok_{side}"])
            ex[f"ref_{side}"] = math.fsum(float(x) for x in ref_tok)
        examples.append(ex)
    return examples


def pair_logps(examples, dtype=torch.float64, requires_grad=False, reference=True) -> losses.PairLogps:
    def t(key, **kw):
        return torch.tensor([ex[key] for ex in examples], dtype=dtype, **kw)
    return losses.PairLogps(
        chosen=t("pi_w", requires_grad=requires_grad), rejected=t("pi_l", requires_grad=requires_grad),
        chosen_tokens=torch.tensor([ex["n_w"] for ex in examples]),
        rejected_tokens=torch.tensor([ex["n_l"] for ex in examples]),
        ref_chosen=t("ref_w") if reference else None, ref_rejected=t("ref_l") if reference else None)


# ------------------------------------------------------------------ independent references

def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def smoothed(z: float, e: float) -> float:
    return -(1 - e) * log_sigmoid(z) - e * log_sigmoid(-z)


def quantities(ex):
    s_w, s_l = ex["pi_w"] - ex["ref_w"], ex["pi_l"] - ex["ref_l"]
    return s_w, s_l, s_w - s_l


def ref_dpo(ex, beta):  # Rafailov et al. 2023, eq. 7
    return -log_sigmoid(beta * quantities(ex)[2])


def ref_cdpo(ex, beta, label_smoothing):  # Mitchell 2023
    return smoothed(beta * quantities(ex)[2], label_smoothing)


def ref_ipo(ex, beta):  # Azar et al. 2023, eq. 17, per-token averaged log-ratios (as TRL)
    s_w, s_l, _ = quantities(ex)
    return (s_w / ex["n_w"] - s_l / ex["n_l"] - 1 / (2 * beta)) ** 2


def ref_slic(ex, beta, lambda_coef):  # Zhao et al. 2023: max(0, delta - log P(y+) + log P(y-)) - lambda log P(y+)
    return max(0.0, beta - ex["pi_w"] + ex["pi_l"]) - lambda_coef * ex["pi_w"]


def ref_simpo(ex, beta, gamma_beta_ratio):  # Meng et al. 2024, eq. 6 with gamma = beta * gamma_beta_ratio
    gamma = beta * gamma_beta_ratio
    return -log_sigmoid(beta / ex["n_w"] * ex["pi_w"] - beta / ex["n_l"] * ex["pi_l"] - gamma)


def ref_hinge(ex, beta):
    return max(0.0, 1 - beta * quantities(ex)[2])


def ref_robust(ex, beta, label_smoothing):  # Chowdhury et al. 2024, eq. 7: ((1-e) L(z) - e L(-z)) / (1 - 2e)
    z, e = beta * quantities(ex)[2], label_smoothing
    return ((1 - e) * -log_sigmoid(z) - e * -log_sigmoid(-z)) / (1 - 2 * e)


def ref_exo_pair(ex, beta, label_smoothing):  # Ji et al. 2024, eq. 16: KL(q || p_e), K = 2
    z, e = beta * quantities(ex)[2], label_smoothing
    q = (sigmoid(z), sigmoid(-z))
    target = (1 - e, e)
    return sum(qi * (math.log(qi) - math.log(pi)) for qi, pi in zip(q, target))


def ref_nca_pair(ex, beta):  # Chen et al. 2024: -log sig(r_w) - 1/2 sum_{y in {w, l}} log sig(-r_y)
    s_w, s_l, _ = quantities(ex)
    r_w, r_l = beta * s_w, beta * s_l
    return -log_sigmoid(r_w) - 0.5 * (log_sigmoid(-r_w) + log_sigmoid(-r_l))


def ref_bco_pair(ex, beta):
    s_w, s_l, _ = quantities(ex)
    return -log_sigmoid(beta * s_w) - log_sigmoid(-beta * s_l)


def ref_sppo_hard(ex, beta):  # Wu et al. 2024, eq. 4.7, P(win) = 1 for y_w, 0 for y_l, eta = 1 / beta
    s_w, s_l, _ = quantities(ex)
    eta = 1 / beta
    return (s_w - eta * (1 - 0.5)) ** 2 + (s_l - eta * (0 - 0.5)) ** 2


def ref_apo_zero(ex, beta):  # D'Oosterlinck et al. 2024, eq. 7
    s_w, s_l, _ = quantities(ex)
    return (1 - sigmoid(beta * s_w)) + sigmoid(beta * s_l)


def ref_apo_down(ex, beta):  # eq. 8
    s_w, s_l, h = quantities(ex)
    return sigmoid(beta * s_w) + (1 - sigmoid(beta * h))


def ref_discopop(ex, beta, tau):  # Lu et al. 2024, eq. 5
    rho = beta * quantities(ex)[2]
    m = sigmoid(rho / tau)
    return (1 - m) * -log_sigmoid(rho) + m * math.exp(-rho)


def ref_sigmoid_norm(ex, beta):
    s_w, s_l, _ = quantities(ex)
    return -log_sigmoid(beta * (s_w / ex["n_w"] - s_l / ex["n_l"]))


def ref_orpo(ex, beta):  # Hong et al. 2024, eqs. 2-7: per-token NLL + lambda * -log sig(log odds ratio)
    avg_w, avg_l = ex["pi_w"] / ex["n_w"], ex["pi_l"] / ex["n_l"]
    p_w, p_l = math.exp(avg_w), math.exp(avg_l)
    log_odds_ratio = math.log(p_w / (1 - p_w)) - math.log(p_l / (1 - p_l))
    return -avg_w + beta * -log_sigmoid(log_odds_ratio)


def per_example(fn):
    return lambda examples, **hp: [fn(ex, **hp) for ex in examples]


def ref_aot(examples, beta, label_smoothing):  # Melnyk et al. 2024: sorted policy vs sorted reference margins
    policy = sorted(ex["pi_w"] - ex["pi_l"] for ex in examples)
    reference = sorted(ex["ref_w"] - ex["ref_l"] for ex in examples)
    return [smoothed(beta * (a - b), label_smoothing) for a, b in zip(policy, reference)]


def ref_aot_unpaired(examples, beta, label_smoothing):  # sorted chosen vs sorted rejected log-ratios
    chosen = sorted(quantities(ex)[0] for ex in examples)
    rejected = sorted(quantities(ex)[1] for ex in examples)
    return [smoothed(beta * (a - b), label_smoothing) for a, b in zip(chosen, rejected)]


REFERENCES = {
    "dpo": per_example(ref_dpo), "cdpo": per_example(ref_cdpo), "ipo": per_example(ref_ipo),
    "slic": per_example(ref_slic), "simpo": per_example(ref_simpo), "hinge": per_example(ref_hinge),
    "robust": per_example(ref_robust), "exo_pair": per_example(ref_exo_pair),
    "nca_pair": per_example(ref_nca_pair), "bco_pair": per_example(ref_bco_pair),
    "sppo_hard": per_example(ref_sppo_hard), "aot": ref_aot, "aot_unpaired": ref_aot_unpaired,
    "apo_zero": per_example(ref_apo_zero), "apo_down": per_example(ref_apo_down),
    "discopop": per_example(ref_discopop), "sigmoid_norm": per_example(ref_sigmoid_norm),
    "orpo": per_example(ref_orpo),
}

# A second, non-default setting of every hyperparameter of every paired loss.
ALTERNATIVE = {
    "dpo": {"beta": 0.5}, "cdpo": {"beta": 0.3, "label_smoothing": 0.05}, "ipo": {"beta": 0.5},
    "slic": {"beta": 5.0, "lambda_coef": 0.02}, "simpo": {"beta": 10.0, "gamma_beta_ratio": 0.3},
    "hinge": {"beta": 0.5}, "robust": {"beta": 0.3, "label_smoothing": 0.25},
    "exo_pair": {"beta": 0.5, "label_smoothing": 0.1}, "nca_pair": {"beta": 1.0}, "bco_pair": {"beta": 1.0},
    "sppo_hard": {"beta": 1.0}, "aot": {"beta": 0.5, "label_smoothing": 0.1},
    "aot_unpaired": {"beta": 0.5, "label_smoothing": 0.1}, "apo_zero": {"beta": 1.0}, "apo_down": {"beta": 1.0},
    "discopop": {"beta": 0.5, "tau": 0.5}, "sigmoid_norm": {"beta": 2.0}, "orpo": {"beta": 0.5},
}

ALL_PAIRED = sorted(set(losses.PAIRED_LOSSES) | set(PAIRED_YAMLS) | set(REFERENCES))


def test_every_paired_loss_has_a_yaml_a_reference_and_a_test():
    assert set(losses.PAIRED_LOSSES) == set(PAIRED_YAMLS), (
        "registered paired losses and config/loss yamls with trainer PairedPreferenceTrainer differ: "
        f"only registered {sorted(set(losses.PAIRED_LOSSES) - set(PAIRED_YAMLS))}, "
        f"only yaml {sorted(set(PAIRED_YAMLS) - set(losses.PAIRED_LOSSES))}")
    assert set(REFERENCES) == set(PAIRED_YAMLS), (
        f"paired losses without an independent reference in tests/test_losses.py: "
        f"{sorted(set(PAIRED_YAMLS) - set(REFERENCES))}")
    assert set(ALTERNATIVE) == set(PAIRED_YAMLS)


@pytest.mark.parametrize("name", ALL_PAIRED)
@pytest.mark.parametrize("setting", ["yaml", "alternative"])
def test_paired_loss_matches_independent_formula(name, setting):
    assert name in losses.PAIRED_LOSSES, f"{name}: has a yaml/reference but is not registered in PAIRED_LOSSES"
    assert name in PAIRED_YAMLS, f"{name}: registered but config/loss/{name}.yaml (PairedPreferenceTrainer) is missing"
    assert name in REFERENCES, f"{name}: no independent reference formula in tests/test_losses.py"
    hp = default_hyperparameters(name)
    fn = losses.PAIRED_LOSSES[name]
    assert set(hp) == set(fn.__code__.co_varnames[1:fn.__code__.co_argcount]), (
        f"{name}: yaml hyperparameters {sorted(hp)} do not match the function's keyword arguments")
    if setting == "alternative":
        assert set(ALTERNATIVE[name]) == set(hp), f"{name}: the alternative setting must set every hyperparameter"
        assert all(ALTERNATIVE[name][k] != hp[k] for k in hp), f"{name}: alternative equals the yaml default"
        hp = ALTERNATIVE[name]
    for seed in (0, 1):
        examples = make_batch(seed)
        reference_free = name in losses.REFERENCE_FREE
        ours = fn(pair_logps(examples, reference=not reference_free), **hp)
        expected = REFERENCES[name](examples, **hp)
        assert ours.shape == (len(examples),), f"{name}: expected one loss per pair, got shape {tuple(ours.shape)}"
        assert ours.dtype == torch.float64
        np.testing.assert_allclose(ours.detach().numpy(), expected, rtol=1e-10, atol=1e-12,
                                   err_msg=f"loss {name!r} with {hp} (seed {seed}) disagrees with its paper formula")


def test_inputs_exercise_both_hinge_branches_and_unequal_lengths():
    """Guard on the test data itself: the hinge/slic relu is active and inactive, lengths differ."""
    for name in ("hinge", "slic"):
        examples = make_batch(0) + make_batch(1)
        hp = ALTERNATIVE[name]
        values = losses.PAIRED_LOSSES[name](pair_logps(examples, reference=name != "slic"), **hp)
        if name == "hinge":
            assert (values == 0).any() and (values > 0).any()
        else:
            relu = values + hp["lambda_coef"] * torch.tensor([ex["pi_w"] for ex in examples], dtype=torch.float64)
            assert (relu == 0).any() and (relu > 0).any()
    examples = make_batch(0)
    p = pair_logps(examples)
    # averaging matters: a length-normalised loss changes when the token counts are swapped
    swapped = losses.PairLogps(p.chosen, p.rejected, p.rejected_tokens, p.chosen_tokens, p.ref_chosen, p.ref_rejected)
    for name in ("ipo", "sigmoid_norm", "simpo", "orpo"):
        hp = default_hyperparameters(name)
        assert not torch.allclose(losses.PAIRED_LOSSES[name](p, **hp), losses.PAIRED_LOSSES[name](swapped, **hp))


# ------------------------------------------------------------------------- DPO sanity, gradients

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dpo_at_identical_policy_and_reference_is_ln2(dtype):
    examples = make_batch(3)
    for ex in examples:
        ex["ref_w"], ex["ref_l"] = ex["pi_w"], ex["pi_l"]
    for beta in (0.1, 1.0, 7.0):
        out = losses.dpo(pair_logps(examples, dtype=dtype), beta=beta)
        assert torch.equal(out, torch.full_like(out, math.log(2))), out


def _grads(name, examples, hp):
    p = pair_logps(examples, requires_grad=True, reference=name not in losses.REFERENCE_FREE)
    losses.PAIRED_LOSSES[name](p, **hp).sum().backward()
    return p.chosen.grad, p.rejected.grad


@pytest.mark.parametrize("name", ["dpo", "ipo", "simpo", "orpo"])
def test_raising_the_chosen_log_prob_lowers_the_loss(name):
    hp = default_hyperparameters(name)
    identical = make_batch(4)
    for ex in identical:
        ex["ref_w"], ex["ref_l"] = ex["pi_w"], ex["pi_l"]
    batches = [identical] + ([] if name == "ipo" else [make_batch(0), make_batch(1)])
    for examples in batches:
        d_chosen, d_rejected = _grads(name, examples, hp)
        assert (d_chosen < 0).all(), f"{name}: d loss / d chosen should be negative, got {d_chosen}"
        assert (d_rejected > 0).all(), f"{name}: d loss / d rejected should be positive, got {d_rejected}"
    if name == "ipo":  # IPO's sign is that of (h_avg - 1/(2 beta)): a regression to a target margin
        examples = make_batch(0)
        d_chosen, _ = _grads(name, examples, hp)
        h_avg = torch.tensor([quantities(ex)[0] / ex["n_w"] - quantities(ex)[1] / ex["n_l"] for ex in examples],
                             dtype=torch.float64)
        assert torch.equal(torch.sign(d_chosen), torch.sign(h_avg - 1 / (2 * hp["beta"])))


def test_dpo_gradient_matches_the_closed_form():
    """d/d pi_w of -log sig(beta h) = -beta sig(-beta h)."""
    examples = make_batch(0)
    d_chosen, d_rejected = _grads("dpo", examples, {"beta": 0.3})
    expected = [-0.3 * sigmoid(-0.3 * quantities(ex)[2]) for ex in examples]
    np.testing.assert_allclose(d_chosen.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(d_rejected.numpy(), [-g for g in expected], rtol=1e-12)


# --------------------------------------------------------------------------------------- KTO

def kto_inputs(seed=0, batch=8):
    rng = np.random.default_rng(seed)
    logratios = rng.normal(0.0, 3.0, size=batch)
    desirable = np.array([True, False, True, True, False, False, True, False][:batch])
    return logratios, desirable


def ref_kto(r, desirable, z0, beta, desirable_weight, undesirable_weight):  # Ethayarajh et al. 2024, eq. 8
    if desirable:
        return desirable_weight * (1 - sigmoid(beta * (r - z0)))
    return undesirable_weight * (1 - sigmoid(beta * (z0 - r)))


@pytest.mark.parametrize("hp", [default_hyperparameters("kto"),
                                {"beta": 0.7, "desirable_weight": 1.33, "undesirable_weight": 0.5}])
def test_kto_matches_independent_formula(hp):
    assert set(hp) == {"beta", "desirable_weight", "undesirable_weight"}
    logratios, desirable = kto_inputs()
    for z0 in (0.0, 0.8, 2.5):
        ours = losses.kto(torch.tensor(logratios), torch.tensor(desirable), torch.tensor(z0, dtype=torch.float64), **hp)
        expected = [ref_kto(float(r), bool(d), z0, **hp) for r, d in zip(logratios, desirable)]
        np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-12, err_msg=f"kto {hp} z0={z0}")


def test_kto_weights_go_to_the_right_examples():
    logratios, desirable = kto_inputs()
    args = (torch.tensor(logratios), torch.tensor(desirable), torch.tensor(0.4, dtype=torch.float64))
    base = losses.kto(*args, beta=0.5, desirable_weight=1.0, undesirable_weight=1.0)
    weighted = losses.kto(*args, beta=0.5, desirable_weight=3.0, undesirable_weight=0.25)
    d = torch.tensor(desirable)
    assert_close(weighted[d], 3.0 * base[d], rtol=1e-12, atol=0)
    assert_close(weighted[~d], 0.25 * base[~d], rtol=1e-12, atol=0)
    # desirable: loss falls as the log-ratio rises; undesirable: it rises
    lr = torch.tensor(logratios, requires_grad=True)
    losses.kto(lr, d, args[2], beta=0.5, desirable_weight=1.0, undesirable_weight=1.0).sum().backward()
    assert (lr.grad[d] < 0).all() and (lr.grad[~d] > 0).all()


def test_kto_reference_point_is_detached_clamped_and_the_mean():
    kl = torch.tensor([0.5, 1.5, -0.25, 2.0], dtype=torch.float64, requires_grad=True)
    z0 = losses.kto_reference_point(kl.sum(), torch.tensor(4))
    assert not z0.requires_grad and z0.grad_fn is None
    assert z0.item() == pytest.approx(0.9375, abs=1e-15)
    # no gradient reaches the KL inputs through z0, while the log-ratios get theirs
    lr = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)
    loss = losses.kto(lr, torch.tensor([True, False]), z0, beta=0.1, desirable_weight=1.0,
                      undesirable_weight=1.0).sum()
    loss.backward()
    assert kl.grad is None and lr.grad is not None
    # clamped at zero
    negative = torch.tensor([-0.5, -1.5, 0.25], dtype=torch.float64, requires_grad=True)
    assert losses.kto_reference_point(negative.sum(), torch.tensor(3)).item() == 0.0
    # no examples: no NaN
    empty = losses.kto_reference_point(torch.tensor(0.0), torch.tensor(0))
    assert torch.isfinite(empty) and empty.item() == 0.0


# ---------------------------------------------------------------------------- Bradley-Terry

def test_bradley_terry_formula_and_equals_dpo_beta_1():
    rng = np.random.default_rng(5)
    r_w, r_l = rng.normal(0, 2, 9), rng.normal(0, 2, 9)
    ours = losses.bradley_terry(torch.tensor(r_w), torch.tensor(r_l))
    np.testing.assert_allclose(ours.numpy(), [-log_sigmoid(a - b) for a, b in zip(r_w, r_l)], rtol=1e-12)
    zeros = torch.zeros(9, dtype=torch.float64)
    as_dpo = losses.dpo(losses.PairLogps(torch.tensor(r_w), torch.tensor(r_l), torch.ones(9), torch.ones(9),
                                         zeros, zeros), beta=1.0)
    assert_close(ours, as_dpo, rtol=0, atol=0)


# ----------------------------------------------------------------------- token_logps, SFT

def test_token_logps_against_hand_log_softmax_with_shift_and_masking():
    rng = np.random.default_rng(7)
    B, T, V = 3, 7, 11
    logits = rng.normal(0, 3, size=(B, T, V))
    labels = rng.integers(0, V, size=(B, T))
    labels[:, :2] = -100  # prompt
    labels[1, 5:] = -100  # padding
    labels[2, 3] = -100  # a hole in the middle
    at_labels = torch.tensor(logits[:, :-1][labels[:, 1:] != -100], dtype=torch.float32)  # row-major order
    logps, mask = losses.token_logps(at_labels, torch.tensor(labels))
    assert logps.shape == mask.shape == (B, T - 1) and mask.dtype == torch.bool
    for b in range(B):
        for t in range(T - 1):
            label = labels[b, t + 1]  # position t predicts token t + 1
            assert bool(mask[b, t]) == (label != -100)
            if label == -100:
                assert logps[b, t].item() == 0.0
            else:
                row = logits[b, t]
                m = row.max()
                expected = row[label] - (m + math.log(sum(math.exp(x - m) for x in row)))
                assert logps[b, t].item() == pytest.approx(expected, abs=2e-5)
    # bfloat16 logits are scored in float32
    out, _ = losses.token_logps(at_labels.to(torch.bfloat16), torch.tensor(labels))
    assert out.dtype == torch.float32


def test_sft_loss_is_minus_the_masked_sum():
    logps = torch.tensor([[-0.5, -1.25, -7.0], [-2.0, -99.0, -0.125]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    loss = losses.sft_loss(logps, mask)
    assert loss.item() == 0.5 + 1.25 + 2.0 + 0.125
    loss.backward()
    assert torch.equal(logps.grad, -mask.float())


# ----------------------------------------------------------------------- reference-free

def test_reference_free_losses_ignore_the_reference():
    assert losses.REFERENCE_FREE == {"slic", "simpo", "orpo"}
    examples = make_batch(2)
    for name in losses.PAIRED_LOSSES:
        hp = default_hyperparameters(name)
        without = pair_logps(examples, reference=False)
        if name in losses.REFERENCE_FREE:
            out = losses.PAIRED_LOSSES[name](without, **hp)
            moved = pair_logps(examples)
            moved.ref_chosen, moved.ref_rejected = moved.ref_chosen + 3.0, moved.ref_rejected - 5.0
            assert_close(out, losses.PAIRED_LOSSES[name](moved, **hp), rtol=0, atol=0)
        else:
            with pytest.raises(TypeError):
                losses.PAIRED_LOSSES[name](without, **hp)


# ------------------------------------------------------------------------------- TRL 1.16

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x):
        return x

    gather = gather_for_metrics


class _StubModel:
    """Returns fixed per-token log-probs for a given input_ids tensor, plus what TRL's metrics read."""
    training = True

    def __init__(self, table):
        self.table = table  # list of (input_ids, log_probs)

    def __call__(self, input_ids, labels=None, **kwargs):
        for ids, log_probs in self.table:
            if ids.shape == input_ids.shape and torch.equal(ids, input_ids):
                return types.SimpleNamespace(
                    log_probs=log_probs, entropy=torch.zeros_like(log_probs),
                    mean_logits=torch.zeros_like(log_probs), is_top1=torch.zeros_like(log_probs, dtype=torch.bool))
        raise AssertionError("stub model called with unexpected input_ids")


def _metrics():
    return collections.defaultdict(lambda: collections.defaultdict(list))


def padded(token_lists, prompt_len=2, extra_pad=1):
    """completion_mask (rows, T) and log_probs (rows, T-1) with log_probs[:, j] the log-prob of token j+1."""
    T = prompt_len + max(len(t) for t in token_lists) + extra_pad
    mask = torch.zeros(len(token_lists), T, dtype=torch.long)
    log_probs = torch.zeros(len(token_lists), T - 1, dtype=torch.float64)
    for i, toks in enumerate(token_lists):
        mask[i, prompt_len:prompt_len + len(toks)] = 1
        log_probs[i, prompt_len - 1:prompt_len - 1 + len(toks)] = torch.tensor(toks, dtype=torch.float64)
    return mask, log_probs


TRL_DPO_LOSS_TYPES = {  # our name -> TRL DPOTrainer loss_type
    "dpo": "sigmoid", "hinge": "hinge", "ipo": "ipo", "exo_pair": "exo_pair", "nca_pair": "nca_pair",
    "robust": "robust", "bco_pair": "bco_pair", "sppo_hard": "sppo_hard", "aot": "aot",
    "aot_unpaired": "aot_unpaired", "apo_zero": "apo_zero", "apo_down": "apo_down", "discopop": "discopop",
    "sigmoid_norm": "sigmoid_norm",
}


@pytest.fixture(scope="module")
def trl_dpo():
    trl = pytest.importorskip("trl")
    assert trl.__version__ == "1.16.0", trl.__version__
    from trl import DPOTrainer
    return DPOTrainer


def run_trl_dpo(DPOTrainer, examples, loss_type, hp):
    B = len(examples)
    mask, log_probs = padded([ex["tok_w"] for ex in examples] + [ex["tok_l"] for ex in examples])
    input_ids = torch.arange(mask.numel()).view(mask.shape) % 97
    trainer = object.__new__(DPOTrainer)
    trainer.__dict__.update(
        model=_StubModel([(input_ids, log_probs)]), accelerator=_Accelerator(), aux_loss_enabled=False,
        ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type],
        loss_weights=[1.0], beta=hp["beta"], label_smoothing=hp.get("label_smoothing", 0.0), use_weighting=False,
        args=types.SimpleNamespace(discopop_tau=hp.get("tau", 0.05)), _metrics=_metrics(),
        _total_train_tokens=0, _tp_size=1)
    inputs = {
        "input_ids": input_ids, "attention_mask": torch.ones_like(mask), "completion_mask": mask,
        "ref_chosen_logps": torch.tensor([ex["ref_w"] for ex in examples], dtype=torch.float64),
        "ref_rejected_logps": torch.tensor([ex["ref_l"] for ex in examples], dtype=torch.float64),
    }
    loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    # TRL summed the same per-token log-probs we summed, and counted the same tokens
    assert trainer._metrics["train"]["logps/chosen"][-1] == pytest.approx(np.mean([ex["pi_w"] for ex in examples]))
    assert mask.chunk(2)[0].sum(1).tolist() == [ex["n_w"] for ex in examples]
    assert mask.chunk(2)[1].sum(1).tolist() == [ex["n_l"] for ex in examples]
    assert B == mask.shape[0] // 2
    return loss


@pytest.mark.parametrize("name", sorted(TRL_DPO_LOSS_TYPES))
@pytest.mark.parametrize("setting", ["yaml", "alternative"])
def test_paired_loss_matches_trl_dpo_trainer(trl_dpo, name, setting):
    hp = default_hyperparameters(name) if setting == "yaml" else ALTERNATIVE[name]
    for seed in (0, 1):
        examples = make_batch(seed)
        ours = losses.PAIRED_LOSSES[name](pair_logps(examples), **hp).mean()
        theirs = run_trl_dpo(trl_dpo, examples, TRL_DPO_LOSS_TYPES[name], hp)
        assert theirs.item() == pytest.approx(ours.item(), rel=1e-6, abs=1e-9), (
            f"{name} (TRL loss_type {TRL_DPO_LOSS_TYPES[name]!r}) with {hp}, seed {seed}: "
            f"ours {ours.item()!r} vs TRL {theirs.item()!r}")


def test_cdpo_matches_trl_cpo_label_smoothed_sigmoid():
    """TRL 1.16's DPOTrainer `sigmoid` ignores label_smoothing; CPO's `sigmoid` loss is the label-smoothed
    sigmoid of beta (a - b). Fed with the DPO log-ratios as (a, b) it is conservative DPO."""
    pytest.importorskip("trl")
    from trl.experimental.cpo import CPOTrainer
    for hp in (default_hyperparameters("cdpo"), ALTERNATIVE["cdpo"]):
        examples = make_batch(0)
        p = pair_logps(examples)
        cpo = object.__new__(CPOTrainer)
        cpo.__dict__.update(alpha=0.0, loss_type="sigmoid", beta=hp["beta"], label_smoothing=hp["label_smoothing"],
                            accelerator=_Accelerator())
        theirs, _, _ = cpo.cpo_loss(p.chosen_logratios, p.rejected_logratios)
        assert_close(losses.cdpo(p, **hp), theirs, rtol=1e-12, atol=1e-12)


def test_simpo_matches_trl_cpo_simpo():
    pytest.importorskip("trl")
    from trl.experimental.cpo import CPOTrainer
    for hp in (default_hyperparameters("simpo"), ALTERNATIVE["simpo"]):
        for seed in (0, 1):
            examples = make_batch(seed)
            cpo = object.__new__(CPOTrainer)
            # TRL's simpo_gamma is the margin gamma itself; ours is gamma / beta
            cpo.__dict__.update(alpha=0.0, loss_type="simpo", beta=hp["beta"], label_smoothing=0.0,
                                simpo_gamma=hp["beta"] * hp["gamma_beta_ratio"], accelerator=_Accelerator())
            # CPO's simpo uses average_log_prob=True log-probs (get_batch_logps averages over the response tokens)
            avg_w = torch.tensor([ex["pi_w"] / ex["n_w"] for ex in examples], dtype=torch.float64)
            avg_l = torch.tensor([ex["pi_l"] / ex["n_l"] for ex in examples], dtype=torch.float64)
            theirs, _, _ = cpo.cpo_loss(avg_w, avg_l)
            ours = losses.simpo(pair_logps(examples, reference=False), **hp)
            assert_close(ours, theirs, rtol=1e-10, atol=1e-12, msg=f"simpo {hp} seed {seed}")


def _trl_orpo():
    pytest.importorskip("trl")
    from trl.experimental.orpo import ORPOTrainer
    return ORPOTrainer


def test_orpo_odds_ratio_term_matches_trl_orpo():
    """TRL's ORPO: loss = NLL - mean(beta log sig(log odds)) with averaged log-probs. Its NLL is a token mean over
    prompt and response of the whole batch (not the paper's per-example response NLL), so only the odds-ratio term
    is compared: ours + avg_w = -TRL's `losses` per example."""
    ORPOTrainer = _trl_orpo()
    for hp in (default_hyperparameters("orpo"), ALTERNATIVE["orpo"]):
        for seed in (0, 1):
            examples = make_batch(seed)
            p = pair_logps(examples, reference=False)
            orpo = object.__new__(ORPOTrainer)
            orpo.__dict__.update(beta=hp["beta"], accelerator=_Accelerator())
            theirs, *_ = orpo.odds_ratio_loss(p.chosen_average, p.rejected_average)
            ours = losses.orpo(p, **hp) + p.chosen_average
            assert theirs.dtype == torch.float32  # odds_ratio_loss casts its inputs to float32
            assert_close(ours, -theirs.double(), rtol=1e-5, atol=1e-7, msg=f"orpo {hp} seed {seed}")


def test_orpo_float32_near_certain_responses_match_trl():
    ORPOTrainer = _trl_orpo()
    avg_w = torch.tensor([-1e-8, -1e-7, -1e-3, -0.5])
    avg_l = torch.tensor([-1e-8, -3e-7, -2.0, -1e-6])
    ones = torch.ones(4)
    p = losses.PairLogps(avg_w, avg_l, ones, ones)
    orpo = object.__new__(ORPOTrainer)
    orpo.__dict__.update(beta=0.1, accelerator=_Accelerator())
    theirs, *_ = orpo.odds_ratio_loss(avg_w.double(), avg_l.double())
    ours = losses.orpo(p, beta=0.1) + avg_w
    assert_close(ours.double(), -theirs, rtol=1e-3, atol=1e-6)


@pytest.fixture(scope="module")
def trl_kto():
    pytest.importorskip("trl")
    from trl import KTOTrainer
    return KTOTrainer


@pytest.mark.parametrize("hp", [default_hyperparameters("kto"),
                                {"beta": 0.5, "desirable_weight": 1.33, "undesirable_weight": 0.6}])
@pytest.mark.parametrize("kl_shift", [0.4, -0.4])  # positive KL estimate, and a negative one clamped to 0
def test_kto_matches_trl_kto_trainer(trl_kto, hp, kl_shift):
    rng = np.random.default_rng(11)
    B = 8
    desirable = torch.tensor([True, False, True, True, False, False, True, False])
    lengths = rng.integers(1, 10, size=B)
    toks = [list(-rng.uniform(0.05, 2.5, size=n)) for n in lengths]
    kl_toks = [toks[(i - 1) % B] for i in range(B)]  # TRL's mismatched pairs: completions cycled by one
    ref_logps = torch.tensor([sum(t) + rng.normal(0, 1.5) for t in toks], dtype=torch.float64)
    ref_kl_logps = torch.tensor([sum(t) - kl_shift * len(t) + rng.normal(0, 0.05) for t in kl_toks],
                                dtype=torch.float64)

    mask, log_probs = padded(toks)
    kl_mask, kl_log_probs = padded(kl_toks, prompt_len=3)
    input_ids = torch.arange(mask.numel()).view(mask.shape) % 50
    kl_input_ids = 50 + torch.arange(kl_mask.numel()).view(kl_mask.shape) % 50
    trainer = object.__new__(trl_kto)
    trainer.__dict__.update(
        model=_StubModel([(input_ids, log_probs), (kl_input_ids, kl_log_probs)]), accelerator=_Accelerator(),
        calculate_KL=True, aux_loss_enabled=False, precompute_ref_logps=True, loss_type="kto",
        beta=hp["beta"], desirable_weight=hp["desirable_weight"], undesirable_weight=hp["undesirable_weight"],
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None), _metrics=_metrics(),
        _total_train_tokens=0, _tp_size=1)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(mask), "completion_mask": mask,
             "KL_input_ids": kl_input_ids, "KL_attention_mask": torch.ones_like(kl_mask),
             "KL_completion_mask": kl_mask, "label": desirable, "ref_logps": ref_logps, "ref_KL_logps": ref_kl_logps}
    theirs = trainer._compute_loss(trainer.model, batch, return_outputs=False)

    logps = torch.tensor([math.fsum(t) for t in toks], dtype=torch.float64)
    kl_logps = torch.tensor([math.fsum(t) for t in kl_toks], dtype=torch.float64)
    z0 = losses.kto_reference_point((kl_logps - ref_kl_logps).sum(), torch.tensor(B))
    assert (z0.item() > 0) == (kl_shift > 0)
    assert trainer._metrics["train"]["kl"][-1] == pytest.approx(z0.item(), abs=1e-12)
    ours = losses.kto(logps - ref_logps, desirable, z0, **hp).mean()
    assert theirs.item() == pytest.approx(ours.item(), rel=1e-10, abs=1e-12), (
        f"kto {hp} kl_shift {kl_shift}: ours {ours.item()!r} vs TRL {theirs.item()!r}")


def test_trl_dpo_coverage_is_complete(trl_dpo):
    """Every TRL DPOTrainer loss type except `sft` has a counterpart here, and every counterpart is registered."""
    source = inspect.getsource(trl_dpo._compute_loss)
    trl_types = set(re.findall(r'loss_type == "(\w+)"', source))
    assert trl_types - {"sft"} == set(TRL_DPO_LOSS_TYPES.values())
    assert set(TRL_DPO_LOSS_TYPES) <= set(losses.PAIRED_LOSSES)
