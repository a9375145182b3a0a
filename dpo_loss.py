"""The preference losses MIPO trains with, and the ones it is compared or ablated against: pure functions of
per-sequence log-probabilities. No models, files or devices here.

MIPO itself (Nam, Li, Jaques 2026, arXiv 2603.19294) is plain sigmoid DPO: beta 0.1, log-probs summed over the
completion tokens, the frozen base model as the reference. Everything else is an ablation, selected by name:

    losses, chosen_rewards, rejected_rewards = preference_loss("sigmoid", policy_chosen_logps, ...)

and nothing else in the training loop changes. Names and semantics follow TRL's DPOTrainer (v0.27 `dpo_loss`;
`sigmoid_norm` and `aot_unpaired` are its later names), so a run here can be compared with a run there. The
MIPO paper's own baselines are also here: `sft` on the positives, and `infonce` / `sami`, which need every
response scored under both prompts (the `logps_matrix` option, below). docs/losses.md has the table.

Conventions (all tensors (B,), one entry per preference pair):
- log-probs are SUMS over completion tokens (token_logps, summed per response by train.forward_logps);
  lengths count those tokens. `ipo`,
  `sigmoid_norm` and `simpo` divide by the length themselves, so every loss takes the same inputs.
- the log-ratio of a response is log pi(y|x) - log pi_ref(y|x); the reference term is dropped for the
  reference-free losses (`simpo`, `sft`, `infonce`, `sami`, or any loss with reference_free=True), whose
  ref_* arguments may then be None.
- rewards = beta * that log-ratio, detached: DPO's implicit reward (DPO Eq. 5), on the scale the loss uses.
- `losses` is per pair; the training loop takes losses.mean().

Shape legend: B pairs in the batch, T tokens per sequence, V vocabulary, C positions per chunk.
"""
import math

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "ipo_sum", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
              "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "simpo", "sft",
              "infonce", "sami")
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

PER_TOKEN_LOSSES = ("ipo", "sigmoid_norm", "simpo")  # log-probs divided by completion length first
REFERENCE_FREE_LOSSES = ("simpo", "sft", "infonce", "sami")
SMOOTHED_LOSSES = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired", "sigmoid_norm", "simpo")
# f-DPO's margin is f'(chosen ratio) - f'(rejected ratio): only the losses built on that one difference have an
# f-divergence version (the partition function log Z(x) cancels only there; f-DPO, arXiv 2309.16240).
F_DIVERGENCE_LOSSES = ("sigmoid", "robust", "hinge", "ipo", "ipo_sum", "exo_pair", "discopop", "sigmoid_norm")
EXP_CAP = 80.0  # exp() argument cap in the f-divergences: e^80 is still finite in float32 (TRL caps the same way)


# ----------------------------------------------------------------------------------------------------------------
# Per-sequence log-probabilities


def token_logps(logits, targets, chunk_tokens=256):
    """log pi(target) at each of N positions: logits (N, V), targets (N,) -> (N,) float32, chunk_tokens positions
    at a time, so the float32 copy is (chunk_tokens, V), never (N, V)."""
    return torch.cat([TokenLogps.apply(chunk, ids)
                      for chunk, ids in zip(logits.split(chunk_tokens), targets.split(chunk_tokens))])


class TokenLogps(torch.autograd.Function):
    """log softmax(z)_y = z_y - logsumexp(z) per position, in float32 (a bf16 sum of 151,936 exponentials keeps ~3
    digits): (..., V) logits and (...) target ids -> (...). It keeps no float32 copy for backward, which
    computes the gradient in one pass over V, g * (onehot(y) - softmax(z)), with the very float32 operations
    autograd would run (bit-identical to it), in less than half autograd's time on a CPU: the backward of a
    checkpointed log_softmax + gather runs about ten passes over the float32 values."""

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
# The losses, one function each: formula in one comment line, then the paper. h is the margin above.


def sigmoid_loss(margin, beta, label_smoothing):
    # -(1 - eps) log sigma(beta h) - eps log sigma(-beta h). DPO Eq. 7 (Rafailov et al. 2023, arXiv 2305.18290);
    # eps > 0 is conservative DPO (cDPO, Mitchell 2023): the label is assumed flipped with probability eps.
    return -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)


def robust_loss(margin, beta, label_smoothing):
    # (-(1 - eps) log sigma(beta h) + eps log sigma(-beta h)) / (1 - 2 eps). Robust DPO (Chowdhury et al. 2024,
    # arXiv 2403.00409): an unbiased estimate of the clean-label DPO loss under flip rate eps.
    clean = -(1 - label_smoothing) * F.logsigmoid(beta * margin)
    flipped = -label_smoothing * F.logsigmoid(-beta * margin)
    return (clean - flipped) / (1 - 2 * label_smoothing)


def hinge_loss(margin, beta):
    # max(0, 1 - beta h). SLiC-HF (Zhao et al. 2023, arXiv 2305.10425) calibration loss on the log-ratio margin,
    # as used by RSO (Liu et al. 2023, arXiv 2309.06657, with gamma = 1/beta).
    return torch.relu(1 - beta * margin)


def ipo_loss(margin, beta):
    # (h - 1/(2 beta))^2. IPO (Azar et al. 2023, arXiv 2310.12036, Eq. 17; beta is the paper's tau): regress the
    # margin to a finite target instead of pushing it to infinity, so it cannot overfit deterministic labels.
    return (margin - 1 / (2 * beta)) ** 2


def exo_pair_loss(margin, beta, label_smoothing):
    # KL(q || p_eps) with q = (sigma(beta h), sigma(-beta h)), p_eps = (1 - eps, eps). EXO (Ji et al. 2024,
    # arXiv 2402.00856, Eq. 16, K = 2): reverse KL to the smoothed labels, mode-seeking where DPO is mean-seeking.
    eps = label_smoothing if label_smoothing > 0 else 1e-3  # the paper's value; eps = 0 makes log(eps) infinite
    q_chosen, q_rejected = torch.sigmoid(beta * margin), torch.sigmoid(-beta * margin)
    return (q_chosen * (F.logsigmoid(beta * margin) - math.log1p(-eps))
            + q_rejected * (F.logsigmoid(-beta * margin) - math.log(eps)))


def discopop_loss(margin, beta, tau):
    # (1 - sigma(beta h / tau)) * -log sigma(beta h) + sigma(beta h / tau) * exp(-beta h). DiscoPOP / LRML
    # (Lu et al. 2024, arXiv 2406.08414, Eq. 5): a logistic-exponential blend found by LLM-driven search.
    logits = beta * margin
    logistic = F.softplus(-logits) * torch.sigmoid(-logits / tau)
    # exp(-l) * sigma(l / tau) as one exp: for very negative l, exp(-l) alone overflows to inf and inf * 0 = NaN
    exponential = torch.exp(-logits + F.logsigmoid(logits / tau))
    return logistic + exponential


def nca_pair_loss(chosen_logratios, rejected_logratios, beta):
    # -log sigma(r_w) - 0.5 log sigma(-r_w) - 0.5 log sigma(-r_l), r = beta * log-ratio. NCA (Chen et al. 2024,
    # arXiv 2402.05369, K = 2): absolute rewards, so the chosen likelihood cannot fall with the rejected.
    chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios
    return (-F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards)
            - 0.5 * F.logsigmoid(-rejected_rewards))


def bco_pair_loss(chosen_logratios, rejected_logratios, beta, delta):
    # -log sigma(r_w - delta) - log sigma(-(r_l - delta)). BCO (Jung et al. 2024, arXiv 2404.04656): a binary
    # classifier per response; delta, a running mean of the rewards, centres them.
    chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios
    return -F.logsigmoid(chosen_rewards - delta) - F.logsigmoid(-(rejected_rewards - delta))


def sppo_hard_loss(chosen_logratios, rejected_logratios, beta):
    # (log-ratio_w - 1/(2 beta))^2 + (log-ratio_l + 1/(2 beta))^2. SPPO (Wu et al. 2024, arXiv 2405.00675, Eq. 4.7)
    # with hard win probabilities P(y_w > y_l) = 1, P(y_l > y_w) = 0 instead of a preference model's estimate.
    return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2


def aot_loss(policy_margins, reference_margins, beta, label_smoothing):
    # sigmoid_loss(sort(a) - sort(b)). AOT (Melnyk et al. 2024, arXiv 2406.05882): first-order stochastic
    # dominance of one distribution over another, via 1-D optimal transport (sort both samples over the batch).
    # So losses[i] pairs the i-th smallest of a with the i-th smallest of b, not row i with row i.
    delta = torch.sort(policy_margins).values - torch.sort(reference_margins).values  # (B,)
    return sigmoid_loss(delta, beta, label_smoothing)


def apo_zero_loss(chosen_logratios, rejected_logratios, beta):
    # 1 - sigma(r_w) + sigma(r_l). APO-zero (D'Oosterlinck et al. 2024, arXiv 2408.06266, Eq. 7): raise the chosen,
    # lower the rejected, each against the reference; for chosen responses better than the model's own.
    return 1 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)


def apo_down_loss(chosen_logratios, rejected_logratios, beta):
    # sigma(r_w) + 1 - sigma(r_w - r_l). APO-down (arXiv 2408.06266, Eq. 8): lower both, the rejected more; for
    # chosen responses worse than the model's own.
    return (torch.sigmoid(beta * chosen_logratios)
            + 1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios)))


def simpo_loss(chosen_mean_logps, rejected_mean_logps, beta, gamma, label_smoothing):
    # -log sigma(beta (mean log pi(y_w) - mean log pi(y_l)) - gamma). SimPO (Meng et al. 2024, arXiv 2405.14734,
    # Eq. 6): no reference model, length-normalized reward, target margin gamma. TRL's CPOTrainer "simpo".
    return sigmoid_loss(chosen_mean_logps - rejected_mean_logps - gamma / beta, beta, label_smoothing)


def sft_loss(policy_chosen_logps, chosen_lengths):
    # -log pi(y_w | x) / |y_w|: the token-mean NLL of the chosen response. Since the log-probs are sums over the
    # completion tokens, dividing by the length is exactly the mean over tokens. MIPO's SFT-on-positives baseline;
    # also RPO's extra term (Pang et al. 2024, arXiv 2404.19733: NLL divided by the length, per example).
    return -policy_chosen_logps / chosen_lengths


def infonce_loss(logps_matrix, temperature):
    # -(1/2) [log softmax_prompts(M[:, y+] / T)[x] + log softmax_prompts(M[:, y-] / T)[x']]. InfoNCE (van den Oord et
    # al. 2018, arXiv 1807.03748) with 2 candidates, as the MIPO paper's baseline: for each response, tell the prompt
    # it was sampled for from the other prompt, under the policy alone (no reference model).
    # logps_matrix[b, i, j] = log pi(response j | prompt i): i = 0 is x, 1 is x'; j = 0 is y+ (sampled for x),
    # 1 is y- (sampled for x'). The true pairs are the diagonal.
    log_p_prompt = (logps_matrix / temperature).log_softmax(dim=1)  # (B, 2 prompts, 2 responses): over prompts
    return -log_p_prompt.diagonal(dim1=1, dim2=2).mean(dim=-1)  # (B,)


def sami_loss(logps_matrix, temperature):
    # (1/2) (row CE + column CE) of the 2 x 2 prompt-by-response matrix, diagonal labels. SAMI (Fränken et al.
    # 2024, arXiv 2404.14313; its sami_loss): the column term is infonce_loss, the row term asks the same question
    # the other way round (which response belongs to this prompt), each averaged over its two rows or columns.
    logits = logps_matrix / temperature  # (B, 2 prompts, 2 responses)
    row = logits.log_softmax(dim=2).diagonal(dim1=1, dim2=2).mean(dim=-1)  # (B,) over responses, per prompt
    column = logits.log_softmax(dim=1).diagonal(dim1=1, dim2=2).mean(dim=-1)  # (B,) over prompts, per response
    return -(row + column) / 2


# ----------------------------------------------------------------------------------------------------------------
# The entry point


def preference_loss(loss_type, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                    chosen_lengths, rejected_lengths, beta=0.1, **options):
    """Per-pair losses and detached rewards (B,) for loss_type (LOSS_TYPES), options as in OPTIONS.

    infonce / sami score both responses under both prompts: pass logps_matrix (B, 2, 2) of summed log-probs,
    [[log pi(y+|x), log pi(y-|x)], [log pi(y+|x'), log pi(y-|x')]]; its first row is also what the policy_* log-probs
    must hold (they feed the rewards, the metrics and rpo_alpha).
    """
    opts = check_options(loss_type, beta, options)
    uses_reference = not (opts["reference_free"] or loss_type in REFERENCE_FREE_LOSSES)
    check_inputs(loss_type, opts, uses_reference, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                 ref_rejected_logps, chosen_lengths, rejected_lengths)

    chosen, rejected = policy_chosen_logps, policy_rejected_logps  # (B,) summed log-probs
    ref_chosen = ref_chosen_logps if uses_reference else torch.zeros_like(chosen)
    ref_rejected = ref_rejected_logps if uses_reference else torch.zeros_like(rejected)
    if loss_type in PER_TOKEN_LOSSES:  # mean log-prob per token, policy and reference alike (TRL's "ipo")
        chosen_n, rejected_n = chosen_lengths.to(chosen.dtype), rejected_lengths.to(rejected.dtype)
        chosen, ref_chosen = chosen / chosen_n, ref_chosen / chosen_n
        rejected, ref_rejected = rejected / rejected_n, ref_rejected / rejected_n
    chosen_logratios = chosen - ref_chosen  # (B,) log pi(y_w|x) - log pi_ref(y_w|x)
    rejected_logratios = rejected - ref_rejected  # (B,)
    margin = f_divergence_margin(chosen_logratios, rejected_logratios, opts["f_divergence_type"],
                                 opts["f_alpha_divergence_coef"])  # (B,) h
    smoothing = opts["label_smoothing"]

    if loss_type in ("sigmoid", "sigmoid_norm"):  # sigmoid_norm: DPO on per-token log-ratios (Tulu 3's DPO-norm)
        losses = sigmoid_loss(margin, beta, smoothing)
    elif loss_type == "robust":
        losses = robust_loss(margin, beta, smoothing)
    elif loss_type == "hinge":
        losses = hinge_loss(margin, beta)
    elif loss_type in ("ipo", "ipo_sum"):  # ipo: per-token, as TRL; ipo_sum: sums, as the DPO code
        losses = ipo_loss(margin, beta)
    elif loss_type == "exo_pair":
        losses = exo_pair_loss(margin, beta, smoothing)
    elif loss_type == "discopop":
        losses = discopop_loss(margin, beta, opts["discopop_tau"])
    elif loss_type == "nca_pair":
        losses = nca_pair_loss(chosen_logratios, rejected_logratios, beta)
    elif loss_type == "bco_pair":
        delta = opts["bco_delta"]
        if delta is None:  # TRL keeps a running mean over steps; a pure function has this batch's mean
            delta = beta * torch.cat([chosen_logratios, rejected_logratios]).detach().mean()
        losses = bco_pair_loss(chosen_logratios, rejected_logratios, beta, delta)
    elif loss_type == "sppo_hard":
        losses = sppo_hard_loss(chosen_logratios, rejected_logratios, beta)
    elif loss_type == "aot":  # dominance of the policy's chosen-minus-rejected margins over the reference's
        losses = aot_loss(chosen - rejected, ref_chosen - ref_rejected, beta, smoothing)
    elif loss_type == "aot_unpaired":  # dominance of the chosen log-ratios over the rejected ones, pairs ignored
        losses = aot_loss(chosen_logratios, rejected_logratios, beta, smoothing)
    elif loss_type == "apo_zero":
        losses = apo_zero_loss(chosen_logratios, rejected_logratios, beta)
    elif loss_type == "apo_down":
        losses = apo_down_loss(chosen_logratios, rejected_logratios, beta)
    elif loss_type == "simpo":
        losses = simpo_loss(chosen, rejected, beta, opts["simpo_gamma"], smoothing)
    elif loss_type == "sft":
        losses = sft_loss(policy_chosen_logps, chosen_lengths.to(policy_chosen_logps.dtype))
    elif loss_type == "infonce":
        losses = infonce_loss(opts["logps_matrix"], opts["temperature"])
    else:  # "sami"
        losses = sami_loss(opts["logps_matrix"], opts["temperature"])

    if opts["rpo_alpha"] is not None:  # RPO (arXiv 2404.19733): DPO plus alpha * NLL of the chosen response
        nll = sft_loss(policy_chosen_logps, chosen_lengths.to(policy_chosen_logps.dtype))  # (B,)
        losses = losses + opts["rpo_alpha"] * nll
    chosen_rewards = beta * chosen_logratios.detach()  # (B,) DPO Eq. 5: r(x, y) = beta log pi(y|x) / pi_ref(y|x)
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def check_options(loss_type, beta, options):
    # Every mistake here would silently train something else, so each one is a one-line error naming the fix.
    if loss_type not in LOSS_TYPES:
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
    if smoothing > 0 and loss_type not in SMOOTHED_LOSSES:
        raise ValueError(f"label_smoothing has no meaning for loss {loss_type!r}; it applies to: "
                         f"{', '.join(SMOOTHED_LOSSES)}")
    f_type = opts["f_divergence_type"]
    if f_type not in F_DIVERGENCES:
        raise ValueError(f"unknown f_divergence_type {f_type!r}; choose one of: {', '.join(F_DIVERGENCES)}")
    if f_type != "reverse_kl" and loss_type not in F_DIVERGENCE_LOSSES:
        raise ValueError(f"f_divergence_type {f_type!r} is defined only for the margin losses "
                         f"{', '.join(F_DIVERGENCE_LOSSES)}; use reverse_kl with {loss_type!r}")
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


def check_inputs(loss_type, opts, uses_reference, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                 ref_rejected_logps, chosen_lengths, rejected_lengths):
    inputs = dict(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                  ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
                  chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    needed = ["policy_chosen_logps", "policy_rejected_logps"]
    if uses_reference:
        needed += ["ref_chosen_logps", "ref_rejected_logps"]
    if loss_type in PER_TOKEN_LOSSES:
        needed += ["chosen_lengths", "rejected_lengths"]
    elif loss_type == "sft" or opts["rpo_alpha"] is not None:
        needed += ["chosen_lengths"]
    for name in needed:
        if inputs[name] is None:
            raise ValueError(f"loss {loss_type!r} needs {name}; it is None"
                             + (" (or pass reference_free=True)" if name.startswith("ref_") else ""))
    shape = policy_chosen_logps.shape
    for name, value in inputs.items():
        if value is not None and (value.dim() != 1 or value.shape != shape):
            raise ValueError(f"{name} has shape {tuple(value.shape)}; every input must be (B,) = {tuple(shape)}")
    for name in ("chosen_lengths", "rejected_lengths"):
        if name in needed and (inputs[name] <= 0).any():
            raise ValueError(f"{name} must count at least one completion token per pair; got {inputs[name].tolist()}")
    if loss_type in ("infonce", "sami"):
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
