"""CPU speed-ups that train.py, mipo.py, eval.py and model_loader.py switch on, kept out of the method files: the
decoder reads with plain nn.Linear and the sampler with a plain top-p, and this module makes them fast on a CPU, on
the model it is given: nothing here assigns into another module or changes an object's class. Figures:
docs/performance.md.

    apply(model)         after loading a CPU model: new OneDNNLinear layers holding the nn.Linear layers' own
                         Parameters, prepacked while sampling; the nucleus bound for top-p, as the model's attribute
                         top_k_top_p, which sampler.generate takes; glibc heap settings for sampling and scoring.
                         Returns the model.
    for_dpo(model, ...)  before DPO: glibc heap settings for training; a sparse input-embedding gradient
    in_force(device)     the names of those that apply and for_dpo switch on for a device; plan_line: a plan's line

A library user does what the commands do:

    model, tokenizer = load_model("qwen"); cpu_speedups.apply(model); sampler.generate(model, ...)

What each changes against the plain version, as tests/test_cpu_speedups.py and tests/test_train.py hold it:
  - oneDNN bf16 linear layers: bitwise the same as nn.Linear, prepacked (sampling) or not (then it is F.linear).
  - oneDNN float32 linear layers, forward and backward, and their prepacked weights: float32 products and sums as
    nn.Linear's, equal within rounding (summed in another order), not bit for bit.
  - the nucleus bound: bitwise the same candidates with the same logits as sampler.top_k_top_p, so the same tokens
    for the same seed (tested; the draw's softmax sums the same terms, zeros left out, in an order that could only
    in principle round differently).
  - glibc heap settings: no number changes, only where memory comes from.
  - the sparse input-embedding gradient: equal up to float rounding (a token twice in a batch has its two rows
    summed in another order).

MIPO_CPU_SPEEDUPS=0 (SWITCH) switches all of them off, read at each call: apply and for_dpo then do nothing.
MIPO_ONEDNN=0 (read at import) leaves the float32 linear layers on PyTorch's default kernel.
"""
import ctypes
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import sampler

SWITCH = "MIPO_CPU_SPEEDUPS=0"  # in the environment: every speed-up here off
ONEDNN_FLOAT32 = torch.backends.mkldnn.is_available() and os.environ.get("MIPO_ONEDNN", "1") != "0"
PACKED_ROWS = 32  # the rows oneDNN picks the blocked layout for (a decode step's batch); any number of rows works


def switched_off() -> bool:  # SWITCH, read at each call so that a test or a library user may set it late
    return os.environ.get("MIPO_CPU_SPEEDUPS") == "0"


def in_force(device) -> list[str]:
    """The speed-ups apply and for_dpo switch on for a model on this device (none on a GPU or when switched off).
    The sparse gradient only where for_dpo finds one process, no sharding and an untied, trained input embedding."""
    if switched_off() or torch.device(device).type != "cpu":
        return []
    onednn = ["oneDNN linear layers" + ("" if ONEDNN_FLOAT32 else " (bf16 only: MIPO_ONEDNN=0)")]
    return (onednn if torch.backends.mkldnn.is_available() else []) + [
        "nucleus bound for top-p", "glibc heap settings", "sparse input-embedding gradient"]


def plan_line(device) -> str:
    """The line a command's plan prints: the speed-ups in force and the switch that turns them off."""
    names = in_force(device)
    return f"CPU speed-ups: {', '.join(names) if names else 'none'} ({SWITCH} switches them all off)"


def apply(model):
    """Switch the speed-ups on for a model on a CPU (nothing on a GPU or when switched off). Returns the model."""
    if switched_off() or model.lm_head.weight.device.type != "cpu":
        return model
    new = {}  # old layer -> new one: a layer registered under two names stays one layer
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:  # as gpt-fast's quantize.py swaps its layers: same Parameters, new forward
                if child not in new:
                    new[child] = OneDNNLinear.from_linear(child)
                setattr(parent, name, new[child])
    model.top_k_top_p = bounded_top_k_top_p  # an attribute of this model: sampler.generate uses it for this model
    keep_freed_memory_for_reuse()
    return model


def for_dpo(model, world: int, sharded: bool) -> None:
    """Before the first DPO step of a CPU run (nothing on a GPU or when switched off)."""
    if switched_off() or model.lm_head.weight.device.type != "cpu":
        return
    keep_activations_in_the_heap()
    embedding = model.model.embed_tokens.weight
    if world == 1 and not sharded and not model.config.tie_word_embeddings and embedding.requires_grad:
        sparse_embedding_gradient(model.model.embed_tokens)


# ---------------------------------------------------------------------------------------------------------------
# oneDNN linear layers. Float32 on a CPU runs on oneDNN (PyTorch's own mkldnn kernel) instead of MKL's sgemm: the
# same float32 arithmetic, but MKL takes a generic code path on AMD CPUs, where oneDNN is several times faster.
# Inference and training take the same kernel, so the frozen reference's log-probs equal the policy's at step 0 to
# the last bit. Under bfloat16 autocast and under torch.compile it is F.linear (PyTorch sends bf16 to oneDNN itself).
# ---------------------------------------------------------------------------------------------------------------


class OneDNNLinear(nn.Linear):
    """nn.Linear on oneDNN. In inference mode (the sampler) it multiplies by a copy of its weight reordered once into
    oneDNN's blocked layout instead of reordering the plain weight at every call: the same products (bf16 to the
    last bit, float32 within rounding) for one more copy of the weight, dropped at the first call outside it."""

    packed = None  # (the weight's version it was packed from, the packed weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "OneDNNLinear":
        """A new layer holding linear's own weight and bias Parameters (no copy): the same state dict, and a change
        to one is a change to the other. Built on the meta device, so nothing is allocated or drawn at random."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        layer.weight, layer.bias = linear.weight, linear.bias
        return layer.train(linear.training)

    def forward(self, x):
        if torch.compiler.is_compiling():  # Inductor lowers only its own prepacked form of the op
            return F.linear(x, self.weight, self.bias)
        if torch.is_inference_mode_enabled() and x.dtype == self.weight.dtype and packable(self.weight):
            if self.packed is None or self.packed[0] != self.weight._version:
                self.packed = (self.weight._version, torch.ops.mkldnn._reorder_linear_weight(self.weight, PACKED_ROWS))
            return onednn_linear(x, self.packed[1], self.bias)
        self.packed = None
        if ONEDNN_FLOAT32 and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"):
            return OneDNNMatmul.apply(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def packable(weight) -> bool:
    if weight.dtype == torch.float32:
        return ONEDNN_FLOAT32
    return weight.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def onednn_linear(x, weight, bias=None):
    """x (..., n) @ weight (m, n)^T + bias -> (..., m), any strides."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class OneDNNMatmul(torch.autograd.Function):
    """y = x W^T + b with the backward's two products on oneDNN as well: dx = dy W, dW = dy^T x."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_2d = grad.reshape(-1, grad.shape[-1])  # (N, out)
        grad_x = onednn_linear(grad, weight.t()) if ctx.needs_input_grad[0] else None
        grad_w = onednn_linear(grad_2d.t(), x.reshape(-1, x.shape[-1]).t()) if ctx.needs_input_grad[1] else None
        grad_b = grad_2d.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


# ---------------------------------------------------------------------------------------------------------------
# The nucleus bound. Without top-k, sorting all V logits per row per step costs more than the forward on a CPU
# (transformers does that, and so does sampler.top_k_top_p), so only the K most likely tokens are sorted, K being an
# upper bound on the largest row's nucleus. The whole vocabulary is sorted only when float rounding leaves those K
# short of top_p, so the candidates are sampler.top_k_top_p's, cut after the last one that can be drawn.
# ---------------------------------------------------------------------------------------------------------------

NUCLEUS_BIN_WIDTH = 0.25  # nats: the histogram that bounds the nucleus size without sorting the vocabulary


def bounded_top_k_top_p(logits, top_k, top_p):
    """sampler.top_k_top_p with the nucleus found among the K most likely tokens: (B, K) candidates' logits
    (filtered ones at -inf) and token ids. On a GPU the full sort is cheap and avoids a host sync."""
    V = logits.shape[-1]
    if top_k > 0 or logits.is_cuda:
        return plain_top_k_top_p(logits, top_k, top_p)
    row_max = logits.max(dim=-1, keepdim=True).values  # (B, 1)
    gap = row_max - logits  # (B, V) nats below the row's most likely token
    unnormalized = torch.exp(-gap)  # (B, V) p * total
    total = unnormalized.sum(dim=-1, keepdim=True)  # (B, 1)
    k = nucleus_size_bound(gap, unnormalized, total, top_p)
    values, token_ids = torch.topk(logits, k, dim=-1)  # (B, K) sorted descending
    probs = torch.exp(values - row_max) / total
    if k < V and bool((probs.sum(dim=-1) < top_p).any()):
        values, token_ids = torch.sort(logits, dim=-1, descending=True)  # rounding: use all V
        probs = torch.exp(values - row_max) / total
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
    return values.masked_fill(mass_before >= top_p, float("-inf")), token_ids


plain_top_k_top_p = sampler.top_k_top_p


def nucleus_size_bound(gap, unnormalized, total, top_p):
    """An upper bound on the nucleus size of every row, in a few linear passes over (B, V): gap are the nats below
    the row's most likely token, unnormalized / total the probabilities.

    Histogram each row's tokens by gap in bins of NUCLEUS_BIN_WIDTH nats. The tokens in bins 0..b, b being the
    first bin where the cumulative mass reaches top_p, are the most likely tokens of the row and hold at least
    top_p of its mass, so they contain the nucleus; one more bin is counted as a margin for float rounding.
    """
    n_bins = 128
    bins = (gap * (1 / NUCLEUS_BIN_WIDTH)).clamp_(max=n_bins - 1).long()  # (B, V) the last bin takes the tail
    mass = gap.new_zeros(gap.shape[0], n_bins).scatter_add_(1, bins, unnormalized)  # (B, n_bins)
    first = (mass.cumsum(dim=-1) < top_p * total).sum(dim=-1, keepdim=True)  # (B, 1) the bin reaching top_p
    upto = (first + 1).clamp(max=n_bins - 1)
    return int((bins <= upto).sum(dim=-1).max())


# ---------------------------------------------------------------------------------------------------------------
# glibc heap settings. By default glibc serves a block above its mmap threshold (128 KiB, raised as such blocks are
# freed, up to 32 MiB) by a fresh mapping whose pages fault in again at each use, and hands heap memory back to the
# OS as soon as 128 KiB of it are free at the top. Sampling and DPO allocate and free the same large tensors at
# every step (the (B, V) logits, the activations), so both keep them in the heap. Elsewhere than glibc: nothing.
# ---------------------------------------------------------------------------------------------------------------


def keep_freed_memory_for_reuse():
    """Sampling: blocks up to 64 MiB from the heap, up to 512 MiB of it kept free; this also leaves the peak lower
    than the default."""
    set_glibc_malloc(mmap_threshold=64 << 20, trim_threshold=512 << 20)


def keep_activations_in_the_heap():
    """DPO: blocks up to 64 MiB from the heap, trimmed once more than 8 MiB are free at its top: faster steps for a
    little more peak memory. Larger blocks still get mappings of their own."""
    set_glibc_malloc(mmap_threshold=64 << 20, trim_threshold=8 << 20)


def set_glibc_malloc(mmap_threshold, trim_threshold):
    """Blocks above mmap_threshold bytes get mappings of their own (returned to the OS when freed); the heap is
    trimmed once more than trim_threshold bytes are free at its top. Fixed values end glibc's own tuning."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return
    mallopt(-3, mmap_threshold)  # M_MMAP_THRESHOLD
    mallopt(-1, trim_threshold)  # M_TRIM_THRESHOLD


# ---------------------------------------------------------------------------------------------------------------
# The sparse input-embedding gradient. An untied input embedding's gradient is zero outside the batch's few hundred
# token rows, but nn.Embedding's backward builds it dense: a fresh (V, C) buffer zeroed at every step (545 MB for
# the bundled qwen). Made sparse, it is added in place into one dense gradient kept across steps: the same numbers
# up to float rounding (a token that occurs twice in a batch has its two rows summed in another order). A tied
# embedding (also the output projection, whose gradient is dense), DDP and FSDP keep the dense default.
# ---------------------------------------------------------------------------------------------------------------


def sparse_embedding_gradient(embedding: nn.Embedding) -> None:
    embedding.sparse = True
    kept = []  # the dense gradient, created at the first backward

    def densify(weight):
        # The first backward after optimizer.zero_grad(set_to_none=True) leaves the sparse gradient itself as .grad:
        # it goes into the kept dense one, so AdamW always sees a dense gradient. Later micro-batches of the step
        # find that dense .grad, and autograd adds their sparse gradients into it in place.
        if weight.grad.is_sparse:
            if not kept:
                kept.append(torch.zeros_like(weight))
            weight.grad = kept[0].zero_().add_(weight.grad)

    embedding.weight.register_post_accumulate_grad_hook(densify)
