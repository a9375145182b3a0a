"""Batched generation with a preallocated KV cache: how MIPO gets its data. Every positive and negative
response of a preference pair is a sample from the base model (MIPO section 3), so this is the slowest
stage of a run. It knows nothing about prompts or pairs: token ids in, token ids (and log-probs) out.

Strategy: prompts are sorted longest first and cut into batches; each batch is LEFT-padded so that every
row's last prompt token sits in the same cache slot, with explicit per-row positions (a row's first real
token is position 0) and a key mask that hides the pad slots. The prefix all prompts share (a system
prompt, a few-shot preamble) is prefilled once and copied to every row, the rest in groups of rows; then
one token per step is decoded for the live rows; rows that stop leave the batch.

Each step turns the logits into a token the way transformers' generate does: the repetition penalty on the raw
logits, then temperature, top-k and top-p (or greedy argmax). The settings default as transformers' do when a call
leaves them out: from the model's generation_config.json (Sampling, config.resolve_sampling).

Shape legend: B rows in the batch, P padded prompt length, S key/value slots, V vocab.
"""
from dataclasses import dataclass

import torch
from tqdm import tqdm

@dataclass(frozen=True)
class Sampling:  # the settings of a sampling run, one per task and hardware (tasks.py) or from the flags
    temperature: float
    top_p: float = 1.0
    top_k: int | None = None  # None: the model's generation_config.json (transformers' 50 where it sets none); 0: off
    max_new_tokens: int = 512
    repetition_penalty: float | None = None  # None: the model's generation_config.json (1.0 where it sets none)


def generate_kwargs(sampling: Sampling) -> dict:
    """A Sampling whose model defaults are filled in (config.resolve_sampling) -> generate's keyword arguments."""
    if sampling.top_k is None or sampling.repetition_penalty is None:
        raise ValueError(f"{sampling}: top_k and repetition_penalty come from the model; resolve them first")
    return {"max_new_tokens": sampling.max_new_tokens, "temperature": sampling.temperature, "top_p": sampling.top_p,
            "top_k": sampling.top_k, "repetition_penalty": sampling.repetition_penalty}


DEFAULT_BATCH_SIZE = 32
PREFILL_ROWS = 8  # rows per prefill forward: big enough for efficient matmuls, small enough to waste little padding


@torch.inference_mode()
def generate(model, prompts, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, stop_token_ids=(), seed=0,
             batch_size=None, return_logprobs=False, progress=True, static=False, compile=False,
             repetition_penalty=1.0):
    """prompts: list of token-id lists. temperature=0 is greedy. repetition_penalty (1.0: off) is transformers':
    see apply_repetition_penalty. Returns, in the input order, each completion's tokens (the stop token included
    when one was emitted), or with return_logprobs (tokens, logprobs) pairs, logprobs being the model's
    log p(token) at temperature 1 of its unmodified logits: before the repetition penalty, temperature and filters,
    so that they are the log-probs the rest of the method scores responses with.

    static=True keeps every shape fixed during decoding (attention over the whole preallocated cache,
    finished rows kept in the batch), which is what torch.compile(mode="reduce-overhead") / CUDA graphs
    need; the default drops finished rows, which is faster in eager mode on a CPU. compile=True (implies
    static) runs the decode step through torch.compile, with CUDA graphs on a GPU (mode="reduce-overhead");
    the first batch of each shape pays the compilation.
    """
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or max_new_tokens < 1 or not repetition_penalty > 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0, max_new_tokens >= 1, "
                         f"repetition_penalty > 0; got {temperature}, {top_p}, {top_k}, {max_new_tokens}, "
                         f"{repetition_penalty}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    batch_size = batch_size or DEFAULT_BATCH_SIZE
    device = model.lm_head.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # longest first: least padding
    results = [None] * len(prompts)
    with tqdm(total=len(prompts), unit="prompt", desc="sampling", disable=not progress, leave=False) as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            out = generate_batch(model, [prompts[i] for i in rows], max_new_tokens, temperature, top_p, top_k,
                                 stop_token_ids, generator, static or compile, return_logprobs, compile,
                                 repetition_penalty)
            for i, completion in zip(rows, out):
                results[i] = completion if return_logprobs else completion[0]
            bar.update(len(rows))
    return results


def generate_batch(model, prompts, max_new_tokens, temperature, top_p, top_k, stop_token_ids, generator, static,
                   return_logprobs, compile=False, repetition_penalty=1.0):
    device = model.lm_head.weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    S_max = P + max_new_tokens
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    n_pad = P - lengths  # (B,)
    input_ids = torch.tensor([[0] * (P - len(p)) + list(p) for p in prompts], device=device)  # (B, P) left-padded
    # Every token of each row so far, prompt and completion, for the repetition penalty: slot P + step gets the
    # token sampled at that step. Pad slots and the slots of later steps hold the row's first token, which the row
    # holds anyway, and a repeated id is penalized once: they change nothing. (transformers penalizes the pad id of
    # a left-padded batch too; a row alone, or an unpadded batch, gets what it gets here.)
    seen = torch.tensor([[p[0]] * (P - len(p)) + list(p) + [p[0]] * max_new_tokens for p in prompts],
                        device=device)  # (B, S_max)
    positions = (torch.arange(P, device=device) - n_pad[:, None]).clamp(min=0)  # (B, P)
    slot_is_real = torch.arange(S_max, device=device)[None] >= n_pad[:, None]  # (B, S_max) key slot holds a token
    causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()
    # A pad query sees only itself: a fully masked row would give NaN, which would reach real rows
    # through the cached values (0 * NaN). Real queries never see pad keys.
    mask = (causal & slot_is_real[:, None, None, :P]) | torch.eye(P, dtype=torch.bool, device=device)  # (B, 1, P, P)
    kv_cache = model.new_kv_cache(B, S_max)
    # The tokens every prompt starts with (a chat template's system prompt, a few-shot preamble) are prefilled
    # once, in one row, and their keys/values copied into each row's slots n_pad .. n_pad + L - 1. Each row
    # keeps at least its last token to prefill itself, which gives its first logits.
    L = shared_prefix_length(prompts)
    if L > 0:
        prefix_cache = model.new_kv_cache(1, L)
        model(torch.tensor([prompts[0][:L]], device=device), kv_cache=prefix_cache,
              cache_pos=torch.arange(L, device=device), logits_index=slice(0))  # (1, L): no logits needed
        prefix_slots = (n_pad[:, None] + torch.arange(L, device=device))[:, None, :, None]  # (B, 1, L, 1)
        for (k, v), (prefix_k, prefix_v) in zip(kv_cache, prefix_cache):
            index = prefix_slots.expand(-1, k.shape[1], -1, k.shape[3])  # (B, K, L, D)
            k.scatter_(2, index, prefix_k.expand(B, -1, -1, -1))
            v.scatter_(2, index, prefix_v.expand(B, -1, -1, -1))
    # Then PREFILL_ROWS rows at a time, each group cut to its own longest prompt (the rows are sorted longest
    # first): a group skips the pad slots its rows all share and the shared prefix of its longest prompt (a
    # shorter row's prefix slots the group does cover are recomputed). The cache rows are views, written in place.
    logits = torch.empty(B, model.config.vocab_size, dtype=model.lm_head.weight.dtype, device=device)  # (B, V)
    for r in range(0, B, PREFILL_ROWS):
        rows = slice(r, r + PREFILL_ROWS)
        first = int(n_pad[rows].min()) + L  # slots before it are pads or cached prefix in every row of the group
        group_cache = [(k[rows], v[rows]) for k, v in kv_cache]
        logits[rows] = model(input_ids[rows, first:], positions[rows, first:], mask[rows, :, first:], group_cache,
                             torch.arange(first, P, device=device), logits_index=-1)

    decode = model
    if compile:
        decode = compiled_forward(model)
        for cache_tensor in (t for kv in kv_cache for t in kv):  # written in place by every step: CUDA graphs
            torch._dynamo.mark_static_address(cache_tensor)  # need it at a fixed address (re-recorded per batch)
    slots = torch.arange(S_max, device=device)
    stop_ids = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=device)
    tokens, logprobs = [[] for _ in range(B)], [[] for _ in range(B)]
    live = torch.arange(B, device=device)  # original row of each row still in the batch
    next_position = lengths.clone()  # (B,)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        logits = logits.float()  # (B, V) sampling and log-probs in float32 whatever the model dtype
        scores = logits if repetition_penalty == 1.0 else apply_repetition_penalty(logits, seen[:, :P + step],
                                                                                   repetition_penalty)
        next_token = sample(scores, temperature, top_p, top_k, generator)  # (B,)
        seen[:, P + step] = next_token
        if return_logprobs:  # log p(token) at temperature 1 of the model's own logits, unpenalized and unfiltered
            token_logprob = logits.gather(-1, next_token[:, None])[:, 0] - logits.logsumexp(dim=-1)
        else:
            token_logprob = torch.zeros_like(logits[:, 0])
        stopped = torch.isin(next_token, stop_ids) | (step == max_new_tokens - 1)
        # The one host-device sync per step: recording tokens and checking which rows stopped.
        for row, tok, lp, was_done in zip(live.tolist(), next_token.tolist(), token_logprob.tolist(), done.tolist()):
            if not was_done:
                tokens[row].append(tok)
                logprobs[row].append(lp)
        done = done | stopped
        if bool(done.all()):
            break
        if not static and bool(done.any()):
            # Finished rows leave the batch, so compute follows the live rows. The cache is compacted into
            # its own first rows: no second cache is allocated.
            keep = (~done).nonzero()[:, 0]
            kv_cache = [(k[:len(keep)].copy_(k[keep]), v[:len(keep)].copy_(v[keep])) for k, v in kv_cache]
            live, next_token, next_position, seen = live[keep], next_token[keep], next_position[keep], seen[keep]
            slot_is_real, done = slot_is_real[keep], done[keep]
        slot = P + step
        width = S_max if static else slot + 1  # static: attend over the whole cache; unwritten slots masked
        key_mask = slot_is_real[:, None, None, :width] & (slots[:width] <= slot)  # (B, 1, 1, S)
        if compile and device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the last step's logits are consumed: its buffers may be reused
        logits = decode(next_token[:, None], next_position[:, None], key_mask, kv_cache, slots[slot:slot + 1],
                        logits_index=-1)  # (B, V)
        next_position = next_position + 1
    return list(zip(tokens, logprobs))


def shared_prefix_length(prompts):
    """How many leading tokens all prompts share, leaving every prompt at least one token of its own."""
    shortest = min(prompts, key=len)
    n = 0
    while n < len(shortest) - 1 and all(p[n] == shortest[n] for p in prompts):
        n += 1
    return n


def compiled_forward(model):
    """The model's forward through torch.compile, built once per model. fullgraph: a graph break in the decode
    step would be a bug. Shapes are static within a batch; a batch of another shape recompiles once with
    dynamic shapes, which then serve every later shape."""
    if getattr(model, "compiled_forward", None) is None:
        mode = "reduce-overhead" if model.lm_head.weight.is_cuda else "default"
        model.compiled_forward = torch.compile(model.forward, mode=mode, fullgraph=True)
    return model.compiled_forward


def apply_repetition_penalty(logits, seen, penalty):
    """transformers' RepetitionPenaltyLogitsProcessor (Keskar et al. 2019, CTRL): every token id in a row of seen
    (B, N), the row's prompt and what it has generated, may repeat, has its logit divided by the penalty where it is
    positive and multiplied by it where it is negative, so that a penalty above 1 makes it less likely either way.
    Gathers and scatters only the N seen ids of each row, not the whole (B, V) vocabulary; a repeated id gets the
    same value from each of its copies. Returns new logits (B, V); the model's own stay as they were, for the
    log-probs."""
    score = logits.gather(1, seen)  # (B, N)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(1, seen, score)


def sample(logits, temperature, top_p, top_k, generator):
    """logits (B, V) float32 -> token ids (B,). temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits, token_ids = warp(logits, temperature, top_p, top_k)
    # Inverse-CDF sampling: one uniform number per row. Searching for the first cumulative mass that
    # exceeds it can never land on a filtered (zero-probability) token.
    cdf = torch.softmax(logits, dim=-1).cumsum(dim=-1)  # (B, V or K)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * cdf[:, -1:]
    choice = torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[-1] - 1)  # (B, 1)
    return choice[:, 0] if token_ids is None else token_ids.gather(-1, choice)[:, 0]


def warp(logits, temperature, top_p, top_k):
    """transformers' warpers in its order: temperature, then top-k and top-p. logits (B, V) -> the logits a token is
    drawn from by softmax, and None; or, with a filter, the candidates' logits (B, K) with filtered ones at -inf, and
    their token ids (B, K) (top_k_top_p)."""
    if temperature != 1.0:
        logits = logits / temperature
    if top_k > 0 or top_p < 1.0:
        return top_k_top_p(logits, top_k, top_p)
    return logits, None


def top_k_top_p(logits, top_k, top_p):
    """Top-k, then nucleus (Holtzman et al. 2020: the smallest set of most likely tokens whose mass
    reaches top_p; the top token always survives), in transformers' order. Returns the candidates'
    logits (B, K), sorted descending with filtered ones at -inf, and their token ids (B, K)."""
    V = logits.shape[-1]
    if top_k > 0:
        values, token_ids = torch.topk(logits, min(top_k, V), dim=-1)  # (B, K) sorted descending
        if top_p < 1.0:  # the mass is renormalized over the distribution top-k leaves
            probs = torch.softmax(values, dim=-1)
            values = values.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, float("-inf"))
        return values, token_ids
    row_max = logits.max(dim=-1, keepdim=True).values  # (B, 1)
    total = torch.exp(-(row_max - logits)).sum(dim=-1, keepdim=True)  # (B, 1) the softmax's denominator
    values, token_ids = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = torch.exp(values - row_max) / total
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
    return values.masked_fill(mass_before >= top_p, float("-inf")), token_ids
