"""dpo_loss.preference_loss's arguments checked: every mistake in them would silently train something else, so
each one is a one-line ValueError naming the fix. The loss names and which options each accepts are dpo_loss.py's.
"""
import dpo_loss


def check_options(loss_type, beta, options):
    if loss_type not in dpo_loss.LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of: {', '.join(dpo_loss.LOSS_TYPES)}")
    unknown = sorted(set(options) - set(dpo_loss.OPTIONS))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}; valid options: {', '.join(dpo_loss.OPTIONS)}")
    opts = {**dpo_loss.OPTIONS, **options}
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (MIPO uses 0.1); got {beta}")
    smoothing = opts["label_smoothing"]
    if not 0 <= smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) (a label-flip probability); got {smoothing}")
    if smoothing > 0 and loss_type not in dpo_loss.SMOOTHED_LOSSES:
        raise ValueError(f"label_smoothing has no meaning for loss {loss_type!r}; it applies to: "
                         f"{', '.join(dpo_loss.SMOOTHED_LOSSES)}")
    f_type = opts["f_divergence_type"]
    if f_type not in dpo_loss.F_DIVERGENCES:
        raise ValueError(f"unknown f_divergence_type {f_type!r}; choose one of: {', '.join(dpo_loss.F_DIVERGENCES)}")
    if f_type != "reverse_kl" and loss_type not in dpo_loss.F_DIVERGENCE_LOSSES:
        raise ValueError(f"f_divergence_type {f_type!r} is defined only for the margin losses "
                         f"{', '.join(dpo_loss.F_DIVERGENCE_LOSSES)}; use reverse_kl with {loss_type!r}")
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
    if loss_type in dpo_loss.PER_TOKEN_LOSSES:
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
