"""dpo_loss is exact: every loss type equals its formula on hand-made tensors (expected values worked out by hand,
the expression beside each number), the invariants between losses hold, gradients point where each loss says,
and token_logps equals a naive log-softmax gather in float32 and bfloat16, chunked or not."""
import dataclasses
import math

import pytest
import torch

from dpo_loss import LOSS_TYPES, LOSSES, OPTIONS, Loss, preference_loss, preference_metrics, token_logps

LN2 = math.log(2)

# Two hand-made pairs, beta = 0.5.
# Row 0: chosen log-ratio -2 - (-3) = 1, rejected -6 - (-5) = -1, so the margin h = 2 and beta h = 1.
#        Per token (lengths 2 and 4): chosen -1 - (-1.5) = 0.5, rejected -1.5 - (-1.25) = -0.25, h = 0.75.
# Row 1: policy equals reference (step 0 of training): every log-ratio and margin is 0.
BETA = 0.5
PAIRS = dict(policy_chosen_logps=[-2.0, -4.0], policy_rejected_logps=[-6.0, -4.0], ref_chosen_logps=[-3.0, -4.0],
             ref_rejected_logps=[-5.0, -4.0], chosen_lengths=[2, 2], rejected_lengths=[4, 2])


def pairs(**overrides):
    values = {**PAIRS, **overrides}
    return {k: None if v is None else torch.tensor(v, dtype=torch.int64 if "lengths" in k else torch.float64)
            for k, v in values.items()}


def run(loss_type, beta=BETA, **options):
    return preference_loss(loss_type, **pairs(), beta=beta, **options)


# softplus(x) = log(1 + e^x) = -log sigma(-x), so -log sigma(z) = softplus(-z).
CLOSED_FORM = [
    ("sigmoid", {}, [0.31326168751822286, LN2]),  # softplus(-1), softplus(0)
    ("sigmoid", dict(label_smoothing=0.1), [0.4132616875182229, LN2]),  # 0.9 softplus(-1) + 0.1 softplus(1)
    ("robust", dict(label_smoothing=0.1), [0.1882616875182229, LN2]),  # (0.9 softplus(-1) - 0.1 softplus(1)) / 0.8
    ("hinge", {}, [0.0, 1.0]),  # max(0, 1 - 1), max(0, 1 - 0)
    ("ipo", {}, [0.0625, 1.0]),  # (0.75 - 1/(2 * 0.5))^2, (0 - 1)^2
    ("ipo_sum", {}, [1.0, 1.0]),  # the same on sums: (2 - 1)^2, (0 - 1)^2
    # exo_pair, eps = 1e-3 by default: s(1) (log s(1) - log(1 - eps)) + s(-1) (log s(-1) - log eps);
    # row 1: 0.5 (log 0.5 - log(1 - eps)) + 0.5 (log 0.5 - log eps). s is the logistic sigmoid.
    ("exo_pair", {}, [1.2763098386691134, 2.761230709097915]),
    ("exo_pair", dict(label_smoothing=0.1), [0.1140821076674979, 0.5108256237659905]),  # the same with eps = 0.1
    ("nca_pair", {}, [1.1981539683602134, 2 * LN2]),  # softplus(-0.5) + 0.5 softplus(0.5) + 0.5 softplus(-0.5)
    ("bco_pair", {}, [0.9481539683602134, 2 * LN2]),  # delta = mean reward (0.5 - 0.5 + 0 + 0)/4 = 0: 2 softplus(-0.5)
    # bco_pair, delta 0.25: softplus(-0.25) + softplus(-0.75); row 1: softplus(0.25) + softplus(-0.25)
    ("bco_pair", dict(bco_delta=0.25), [0.9628104259937436, 1.4018788397576871]),
    ("sppo_hard", {}, [0.0, 2.0]),  # (1 - 1)^2 + (-1 + 1)^2, (0 - 1)^2 + (0 + 1)^2
    # aot sorts over the batch: policy margins (4, 0) -> (0, 4), reference margins (2, 0) -> (0, 2), delta (0, 2)
    ("aot", {}, [LN2, 0.31326168751822286]),  # softplus(0), softplus(-0.5 * 2)
    # aot_unpaired: chosen log-ratios (1, 0) -> (0, 1), rejected (-1, 0) -> (-1, 0), delta (1, 1)
    ("aot_unpaired", {}, [0.4740769841801067, 0.4740769841801067]),  # softplus(-0.5)
    ("apo_zero", {}, [0.7550813375962908, 1.0]),  # 1 - s(0.5) + s(-0.5); 1 - 0.5 + 0.5
    ("apo_down", {}, [0.8914007525718496, 1.0]),  # s(0.5) + 1 - s(1); 0.5 + 1 - 0.5
    ("discopop", {}, [0.3678794410588668, 0.8465735902799727]),  # softplus(-1)(1 - s(20)) + e^-1 s(20); (ln 2 + 1)/2
    ("sigmoid_norm", {}, [0.52312326413984, LN2]),  # softplus(-0.5 * 0.75)
    # simpo: mean log-probs -2/2 = -1 and -6/4 = -1.5, so beta * 0.5 - gamma = 0.25 - 0.5; row 1: -2, -2
    ("simpo", {}, [0.8259394198788436, 0.9740769841801067]),  # softplus(0.25), softplus(0.5)
    ("sft", {}, [1.0, 2.0]),  # -(-2)/2, -(-4)/2
    ("sigmoid", dict(rpo_alpha=1.0), [1.3132616875182228, LN2 + 2]),  # sigmoid + 1.0 * sft
    ("sigmoid", dict(reference_free=True), [0.1269280110429725, LN2]),  # h = -2 - (-6) = 4: softplus(-2)
    # f-DPO margins with log-ratios (1, -1): forward KL (1 - e^-1) - (1 - e) = e - 1/e; JS logsig(1) - logsig(-1) = 1;
    # alpha 0.5: ((1 - e^-0.5) - (1 - e^0.5)) / 0.5 = 4 sinh(0.5)
    ("sigmoid", dict(f_divergence_type="forward_kl"), [0.26907771988202195, LN2]),  # softplus(-0.5 (e - 1/e))
    ("sigmoid", dict(f_divergence_type="js_divergence"), [0.4740769841801067, LN2]),  # softplus(-0.5)
    ("sigmoid", dict(f_divergence_type="alpha_divergence"), [0.30208873215374477, LN2]),  # softplus(-2 sinh(0.5))
]


@pytest.mark.parametrize("loss_type,options,expected", CLOSED_FORM,
                         ids=[f"{t}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for t, o, _ in CLOSED_FORM])
def test_closed_form_values(loss_type, options, expected):
    losses, _, _ = run(loss_type, **options)
    for got, want in zip(losses.tolist(), expected):
        assert got == pytest.approx(want, rel=1e-12, abs=1e-12)


# The 2 x 2 matrix log pi(response | prompt): rows x, x'; columns y+ (sampled for x), y- (sampled for x').
MATRIX = [[[-1.0, -4.0], [-2.0, -1.5]]]


def contrastive(loss_type, **options):
    matrix = torch.tensor(MATRIX, dtype=torch.float64)
    chosen, rejected = matrix[:, 0, 0], matrix[:, 0, 1]  # y+ and y- under x: what the DPO losses see
    return preference_loss(loss_type, chosen, rejected, None, None, torch.tensor([1]), torch.tensor([1]), beta=BETA,
                           logps_matrix=matrix, **options)


def test_bco_default_delta_is_the_mean_reward_of_the_batch():
    # Rejected log-ratio of row 0 becomes -6 - (-7) = 1: rewards (0.5, 0.5) and (0, 0), mean delta 0.25, so both rows
    # are -log s(0.5 - 0.25) - log s(-(0.5 - 0.25)) = -log s(-0.25) - log s(0.25) = softplus(0.25) + softplus(-0.25).
    losses, _, _ = preference_loss("bco_pair", **pairs(ref_rejected_logps=[-7.0, -4.0]), beta=BETA)
    assert losses.tolist() == pytest.approx([1.4018788397576871] * 2, rel=1e-12)


def test_infonce_closed_form():
    # y+: x (-1) against x' (-2), target x: softplus(-1); y-: x' (-1.5) against x (-4), target x': softplus(-2.5)
    assert contrastive("infonce")[0].item() == pytest.approx(0.19607571090538625, rel=1e-12)  # mean of the two
    # temperature 2 halves every difference: (softplus(-0.5) + softplus(-1.25)) / 2
    assert contrastive("infonce", temperature=2.0)[0].item() == pytest.approx(0.3630030327627398, rel=1e-12)


def test_infonce_defaults_to_the_official_temperature_of_100_and_sami_to_1():
    from bookkeeping import config
    settings = lambda *flags: config.loss_config(config.train_parser().parse_args(list(flags)))
    assert settings("--loss", "infonce").temperature == 100.0  # openrlhf/models/loss.py of the official trainer
    assert settings("--loss", "sami").temperature == 1.0
    assert settings("--loss", "infonce", "--loss-temperature", "2").temperature == 2.0
    assert config.LossConfig(loss="infonce").temperature == 100.0
    # at T = 100 every difference shrinks 100-fold: (softplus(-0.01) + softplus(-0.025)) / 2
    expected = (math.log1p(math.exp(-0.01)) + math.log1p(math.exp(-0.025))) / 2
    assert contrastive("infonce", temperature=100.0)[0].item() == pytest.approx(expected, rel=1e-12)


def test_sami_closed_form():
    # rows: x picks y+ (-1) over y- (-4): softplus(-3); x' picks y- (-1.5) over y+ (-2): softplus(-0.5).
    # columns as in infonce. SAMI = (row mean + column mean) / 2.
    assert contrastive("sami")[0].item() == pytest.approx(0.2287039393911553, rel=1e-12)


def test_rewards_are_beta_times_the_log_ratio_the_loss_uses():
    _, chosen, rejected = run("sigmoid")
    assert chosen.tolist() == [0.5, 0.0] and rejected.tolist() == [-0.5, 0.0]  # 0.5 * (1, 0), 0.5 * (-1, 0)
    _, chosen, rejected = run("ipo")  # per token: 0.5 * 0.5, 0.5 * -0.25
    assert chosen.tolist() == [0.25, 0.0] and rejected.tolist() == [-0.125, 0.0]
    _, chosen, rejected = run("simpo")  # no reference: 0.5 * mean log-prob
    assert chosen.tolist() == [-0.5, -1.0] and rejected.tolist() == [-0.75, -1.0]
    assert not chosen.requires_grad


# ---------------------------------------------------------------------------------------------------------------
# Invariants


def random_pairs(B=64, seed=0, **overrides):
    generator = torch.Generator().manual_seed(seed)
    logps = [-(torch.rand(B, generator=generator, dtype=torch.float64) * 80 + 1) for _ in range(4)]
    lengths = [torch.randint(1, 60, (B,), generator=generator) for _ in range(2)]
    values = dict(zip(["policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
                       "chosen_lengths", "rejected_lengths"], logps + lengths))
    return {**values, **overrides}


@pytest.mark.parametrize("loss_type", ["sigmoid", "sigmoid_norm", "robust"])
def test_zero_margin_gives_ln2(loss_type):
    # Step 0 of MIPO training: the policy is the reference, every reward is 0, sigmoid DPO is ln 2.
    inputs = random_pairs()
    inputs["ref_chosen_logps"] = inputs["policy_chosen_logps"]
    inputs["ref_rejected_logps"] = inputs["policy_rejected_logps"]
    losses, chosen_rewards, rejected_rewards = preference_loss(loss_type, **inputs, beta=0.1)
    torch.testing.assert_close(losses, torch.full_like(losses, LN2), rtol=1e-12, atol=1e-12)
    assert (chosen_rewards == 0).all() and (rejected_rewards == 0).all()


def test_robust_without_smoothing_is_sigmoid():
    inputs = random_pairs()
    torch.testing.assert_close(preference_loss("robust", **inputs)[0], preference_loss("sigmoid", **inputs)[0])


def test_robust_is_unbiased_for_the_clean_loss():
    # Chowdhury et al.: averaging the robust loss over the label flipped with probability eps (the chosen/rejected
    # swapped) gives back the clean sigmoid loss.
    inputs, eps = random_pairs(), 0.2
    swapped = dict(inputs, policy_chosen_logps=inputs["policy_rejected_logps"],
                   policy_rejected_logps=inputs["policy_chosen_logps"], ref_chosen_logps=inputs["ref_rejected_logps"],
                   ref_rejected_logps=inputs["ref_chosen_logps"])
    robust = ((1 - eps) * preference_loss("robust", **inputs, label_smoothing=eps)[0]
              + eps * preference_loss("robust", **swapped, label_smoothing=eps)[0])
    torch.testing.assert_close(robust, preference_loss("sigmoid", **inputs)[0])


def test_ipo_is_minimal_at_normalized_margin_one_over_two_beta():
    beta = 0.25  # target per-token margin 1 / (2 beta) = 2
    lengths = torch.tensor([3, 5, 4], dtype=torch.int64)
    shift = torch.tensor([-0.5, 0.0, 0.5], dtype=torch.float64)  # per-token margin = 2 + shift
    ref = torch.tensor([-7.0, -9.0, -8.0], dtype=torch.float64)
    chosen = (ref / lengths + 2 + shift).mul(lengths).requires_grad_()  # chosen log-ratio per token: 2 + shift
    losses, _, _ = preference_loss("ipo", chosen, ref.clone(), ref, ref.clone(), lengths, lengths, beta=beta)
    torch.testing.assert_close(losses, shift ** 2)
    losses.sum().backward()
    assert chosen.grad[1] == 0 and chosen.grad[0] < 0 < chosen.grad[2]  # below target: push up; above: push down


def softplus(x: float) -> float:  # log(1 + e^x) = -log sigma(-x), in Python floats: no code path shared with dpo_loss
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def test_simpo_with_gamma_zero_is_reference_free_length_normalized_dpo():
    # -log sigma(beta (log pi(y+) / |y+| - log pi(y-) / |y-|)), pair by pair, rewards beta * the mean log-prob
    inputs = random_pairs()
    losses, chosen_rewards, rejected_rewards = preference_loss("simpo", **inputs, beta=2.0, simpo_gamma=0.0)
    rows = list(zip(*(inputs[k].tolist() for k in ("policy_chosen_logps", "policy_rejected_logps", "chosen_lengths",
                                                  "rejected_lengths"))))
    assert losses.tolist() == pytest.approx([softplus(-2.0 * (c / c_n - r / r_n)) for c, r, c_n, r_n in rows],
                                            rel=1e-12)
    assert chosen_rewards.tolist() == pytest.approx([2.0 * c / c_n for c, _, c_n, _ in rows], rel=1e-12)
    assert rejected_rewards.tolist() == pytest.approx([2.0 * r / r_n for _, r, _, r_n in rows], rel=1e-12)


def test_alpha_divergence_spans_reverse_and_forward_kl():
    inputs = random_pairs(B=16)
    inputs = {k: v / 20 if v.is_floating_point() else v for k, v in inputs.items()}  # ratios near 1: no saturation
    forward = preference_loss("sigmoid", **inputs, f_divergence_type="forward_kl")[0]
    alpha_one = preference_loss("sigmoid", **inputs, f_divergence_type="alpha_divergence",
                                f_alpha_divergence_coef=1.0)[0]
    torch.testing.assert_close(alpha_one, forward)
    reverse = preference_loss("sigmoid", **inputs)[0]
    near_zero = preference_loss("sigmoid", **inputs, f_divergence_type="alpha_divergence",
                                f_alpha_divergence_coef=1e-7)[0]
    torch.testing.assert_close(near_zero, reverse, rtol=1e-5, atol=1e-6)


def test_ipo_and_sigmoid_norm_equal_the_summed_losses_on_per_token_inputs():
    inputs = random_pairs()
    ones = torch.ones_like(inputs["chosen_lengths"])
    per_token = dict(inputs, chosen_lengths=ones, rejected_lengths=ones)
    for side in ("chosen", "rejected"):
        for name in (f"policy_{side}_logps", f"ref_{side}_logps"):
            per_token[name] = inputs[name] / inputs[f"{side}_lengths"]
    torch.testing.assert_close(preference_loss("ipo", **inputs)[0], preference_loss("ipo_sum", **per_token)[0])
    torch.testing.assert_close(preference_loss("sigmoid_norm", **inputs)[0], preference_loss("sigmoid", **per_token)[0])


def test_aot_equals_sigmoid_when_both_margins_are_already_in_the_same_order():
    # Sorting pairs the i-th smallest with the i-th smallest; if the rows already agree, AOT is row-wise DPO:
    # -log sigma(beta (policy margin - reference margin)) = softplus(-0.1 * (2, 0.5, 1)).
    policy_margin = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)
    ref_margin = torch.tensor([-3.0, 0.0, 1.0], dtype=torch.float64)
    zeros = torch.zeros(3, dtype=torch.float64)
    losses = preference_loss("aot", policy_margin, zeros, ref_margin, zeros, None, None)[0]
    assert losses.tolist() == pytest.approx([softplus(-0.2), softplus(-0.05), softplus(-0.1)], rel=1e-12)
    # Out of order, the rows are re-paired: policy (2, -1, 0.5) sorts to (-1, 0.5, 2) against (-3, 0, 1) as above.
    losses = preference_loss("aot", policy_margin[[2, 0, 1]], zeros, ref_margin, zeros, None, None)[0]
    assert losses.tolist() == pytest.approx([softplus(-0.2), softplus(-0.05), softplus(-0.1)], rel=1e-12)


def test_discopop_stays_finite_for_very_negative_margins():
    # exp(-beta h) alone overflows float32 here; the formula multiplies it by sigma(beta h / tau) ~ 0. At
    # l = beta h = 0.1 * (-2000 - (-1) - 0) = -199.9 (in float32), sigma(-l / tau) = 1 and sigma(l / tau) = e^-3998:
    # the loss is softplus(199.9) = 199.9, the logistic term alone.
    chosen = torch.tensor([-2000.0])
    losses = preference_loss("discopop", chosen, torch.tensor([-1.0]), torch.tensor([-1.0]), torch.tensor([-1.0]),
                             None, None)[0]
    assert losses.item() == pytest.approx(199.9, rel=1e-6)


def test_sami_row_term_is_reference_free_dpo_and_column_term_is_infonce():
    # The row cross-entropy for prompt x is -log sigma(log pi(y+|x) - log pi(y-|x)): reference-free DPO at beta 1.
    matrix = torch.tensor(MATRIX, dtype=torch.float64)
    infonce = contrastive("infonce")[0]
    row_x = preference_loss("sigmoid", matrix[:, 0, 0], matrix[:, 0, 1], None, None, None, None, beta=1.0,
                            reference_free=True)[0]
    row_x_prime = preference_loss("sigmoid", matrix[:, 1, 1], matrix[:, 1, 0], None, None, None, None, beta=1.0,
                                  reference_free=True)[0]
    torch.testing.assert_close(contrastive("sami")[0], ((row_x + row_x_prime) / 2 + infonce) / 2)


# ---------------------------------------------------------------------------------------------------------------
# Gradients: chosen up, rejected down, where the loss says so


PUSH_BOTH = ["sigmoid", "robust", "hinge", "ipo", "ipo_sum", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
             "aot_unpaired", "apo_zero", "sigmoid_norm", "simpo"]


@pytest.mark.parametrize("loss_type", PUSH_BOTH)
def test_gradient_raises_chosen_and_lowers_rejected(loss_type):
    # At zero margin (policy = reference, the start of training) every one of these losses wants a positive margin.
    logps = torch.tensor([-10.0, -20.0, -15.0], dtype=torch.float64)
    chosen, rejected = logps.clone().requires_grad_(), logps.flip(0).clone().requires_grad_()
    lengths = torch.tensor([4, 6, 5])
    options = dict(label_smoothing=0.1) if loss_type == "robust" else {}
    losses, _, _ = preference_loss(loss_type, chosen, rejected, logps.clone(), logps.flip(0).clone(), lengths, lengths,
                                   **options)
    losses.sum().backward()
    # descent moves log-probs along -grad: chosen up needs grad < 0, rejected down needs grad > 0
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all(), (chosen.grad, rejected.grad)


def test_discopop_raises_a_negative_margin_but_not_a_zero_one():
    # DiscoPOP is not monotone in the margin (Lu et al. 2024 discuss its non-convexity): at beta h = 0 the exponential
    # term switching on (slope 1/(4 tau) = 5) outweighs the logistic one, so a tie is pushed toward a NEGATIVE margin;
    # at beta h = -1 the loss is the logistic one and pushes the chosen up. d/dl at 0: -1/4 - ln2 * 5 - 1/2 + 5.
    slopes = []
    for chosen_logratio in (0.0, -10.0):  # beta h = 0 and -1 at beta 0.1
        chosen = torch.tensor([chosen_logratio], dtype=torch.float64, requires_grad=True)
        zero = torch.zeros(1, dtype=torch.float64)
        preference_loss("discopop", chosen, zero, zero.clone(), zero.clone(), None, None)[0].sum().backward()
        slopes.append(chosen.grad.item() / 0.1)  # dL/d(beta h)
    assert slopes[0] == pytest.approx(-0.25 - LN2 * 5 - 0.5 + 5, rel=1e-9)
    assert slopes[1] < 0


def test_apo_down_lowers_both_when_the_chosen_leads():
    chosen = torch.tensor([0.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([-8.0], dtype=torch.float64, requires_grad=True)  # log-ratios 0 and -8
    zero = torch.zeros(1, dtype=torch.float64)
    preference_loss("apo_down", chosen, rejected, zero, zero.clone(), None, None, beta=0.5)[0].sum().backward()
    # d/dc = beta (s'(beta c) - s'(beta (c - r))) = 0.5 (0.25 - s'(4)) > 0; d/dr = beta s'(4) > 0
    assert chosen.grad.item() > 0 and rejected.grad.item() > 0


def test_sft_only_touches_the_chosen():
    chosen = torch.tensor([-6.0], requires_grad=True)
    rejected = torch.tensor([-3.0], requires_grad=True)
    losses, _, _ = preference_loss("sft", chosen, rejected, None, None, torch.tensor([3]), None)
    losses.sum().backward()
    assert chosen.grad.item() == pytest.approx(-1 / 3) and rejected.grad is None


@pytest.mark.parametrize("loss_type", ["infonce", "sami"])
def test_contrastive_gradient_raises_true_pairs_and_lowers_swapped(loss_type):
    matrix = torch.tensor(MATRIX, requires_grad=True)
    losses, _, _ = preference_loss(loss_type, matrix[:, 0, 0], matrix[:, 0, 1], None, None, None, None,
                                   logps_matrix=matrix)
    losses.sum().backward()
    grad = matrix.grad[0]
    assert grad[0, 0] < 0 and grad[1, 1] < 0 and grad[0, 1] > 0 and grad[1, 0] > 0, grad


# ---------------------------------------------------------------------------------------------------------------
# Errors: one clear line that lists the valid choices


@pytest.mark.parametrize("call,message", [
    (lambda: run("dpo"), "choose one of: sigmoid, robust"),
    (lambda: run("sigmoid", label_smoothin=0.1), "valid options: label_smoothing"),
    (lambda: run("sigmoid", beta=0.0), "beta must be > 0"),
    (lambda: run("sigmoid", beta=-1.0), "beta must be > 0"),
    (lambda: run("sigmoid", label_smoothing=0.5), r"\[0, 0.5\)"),
    (lambda: run("robust", label_smoothing=-0.1), r"\[0, 0.5\)"),
    (lambda: run("hinge", label_smoothing=0.1), "it applies to: sigmoid, robust"),
    (lambda: run("sigmoid", f_divergence_type="kl"), "choose one of: reverse_kl, forward_kl"),
    (lambda: run("nca_pair", f_divergence_type="js_divergence"), "use reverse_kl with 'nca_pair'"),
    (lambda: run("sigmoid", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.0), "must be > 0"),
    (lambda: run("sigmoid", rpo_alpha=-1.0), "rpo_alpha must be None or >= 0"),
    (lambda: run("discopop", discopop_tau=0.0), "discopop_tau must be > 0"),
    (lambda: run("simpo", simpo_gamma=-0.5), "simpo_gamma must be >= 0"),
    (lambda: run("infonce"), r"needs logps_matrix of shape \(2, 2, 2\)"),
    (lambda: preference_loss("sigmoid", **pairs(ref_chosen_logps=None)), "reference_free=True"),
    (lambda: preference_loss("ipo", **pairs(chosen_lengths=[2, 0])), "at least one completion token"),
    (lambda: preference_loss("sigmoid", **pairs(policy_rejected_logps=[1.0, 2.0, 3.0])), "every input must be"),
])
def test_bad_input_is_one_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_every_loss_type_runs_and_the_option_table_is_complete():
    inputs = random_pairs(B=4)
    matrix = torch.stack([inputs["policy_chosen_logps"], inputs["policy_rejected_logps"],
                          inputs["policy_chosen_logps"] - 3, inputs["policy_rejected_logps"] + 3], dim=-1).view(4, 2, 2)
    for loss_type in LOSS_TYPES:
        losses, chosen_rewards, rejected_rewards = preference_loss(loss_type, **inputs, logps_matrix=matrix)
        assert losses.shape == chosen_rewards.shape == rejected_rewards.shape == (4,)
        assert torch.isfinite(losses).all(), loss_type
    assert set(OPTIONS) == {"label_smoothing", "reference_free", "rpo_alpha", "f_divergence_type",
                            "f_alpha_divergence_coef", "discopop_tau", "simpo_gamma", "bco_delta", "temperature",
                            "logps_matrix"}


# ---------------------------------------------------------------------------------------------------------------
# The table: one row per loss, and preference_loss demands exactly what the row says


def table_inputs(B=4):
    inputs = random_pairs(B=B)
    matrix = torch.stack([inputs["policy_chosen_logps"], inputs["policy_rejected_logps"],
                          inputs["policy_chosen_logps"] - 3, inputs["policy_rejected_logps"] + 3], dim=-1).view(B, 2, 2)
    return inputs, matrix


def test_every_loss_type_has_a_row_and_mipo_comes_first():
    assert LOSS_TYPES == tuple(LOSSES) and LOSS_TYPES[0] == "sigmoid"
    assert all(isinstance(row, Loss) and callable(row.fn) for row in LOSSES.values())
    inputs, matrix = table_inputs()
    for loss_type, row in LOSSES.items():  # a row's defaults are options its loss accepts
        assert set(row.defaults) <= set(OPTIONS), loss_type
        preference_loss(loss_type, **inputs, logps_matrix=matrix, **row.defaults)
    assert LOSSES["infonce"].defaults == {"temperature": 100.0} and LOSSES["sami"].defaults == {"temperature": 1.0}


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_preference_loss_calls_the_function_of_the_row(loss_type, monkeypatch):
    inputs, matrix = table_inputs()
    expected = preference_loss(loss_type, **inputs, logps_matrix=matrix)[0]
    row, calls = LOSSES[loss_type], []

    def spy(**context):
        calls.append(context)
        return row.fn(**context)

    monkeypatch.setitem(LOSSES, loss_type, dataclasses.replace(row, fn=spy))
    assert torch.equal(preference_loss(loss_type, **inputs, logps_matrix=matrix)[0], expected)
    assert len(calls) == 1  # every loss gets the same keywords, whatever it reads of them
    assert set(calls[0]) == {"margin", "chosen_logratios", "rejected_logratios", "logps", "chosen_lengths", "beta",
                             *OPTIONS}


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_the_row_says_what_preference_loss_demands(loss_type):
    row, (inputs, matrix) = LOSSES[loss_type], table_inputs()

    def runs(options=None, **overrides):  # True if preference_loss accepts these inputs, False if it refuses them
        try:
            preference_loss(loss_type, **{**inputs, **overrides}, **{"logps_matrix": matrix, **(options or {})})
            return True
        except ValueError:
            return False

    assert runs(ref_chosen_logps=None, ref_rejected_logps=None) == row.reference_free
    assert runs(options=dict(logps_matrix=None)) == (not row.negative_prompt)
    assert runs(rejected_lengths=None) == (not row.per_token)
    assert runs(chosen_lengths=None) == (not (row.per_token or row.token_mean))
    assert runs(options=dict(label_smoothing=0.1)) == row.smoothed
    assert runs(options=dict(f_divergence_type="js_divergence")) == row.f_divergence
    # a batch-coupled loss computes something else on a part of the batch; any other is pair by pair
    whole = preference_loss(loss_type, **inputs, logps_matrix=matrix)[0][:2]
    part = preference_loss(loss_type, **{k: v[:2] for k, v in inputs.items()}, logps_matrix=matrix[:2])[0]
    assert torch.allclose(whole, part, rtol=1e-12, atol=0) != row.batch_coupled


# ---------------------------------------------------------------------------------------------------------------
# Metrics


def test_metrics_use_the_ecosystem_names_and_values():
    _, chosen_rewards, rejected_rewards = run("sigmoid")  # (0.5, 0) and (-0.5, 0)
    p = pairs()
    metrics = preference_metrics(chosen_rewards, rejected_rewards, p["policy_chosen_logps"], p["policy_rejected_logps"],
                                 p["chosen_lengths"], p["rejected_lengths"])
    assert metrics == pytest.approx({
        "rewards/chosen": 0.25, "rewards/rejected": -0.25, "rewards/margins": 0.5,
        "rewards/accuracies": 0.5,  # row 0 wins; row 1 ties, and a tie is not a win
        "logps/chosen": -3.0, "logps/rejected": -5.0,  # sums: (-2 - 4)/2, (-6 - 4)/2
        "logps/chosen_per_token": -1.5, "logps/rejected_per_token": -1.75,  # (-1 - 2)/2, (-1.5 - 2)/2
        "lengths/chosen": 2.0, "lengths/rejected": 3.0,
        "nll_loss": 1.5,  # (1 + 2)/2, the sft losses
    })


# ---------------------------------------------------------------------------------------------------------------
# token_logps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_tokens", [1, 4, 1024])
def test_token_logps_and_its_gradient_equal_a_naive_gather(dtype, chunk_tokens):
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(9, 50, generator=generator) * 4).to(dtype)  # (N, V)
    targets = torch.randint(0, 50, (9,), generator=generator)
    ours, naive = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    values = token_logps(ours, targets, chunk_tokens=chunk_tokens)
    expected = torch.log_softmax(naive.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    assert values.dtype == torch.float32
    torch.testing.assert_close(values, expected, rtol=1e-6, atol=1e-5)
    weights = torch.linspace(-2, 1, 9)
    (values * weights).sum().backward()
    (expected * weights).sum().backward()
    assert ours.grad.dtype == dtype
    torch.testing.assert_close(ours.grad, naive.grad)
