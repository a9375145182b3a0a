"""The preference losses MIPO trains with, and the ones it is compared or ablated against: pure functions of
per-sequence log-probabilities. No models, files or devices here.

MIPO (Nam, Li, Jaques 2026, arXiv 2603.19294) is plain sigmoid DPO: beta 0.1, summed log-probs, the frozen base
model as the reference. Every other loss is an ablation, selected by name, the training loop otherwise unchanged:

    losses, chosen_rewards, rejected_rewards = preference_loss("sigmoid", policy_chosen_logps, ...)

Names and semantics follow TRL's DPOTrainer (v0.27 `dpo_loss`), so runs compare; `sft`, `infonce` and `sami` are
the MIPO paper's baselines. A loss is a function plus a row of LOSSES; docs/losses.md has the formulas, where we
differ from TRL, and how to add one.

Conventions (all tensors (B,), one entry per preference pair):
- log-probs are SUMS over completion tokens (train.forward_logps); lengths count those tokens. per_token losses
  divide by the length themselves, so every loss takes the same inputs.
- log-ratio = log pi(y|x) - log pi_ref(y|x); the reference term is dropped for reference_free losses or with
  reference_free=True, and ref_* may then be None.
- rewards = beta * that log-ratio, detached (DPO Eq. 5), on the loss's scale; `losses` is per pair (the loop
  takes losses.mean()).

Shape legend: B pairs in the batch, T tokens per sequence, V vocabulary, C positions per chunk.
"""
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

OPTIONS = dict(                 # the defaults of every option preference_loss accepts
    label_smoothing=0.0,        # cDPO / robust DPO: probability that a label is flipped; EXO's epsilon
    reference_free=False,       # drop pi_ref: the reference assigns every response the same probability
    rpo_alpha=None,             # RPO: add rpo_alpha * (token-mean NLL of the chosen response)
    f_divergence_type="reverse_kl",  # f-DPO: which divergence to the reference the margin comes from
    f_alpha_divergence_coef=0.5,     # f-DPO's alpha, for alpha_divergence (alpha -> 0: reverse KL, 1: forward KL)
    discopop_tau=0.05,          # DiscoPOP's temperature (the paper's value)
    simpo_gamma=0.5,            # SimPO's target margin gamma (TRL's default; the paper tunes it per model)
    bco_delta=None,             # BCO's reward shift; None: the mean reward of this batch
    temperature=1.0,            # infonce / sami: log-probs are divided by it before the softmax
    logps_matrix=None,          # infonce / sami: (B, 2, 2) summed log-probs, see infonce_loss
)
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
EXP_CAP = 80.0  # exp() argument cap in the f-divergences: e^80 is still finite in float32 (TRL caps the same way)


# ----------------------------------------------------------------------------------------------------------------
# Per-sequence log-probabilities


def token_logps(logits, targets, chunk_tokens=256):
    """log pi(target) per position: logits (N, V), targets (N,) -> (N,) float32; chunked, so the float32 copy is
    (chunk_tokens, V), never (N, V)."""
    return torch.cat([TokenLogps.apply(chunk, ids)
                      for chunk, ids in zip(logits.split(chunk_tokens), targets.split(chunk_tokens))])


class TokenLogps(torch.autograd.Function):
    """log softmax(z)_y = z_y - logsumexp(z) in float32 (why: docs/walkthrough.md step 7): (..., V) logits, (...)
    targets -> (...). Backward keeps no float32 copy: one pass, g * (onehot(y) - softmax(z)), bit-identical to
    autograd, in under half the CPU time of a checkpointed log_softmax + gather."""

    @staticmethod
    def forward(ctx, logits, targets):
        logits32 = logits.float()  # (..., V)
        lse = torch.logsumexp(logits32, dim=-1)  # (...)
        picked = logits32.gather(dim=-1, index=targets.unsqueeze(-1)).squeeze(-1)  # (...)
        ctx.save_for_backward(logits, targets, lse)
        return picked - lse

    @staticmethod
    def backward(ctx, grad):  # grad (...)
        logits, targets, lse = ctx.saved_tensors
        # torch.sub promotes bf16 logits to float32 on the fly; out of place, as float32 logits are the saved ones
        grad_logits = torch.sub(logits, lse.unsqueeze(-1)).exp_().mul_(-grad.unsqueeze(-1))  # -g * softmax(z)
        grad_logits.scatter_add_(-1, targets.unsqueeze(-1), grad.unsqueeze(-1))  # + g * onehot(y)
        return grad_logits.to(logits.dtype), None


# ----------------------------------------------------------------------------------------------------------------
# The margin: how much more the policy moved toward the chosen response than toward the rejected one


def f_divergence_margin(chosen_logratios, rejected_logratios, f_divergence_type, alpha):
    # f-DPO (Wang et al. 2023, arXiv 2309.16240): the margin is f'(u_w) - f'(u_l), u = pi / pi_ref.
    if f_divergence_type == "reverse_kl":  # f'(u) = log u + 1: plain DPO, the margin is a log-ratio difference
        return chosen_logratios - rejected_logratios
    if f_divergence_type == "js_divergence":  # f'(u) = log(2u / (1 + u)) = log 2 + logsigmoid(log u)
        return F.logsigmoid(chosen_logratios) - F.logsigmoid(rejected_logratios)
    if f_divergence_type == "forward_kl":  # f'(u) = 1 - 1/u: the alpha-divergence at alpha = 1
        alpha = 1.0
    # alpha-divergence (f-DPO's convention): f'(u) = (1 - u^-alpha) / alpha
    chosen_score = (1 - torch.exp((-alpha * chosen_logratios).clamp(max=EXP_CAP))) / alpha
    rejected_score = (1 - torch.exp((-alpha * rejected_logratios).clamp(max=EXP_CAP))) / alpha
    return chosen_score - rejected_score


# ----------------------------------------------------------------------------------------------------------------
# The losses: formula, then paper. Each takes the preference_loss keywords it reads (h: the margin), ignores **_.


def sigmoid_loss(margin, beta, label_smoothing, **_):
    # -(1 - eps) log sigma(beta h) - eps log sigma(-beta h). DPO Eq. 7 (Rafailov et al. 2023, arXiv 2305.18290);
    # eps > 0: cDPO (Mitchell 2023).
    return -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)


def robust_loss(margin, beta, label_smoothing, **_):
    # (-(1 - eps) log sigma(beta h) + eps log sigma(-beta h)) / (1 - 2 eps). Robust DPO (Chowdhury et al. 2024,
    # arXiv 2403.00409).
    clean = -(1 - label_smoothing) * F.logsigmoid(beta * margin)
    flipped = -label_smoothing * F.logsigmoid(-beta * margin)
    return (clean - flipped) / (1 - 2 * label_smoothing)


def hinge_loss(margin, beta, **_):
    # max(0, 1 - beta h). SLiC-HF (Zhao et al. 2023, arXiv 2305.10425); RSO (Liu et al. 2023, arXiv 2309.06657).
    return torch.relu(1 - beta * margin)


def ipo_loss(margin, beta, **_):
    # (h - 1/(2 beta))^2. IPO (Azar et al. 2023, arXiv 2310.12036, Eq. 17; beta is the paper's tau).
    return (margin - 1 / (2 * beta)) ** 2


def exo_pair_loss(margin, beta, label_smoothing, **_):
    # KL(q || p_eps) with q = (sigma(beta h), sigma(-beta h)), p_eps = (1 - eps, eps). EXO (Ji et al. 2024,
    # arXiv 2402.00856, Eq. 16, K = 2).
    eps = label_smoothing if label_smoothing > 0 else 1e-3  # the paper's value; eps = 0 makes log(eps) infinite
    q_chosen, q_rejected = torch.sigmoid(beta * margin), torch.sigmoid(-beta * margin)
    return (q_chosen * (F.logsigmoid(beta * margin) - math.log1p(-eps))
            + q_rejected * (F.logsigmoid(-beta * margin) - math.log(eps)))


def discopop_loss(margin, beta, discopop_tau, **_):
    # (1 - sigma(beta h / tau)) * -log sigma(beta h) + sigma(beta h / tau) * exp(-beta h). DiscoPOP / LRML
    # (Lu et al. 2024, arXiv 2406.08414, Eq. 5).
    logits = beta * margin
    logistic = F.softplus(-logits) * torch.sigmoid(-logits / discopop_tau)
    # exp(-l) * sigma(l / tau) as one exp: for very negative l, exp(-l) alone overflows to inf and inf * 0 = NaN
    exponential = torch.exp(-logits + F.logsigmoid(logits / discopop_tau))
    return logistic + exponential


def nca_pair_loss(chosen_logratios, rejected_logratios, beta, **_):
    # -log sigma(r_w) - 0.5 log sigma(-r_w) - 0.5 log sigma(-r_l), r = beta * log-ratio. NCA (Chen et al. 2024,
    # arXiv 2402.05369, K = 2).
    chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios
    return (-F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards)
            - 0.5 * F.logsigmoid(-rejected_rewards))


def bco_pair_loss(chosen_logratios, rejected_logratios, beta, bco_delta, **_):
    # -log sigma(r_w - delta) - log sigma(-(r_l - delta)). BCO (Jung et al. 2024, arXiv 2404.04656).
    chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios
    if bco_delta is None:  # TRL keeps a running mean over steps; a pure function has this batch's mean
        bco_delta = beta * torch.cat([chosen_logratios, rejected_logratios]).detach().mean()
    return -F.logsigmoid(chosen_rewards - bco_delta) - F.logsigmoid(-(rejected_rewards - bco_delta))


def sppo_hard_loss(chosen_logratios, rejected_logratios, beta, **_):
    # (log-ratio_w - 1/(2 beta))^2 + (log-ratio_l + 1/(2 beta))^2. SPPO (Wu et al. 2024, arXiv 2405.00675, Eq. 4.7)
    # with hard win probabilities (1 and 0).
    return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2


def aot_loss(logps, beta, label_smoothing, **_):
    # sigmoid_loss(sort(a) - sort(b)), a, b: policy, reference margins. AOT (Melnyk et al. 2024, arXiv 2406.05882):
    # 1-D optimal transport over the batch, so losses[i] pairs the i-th smallest of a with that of b.
    chosen, rejected, ref_chosen, ref_rejected = logps
    delta = torch.sort(chosen - rejected).values - torch.sort(ref_chosen - ref_rejected).values  # (B,)
    return sigmoid_loss(delta, beta, label_smoothing)


def aot_unpaired_loss(chosen_logratios, rejected_logratios, beta, label_smoothing, **_):
    # sigmoid_loss(sort(c) - sort(r)). AOT's unpaired form (arXiv 2406.05882): the pairs ignored.
    delta = torch.sort(chosen_logratios).values - torch.sort(rejected_logratios).values  # (B,)
    return sigmoid_loss(delta, beta, label_smoothing)


def apo_zero_loss(chosen_logratios, rejected_logratios, beta, **_):
    # 1 - sigma(r_w) + sigma(r_l). APO-zero (D'Oosterlinck et al. 2024, arXiv 2408.06266, Eq. 7).
    return 1 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)


def apo_down_loss(chosen_logratios, rejected_logratios, beta, **_):
    # sigma(r_w) + 1 - sigma(r_w - r_l). APO-down (arXiv 2408.06266, Eq. 8).
    return (torch.sigmoid(beta * chosen_logratios)
            + 1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios)))


def simpo_loss(chosen_logratios, rejected_logratios, beta, simpo_gamma, label_smoothing, **_):
    # -log sigma(beta (mean log pi(y_w) - mean log pi(y_l)) - gamma). SimPO (Meng et al. 2024, arXiv 2405.14734,
    # Eq. 6).
    return sigmoid_loss(chosen_logratios - rejected_logratios - simpo_gamma / beta, beta, label_smoothing)


def sft_loss(chosen_logratios, chosen_lengths, **_):
    # -log pi(y_w | x) / |y_w|, the chosen's token-mean NLL. MIPO's SFT-on-positives baseline; RPO's extra term
    # (Pang et al. 2024, arXiv 2404.19733).
    return -chosen_logratios / chosen_lengths.to(chosen_logratios.dtype)


def infonce_loss(logps_matrix, temperature, **_):
    # -(1/2) [log softmax_prompts(M[:, y+] / T)[x] + log softmax_prompts(M[:, y-] / T)[x']]. InfoNCE (van den Oord et
    # al. 2018, arXiv 1807.03748), 2 candidates: which prompt was each response sampled for, under the policy.
    # logps_matrix[b, i, j] = log pi(response j | prompt i): i = 0 is x, 1 is x'; j = 0 is y+ (sampled for x),
    # 1 is y- (sampled for x'). The true pairs are the diagonal.
    log_p_prompt = (logps_matrix / temperature).log_softmax(dim=1)  # (B, 2 prompts, 2 responses): over prompts
    return -log_p_prompt.diagonal(dim1=1, dim2=2).mean(dim=-1)  # (B,)


def sami_loss(logps_matrix, temperature, **_):
    # (1/2) (row CE + column CE) of the 2 x 2 prompt-by-response matrix, diagonal labels. SAMI (Fränken et al.
    # 2024, arXiv 2404.14313): the column term is infonce_loss; the row term asks which response fits each prompt.
    logits = logps_matrix / temperature  # (B, 2 prompts, 2 responses)
    row = logits.log_softmax(dim=2).diagonal(dim1=1, dim2=2).mean(dim=-1)  # (B,) over responses, per prompt
    column = logits.log_softmax(dim=1).diagonal(dim1=1, dim2=2).mean(dim=-1)  # (B,) over prompts, per response
    return -(row + column) / 2


# The table: all that preference_loss and its callers know of a loss (adding one: docs/losses.md).


@dataclass(frozen=True)
class Loss:
    fn: Callable
    per_token: bool = False  # log-probs, policy and reference, divided by their lengths first
    reference_free: bool = False  # no pi_ref: ref_* may be None
    token_mean: bool = False  # needs chosen_lengths (sft divides by it itself)
    negative_prompt: bool = False  # needs logps_matrix: both responses scored under x' too
    smoothed: bool = False  # label_smoothing applies
    f_divergence: bool = False  # f_divergence_type applies: built on h alone, where f-DPO's log Z(x) cancels
    batch_coupled: bool = False  # compares the pairs of a forward with each other: micro-batches change it
    defaults: dict = field(default_factory=dict)  # a run's option defaults over OPTIONS' (not preference_loss's)


LOSSES = {  # MIPO's first, then TRL's, then the MIPO paper's baselines
    "sigmoid": Loss(sigmoid_loss, smoothed=True, f_divergence=True),
    "robust": Loss(robust_loss, smoothed=True, f_divergence=True),
    "hinge": Loss(hinge_loss, f_divergence=True),
    "ipo": Loss(ipo_loss, per_token=True, f_divergence=True),  # per token, as TRL
    "ipo_sum": Loss(ipo_loss, f_divergence=True),  # on sums, as the DPO code
    "exo_pair": Loss(exo_pair_loss, smoothed=True, f_divergence=True),
    "nca_pair": Loss(nca_pair_loss),
    "bco_pair": Loss(bco_pair_loss, batch_coupled=True),
    "sppo_hard": Loss(sppo_hard_loss),
    "aot": Loss(aot_loss, smoothed=True, batch_coupled=True),
    "aot_unpaired": Loss(aot_unpaired_loss, smoothed=True, batch_coupled=True),
    "apo_zero": Loss(apo_zero_loss),
    "apo_down": Loss(apo_down_loss),
    "discopop": Loss(discopop_loss, f_divergence=True),
    "sigmoid_norm": Loss(sigmoid_loss, per_token=True, smoothed=True, f_divergence=True),  # Tulu 3's DPO-norm
    "simpo": Loss(simpo_loss, per_token=True, reference_free=True, smoothed=True),
    "sft": Loss(sft_loss, reference_free=True, token_mean=True),
    # as the official trainer (openrlhf/models/loss.py of its OpenRLHF fork): InfoNCE's log-probs / 100, SAMI's / 1
    "infonce": Loss(infonce_loss, reference_free=True, negative_prompt=True, defaults=dict(temperature=100.0)),
    "sami": Loss(sami_loss, reference_free=True, negative_prompt=True, defaults=dict(temperature=1.0)),
}
LOSS_TYPES = tuple(LOSSES)


# ----------------------------------------------------------------------------------------------------------------
# The entry point


def preference_loss(loss_type, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                    chosen_lengths, rejected_lengths, beta=0.1, **options):
    """Per-pair losses and detached rewards (B,) for loss_type (LOSS_TYPES), options as in OPTIONS.

    infonce and sami also take logps_matrix (B, 2, 2) (see infonce_loss); its first row must equal policy_*
    (they feed the rewards, the metrics and rpo_alpha).
    """
    opts = check_options(loss_type, beta, options)
    row = LOSSES[loss_type]
    uses_reference = not (opts["reference_free"] or row.reference_free)
    check_inputs(loss_type, opts, uses_reference, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                 ref_rejected_logps, chosen_lengths, rejected_lengths)

    chosen, rejected = policy_chosen_logps, policy_rejected_logps  # (B,) summed log-probs
    ref_chosen = ref_chosen_logps if uses_reference else torch.zeros_like(chosen)
    ref_rejected = ref_rejected_logps if uses_reference else torch.zeros_like(rejected)
    if row.per_token:  # mean log-prob per token, policy and reference alike
        chosen_n, rejected_n = chosen_lengths.to(chosen.dtype), rejected_lengths.to(rejected.dtype)
        chosen, ref_chosen = chosen / chosen_n, ref_chosen / chosen_n
        rejected, ref_rejected = rejected / rejected_n, ref_rejected / rejected_n
    chosen_logratios = chosen - ref_chosen  # (B,) log pi(y_w|x) - log pi_ref(y_w|x)
    rejected_logratios = rejected - ref_rejected  # (B,)
    margin = f_divergence_margin(chosen_logratios, rejected_logratios, opts["f_divergence_type"],
                                 opts["f_alpha_divergence_coef"])  # (B,) h
    losses = row.fn(margin=margin, chosen_logratios=chosen_logratios, rejected_logratios=rejected_logratios,
                    logps=(chosen, rejected, ref_chosen, ref_rejected), chosen_lengths=chosen_lengths, beta=beta,
                    **opts)

    if opts["rpo_alpha"] is not None:  # RPO (arXiv 2404.19733): DPO plus alpha * NLL of the chosen response
        nll = sft_loss(policy_chosen_logps, chosen_lengths)  # (B,)
        losses = losses + opts["rpo_alpha"] * nll
    chosen_rewards = beta * chosen_logratios.detach()  # (B,) DPO Eq. 5: r(x, y) = beta log pi(y|x) / pi_ref(y|x)
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def check_options(loss_type, beta, options):
    # Every mistake here would silently train something else, so each one is a one-line error naming the fix.
    if loss_type not in LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of: {', '.join(LOSS_TYPES)}")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}; valid options: {', '.join(OPTIONS)}")
    opts = {**OPTIONS, **options}
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (MIPO uses 0.1); got {beta}")
    smoothing = opts["label_smoothing"]
    if not 0 <= smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) (a label-flip probability); got {smoothing}")
    if smoothing > 0 and not LOSSES[loss_type].smoothed:
        raise ValueError(f"label_smoothing has no meaning for loss {loss_type!r}; it applies to: "
                         f"{', '.join(name for name, row in LOSSES.items() if row.smoothed)}")
    f_type = opts["f_divergence_type"]
    if f_type not in F_DIVERGENCES:
        raise ValueError(f"unknown f_divergence_type {f_type!r}; choose one of: {', '.join(F_DIVERGENCES)}")
    if f_type != "reverse_kl" and not LOSSES[loss_type].f_divergence:
        raise ValueError(f"f_divergence_type {f_type!r} is defined only for the margin losses "
                         f"{', '.join(name for name, row in LOSSES.items() if row.f_divergence)}; "
                         f"use reverse_kl with {loss_type!r}")
    if not opts["f_alpha_divergence_coef"] > 0:
        raise ValueError(f"f_alpha_divergence_coef must be > 0 (its limit at 0 is reverse_kl); "
                         f"got {opts['f_alpha_divergence_coef']}")
    if opts["rpo_alpha"] is not None and not opts["rpo_alpha"] >= 0:
        raise ValueError(f"rpo_alpha must be None or >= 0 (the RPO paper uses 1.0); got {opts['rpo_alpha']}")
    for name in ("discopop_tau", "temperature"):
        if not opts[name] > 0:
            raise ValueError(f"{name} must be > 0; got {opts[name]}")
    if not opts["simpo_gamma"] >= 0:
        raise ValueError(f"simpo_gamma must be >= 0 (a target margin); got {opts['simpo_gamma']}")
    return opts


def check_inputs(loss_type, opts, uses_reference, *tensors):
    inputs = dict(zip(["policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
                       "chosen_lengths", "rejected_lengths"], tensors))
    needed = ["policy_chosen_logps", "policy_rejected_logps"]
    if uses_reference:
        needed += ["ref_chosen_logps", "ref_rejected_logps"]
    row = LOSSES[loss_type]
    if row.per_token:
        needed += ["chosen_lengths", "rejected_lengths"]
    elif row.token_mean or opts["rpo_alpha"] is not None:
        needed += ["chosen_lengths"]
    for name in needed:
        if inputs[name] is None:
            raise ValueError(f"loss {loss_type!r} needs {name}; it is None"
                             + (" (or pass reference_free=True)" if name.startswith("ref_") else ""))
    shape = inputs["policy_chosen_logps"].shape
    for name, value in inputs.items():
        if value is not None and (value.dim() != 1 or value.shape != shape):
            raise ValueError(f"{name} has shape {tuple(value.shape)}; every input must be (B,) = {tuple(shape)}")
    for name in ("chosen_lengths", "rejected_lengths"):
        if name in needed and (inputs[name] <= 0).any():
            raise ValueError(f"{name} must count at least one completion token per pair; got {inputs[name].tolist()}")
    if row.negative_prompt:
        matrix = opts["logps_matrix"]
        if matrix is None or matrix.shape != (shape[0], 2, 2):
            got = None if matrix is None else tuple(matrix.shape)
            raise ValueError(f"loss {loss_type!r} needs logps_matrix of shape ({shape[0]}, 2, 2): [prompt x, x'] by "
                             f"[response y+, y-] summed log-probs; got {got}")


# ----------------------------------------------------------------------------------------------------------------
# Metrics, under the names TRL logs, so curves from here and from there can share a plot


@torch.no_grad()
def preference_metrics(chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps, chosen_lengths,
                       rejected_lengths):
    chosen_n, rejected_n = chosen_lengths.float(), rejected_lengths.float()
    return {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),  # strict: 0 at step 0
        "logps/chosen": policy_chosen_logps.mean().item(),  # SUM over completion tokens, as TRL logs it
        "logps/rejected": policy_rejected_logps.mean().item(),  # SUM over completion tokens
        "logps/chosen_per_token": (policy_chosen_logps / chosen_n).mean().item(),
        "logps/rejected_per_token": (policy_rejected_logps / rejected_n).mean().item(),
        "lengths/chosen": chosen_n.mean().item(),
        "lengths/rejected": rejected_n.mean().item(),
        "nll_loss": (-policy_chosen_logps / chosen_n).mean().item(),  # chosen, token mean per pair (TRL's name)
    }
