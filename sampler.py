"""Batched generation with a preallocated KV cache: how MIPO samples every y+ and y- from the base model (MIPO
section 3). Token ids in, token ids (and log-probs) out.

generate batches the prompts longest first; generate_batch runs one: prefill, then a decode_step per token, the
host looking every 8 steps for rows that stopped. Tokens are picked as by transformers' generate: penalty on the raw
logits, temperature, top-k, top-p, with one uniform per row and step hashed from (seed, row, step)
(docs/walkthrough.md, step 2; unset settings: mipo.resolve_sampling).

Shape legend: B rows in the batch, P padded prompt length, S key/value slots, V vocab.
"""
from dataclasses import dataclass

import torch
from tqdm import tqdm

@dataclass(frozen=True)
class Sampling:  # one per task and hardware (tasks.py), or from the flags
    temperature: float
    top_p: float = 1.0
    top_k: int | None = None  # None: from generation_config.json (transformers' 50 if unset); 0: off
    max_new_tokens: int = 512
    repetition_penalty: float | None = None  # None: from generation_config.json (1.0 if unset)


def generate_kwargs(sampling: Sampling) -> dict:
    """A resolved Sampling (mipo.resolve_sampling) -> generate's kwargs."""
    if sampling.top_k is None or sampling.repetition_penalty is None:
        raise ValueError(f"{sampling}: top_k and repetition_penalty come from the model; resolve them first")
    return {"max_new_tokens": sampling.max_new_tokens, "temperature": sampling.temperature, "top_p": sampling.top_p,
            "top_k": sampling.top_k, "repetition_penalty": sampling.repetition_penalty}


DEFAULT_BATCH_SIZE = 32
PREFILL_ROWS = 8  # rows per prefill forward: efficient matmuls, little padding wasted


@torch.inference_mode()
def generate(model, prompts, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, stop_token_ids=(), seed=0,
             batch_size=None, return_logprobs=False, progress=True, static=False, compile=None,
             repetition_penalty=1.0, top_k_top_p=None):
    """Token-id lists -> each completion's tokens (stop token included if emitted), in input order; with
    return_logprobs (tokens, logprobs): log p(token) at temperature 1 of the raw logits (before penalty, temperature
    and filters), as the method scores responses. temperature=0: greedy.

    static=True: fixed shapes (whole-cache attention, finished rows kept) for CUDA graphs; else finished rows are
    dropped (faster eager). compile=True (implies static): a torch.compile'd decode step, CUDA graphs on a GPU
    (default: the model's compile_decode attribute, which the commands' --compile set, else off).
    top_k_top_p: a faster filter of the same candidates (default: the model's, else ours).
    """
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or max_new_tokens < 1 or not repetition_penalty > 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0, max_new_tokens >= 1, "
                         f"repetition_penalty > 0; got {temperature}, {top_p}, {top_k}, {max_new_tokens}, "
                         f"{repetition_penalty}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    # transforms/cpu_speedups.py's apply gives a CPU model its filter
    top_k_top_p = top_k_top_p or getattr(model, "top_k_top_p", None) or plain_top_k_top_p
    compile = getattr(model, "compile_decode", False) if compile is None else compile
    batch_size = batch_size or DEFAULT_BATCH_SIZE
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, top_k_top_p=top_k_top_p, seed=seed)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # longest first: least padding
    results = [None] * len(prompts)
    with tqdm(total=len(prompts), unit="prompt", desc="sampling", disable=not progress, leave=False) as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            out = generate_batch(model, [prompts[i] for i in rows], rows, max_new_tokens, stop_token_ids,
                                 static or compile, compile, repetition_penalty, return_logprobs, **sampling)
            for i, completion in zip(rows, out):
                results[i] = completion if return_logprobs else completion[0]
            bar.update(len(rows))
    return results


LOOK_EVERY = 8  # decode steps between the host's looks at which rows stopped (and dropping them); see generate_batch


def generate_batch(model, prompts, ids, max_new_tokens, stop_token_ids, static, compile, repetition_penalty,
                   return_logprobs, **sampling):
    """prefill, then a decode_step per token until every row stops -> (tokens, log-probs) per row; ids: each
    prompt's index in generate's list, which (with the seed and the step) alone decides its random draws.

    Tokens, log-probs and stop flags stay on the device: the host looks at the flags once every LOOK_EVERY steps
    (dropping the rows that stopped, unless static) and fetches the tokens once at the end, so on a GPU the queue
    never drains in between. A row that stopped between looks decodes on until the next; its extra tokens are
    cut at its first stop token."""
    logits, batch = prefill(model, prompts, max_new_tokens)
    device = logits.device
    decode = model
    if compile:
        decode = compiled_forward(model)
        for cache_tensor in (t for kv in batch.kv_cache for t in kv):  # written in place each step: CUDA graphs
            torch._dynamo.mark_static_address(cache_tensor)  # need a fixed address (re-recorded per batch)
    batch.ids = torch.tensor(ids, device=device)
    stop_ids = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=device)
    tokens = torch.zeros(len(prompts), max_new_tokens, dtype=torch.long, device=device)  # (B, N) by row as prefilled
    logprobs = torch.zeros(len(prompts), max_new_tokens, device=device)  # (B, N)
    for step in range(max_new_tokens):
        next_token, token_logprob = decode_step(decode, batch, step, None if step else logits, static, compile,
                                                repetition_penalty, return_logprobs, **sampling)
        tokens[batch.live, step], logprobs[batch.live, step] = next_token, token_logprob
        batch.done = batch.done | torch.isin(next_token, stop_ids)
        if (step + 1) % LOOK_EVERY == 0 and step + 1 < max_new_tokens:
            done = batch.done.tolist()  # the host's look
            if all(done):
                break
            if not static and any(done):  # stopped rows leave the batch
                batch.keep(torch.tensor([row for row, d in enumerate(done) if not d], device=device))
    stop, out = set(stop_token_ids), []
    for row_tokens, row_logprobs in zip(*torch.stack((tokens.double(), logprobs.double())).tolist()):  # one fetch
        n = next((i + 1 for i, t in enumerate(row_tokens) if t in stop), max_new_tokens)  # up to its first stop
        out.append(([int(t) for t in row_tokens[:n]], row_logprobs[:n]))
    return out


@dataclass
class Batch:  # what a batch's decode steps carry (see prefill); B: rows still decoding
    kv_cache: list
    seen: torch.Tensor
    slot_is_real: torch.Tensor
    next_position: torch.Tensor  # (B,) of the token the next forward reads
    P: int
    live: torch.Tensor  # (B,) each row's index in the batch as prefilled
    done: torch.Tensor  # (B,) stopped (kept while static, and until the host's next look)
    ids: torch.Tensor = None  # (B,) each row's index in generate's prompts: its random draws
    next_token: torch.Tensor = None  # (B,) sampled last

    def keep(self, rows):  # compacted in place: no second cache
        self.kv_cache = [(k[:len(rows)].copy_(k[rows]), v[:len(rows)].copy_(v[rows])) for k, v in self.kv_cache]
        for name in ("seen", "slot_is_real", "next_position", "live", "done", "ids", "next_token"):
            setattr(self, name, getattr(self, name)[rows])


def prefill(model, prompts, max_new_tokens):
    """prompts (B, longest first) -> first-token logits (B, V), Batch. The KV cache (S = P + max_new_tokens slots)
    is LEFT-padded: each row's last prompt token in slot P - 1, so a step writes one slot for all rows; positions
    count from a row's first real token."""
    device = model.lm_head.weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    S_max = P + max_new_tokens
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    n_pad = P - lengths  # (B,)
    input_ids = torch.tensor([[0] * (P - len(p)) + list(p) for p in prompts], device=device)  # (B, P) left-padded
    # Each row's tokens, for the repetition penalty (slot P + step: that step's). Pad and later slots hold its first
    # token, penalized once anyway (unlike transformers, which also penalizes a left-padded batch's pad id).
    seen = torch.tensor([[p[0]] * (P - len(p)) + list(p) + [p[0]] * max_new_tokens for p in prompts],
                        device=device)  # (B, S_max)
    positions = (torch.arange(P, device=device) - n_pad[:, None]).clamp(min=0)  # (B, P)
    slot_is_real = torch.arange(S_max, device=device)[None] >= n_pad[:, None]  # (B, S_max) key slot holds a token
    causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()
    # A pad query sees only itself: a fully masked row would give NaN, reaching real rows through the cached values
    # (0 * NaN). Real queries never see pad keys.
    mask = (causal & slot_is_real[:, None, None, :P]) | torch.eye(P, dtype=torch.bool, device=device)  # (B, 1, P, P)
    kv_cache = model.new_kv_cache(B, S_max)
    # The prefix all prompts share (system prompt, few-shot preamble) is prefilled once and its keys/values copied
    # into each row's slots n_pad .. n_pad + L - 1; each row prefills at least its last token itself.
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
    # Then PREFILL_ROWS rows at a time, skipping the pad slots a group's rows share and the cached prefix (a shorter
    # row's prefix slots in the group's span are recomputed). Cache rows are views, written in place.
    logits = torch.empty(B, model.config.vocab_size, dtype=model.lm_head.weight.dtype, device=device)  # (B, V)
    for r in range(0, B, PREFILL_ROWS):
        rows = slice(r, r + PREFILL_ROWS)
        pads = [P - len(p) for p in prompts[rows]]
        first = min(pads) + L  # earlier slots: pads or cached prefix in every row
        # Rows of one length and no cached prefix: plain causal rows, no mask (a GPU's fused attention kernel)
        group_mask = None if L == 0 and min(pads) == max(pads) else mask[rows, :, first:]
        group_cache = [(k[rows], v[rows]) for k, v in kv_cache]
        logits[rows] = model(input_ids[rows, first:], positions[rows, first:], group_mask, group_cache,
                             torch.arange(first, P, device=device), logits_index=-1)
    return logits, Batch(kv_cache, seen, slot_is_real, lengths.clone(), P, torch.arange(B, device=device),
                         torch.zeros(B, dtype=torch.bool, device=device))


def decode_step(decode, batch, step, logits, static, compile, repetition_penalty, return_logprobs, seed, **sampling):
    """One token per live row: logits (prefill's at step 0, else a forward of the last token), penalty, sample,
    log-prob -> tokens, log-probs or zeros (B,)."""
    if logits is None:
        slot = batch.P + step - 1
        slots = torch.arange(batch.seen.shape[1], device=batch.seen.device)
        width = len(slots) if static else slot + 1  # static: attend over the whole cache; unwritten slots masked
        key_mask = batch.slot_is_real[:, None, None, :width] & (slots[:width] <= slot)  # (B, 1, 1, S)
        if compile and slots.is_cuda:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's logits are consumed: its buffers may be reused
        logits = decode(batch.next_token[:, None], batch.next_position[:, None], key_mask, batch.kv_cache,
                        slots[slot:slot + 1], logits_index=-1)  # (B, V)
        batch.next_position = batch.next_position + 1
    logits = logits.float()  # (B, V) sample and log-probs in float32 whatever the dtype
    scores = logits if repetition_penalty == 1.0 else apply_repetition_penalty(logits, batch.seen[:, :batch.P + step],
                                                                               repetition_penalty)
    next_token = batch.next_token = sample(scores, u=uniforms(seed, batch.ids, step), **sampling)  # (B,)
    batch.seen[:, batch.P + step] = next_token
    if return_logprobs:  # the model's own: unpenalized, unfiltered, temperature 1
        return next_token, logits.gather(-1, next_token[:, None])[:, 0] - logits.logsumexp(dim=-1)
    return next_token, torch.zeros_like(logits[:, 0])


def shared_prefix_length(prompts):
    """Leading tokens all prompts share, leaving each at least one of its own."""
    shortest = min(prompts, key=len)
    n = 0
    while n < len(shortest) - 1 and all(p[n] == shortest[n] for p in prompts):
        n += 1
    return n


def compiled_forward(model):
    """model.forward through torch.compile, built once (fullgraph: a graph break would be a bug). A new batch shape
    recompiles once, with dynamic shapes for every later one."""
    if getattr(model, "compiled_forward", None) is None:
        mode = "reduce-overhead" if model.lm_head.weight.is_cuda else "default"
        model.compiled_forward = torch.compile(model.forward, mode=mode, fullgraph=True)
    return model.compiled_forward


def apply_repetition_penalty(logits, seen, penalty):
    """transformers' RepetitionPenaltyLogitsProcessor (Keskar et al. 2019, CTRL): a seen (B, N) id's logit is divided
    by the penalty if positive, else multiplied (> 1: less likely). Only seen ids are gathered and scattered (a
    repeat writes one value). -> new logits (B, V); the model's stay, for log-probs."""
    score = logits.gather(1, seen)  # (B, N)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(1, seen, score)


def sample(logits, temperature, top_p, top_k, u, top_k_top_p=None):
    """logits (B, V) float32, u (B,) uniforms in [0, 1) -> token ids (B,). temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits, token_ids = warp(logits, temperature, top_p, top_k, top_k_top_p)
    # Inverse-CDF, one uniform per row: the first cumulative mass above it is never a filtered token
    cdf = torch.softmax(logits, dim=-1).cumsum(dim=-1)  # (B, V or K)
    choice = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True).clamp(max=cdf.shape[-1] - 1)  # (B, 1)
    return choice[:, 0] if token_ids is None else token_ids.gather(-1, choice)[:, 0]


def uniforms(seed: int, ids, step: int):
    """One uniform in [0, 1) per row (B,): a hash of (seed, the row's id, step), so that a row's tokens depend on
    nothing else: not its batch mates, the batch size or the device. The hash is splitmix64 (Steele et al. 2014),
    written with int64 tensor ops (they wrap around), its top 24 bits the float32 fraction."""
    key = _splitmix64(seed % 2**64)
    x = _mix64(_mix64(ids + (key - 2**64 if key >= 2**63 else key)) + step)  # (B,) int64
    return ((x >> 40) & (2**24 - 1)).float() * 2**-24


_GOLDEN, _MUL1, _MUL2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _splitmix64(x: int) -> int:  # the same mix on a Python int, kept to 64 bits
    x = (x + _GOLDEN) % 2**64
    x = ((x ^ (x >> 30)) * _MUL1) % 2**64
    x = ((x ^ (x >> 27)) * _MUL2) % 2**64
    return x ^ (x >> 31)


def _mix64(x):
    """splitmix64 of an int64 tensor: unsigned constants and logical right shifts, in two's complement."""
    signed = lambda c: c - 2**64  # noqa: E731  (the constants are above 2**63)
    shr = lambda x, n: (x >> n) & (2**(64 - n) - 1)  # noqa: E731  (>> on int64 keeps the sign bit)
    x = x + signed(_GOLDEN)
    x = (x ^ shr(x, 30)) * signed(_MUL1)
    x = (x ^ shr(x, 27)) * signed(_MUL2)
    return x ^ shr(x, 31)


def warp(logits, temperature, top_p, top_k, top_k_top_p=None):
    """transformers' warpers in order: temperature, top-k, top-p. logits (B, V) -> (logits, None), or with a filter
    top_k_top_p's (candidates' logits, token ids) (B, K)."""
    if temperature != 1.0:
        logits = logits / temperature
    if top_k > 0 or top_p < 1.0:
        return (top_k_top_p or plain_top_k_top_p)(logits, top_k, top_p)
    return logits, None


def top_k_top_p(logits, top_k, top_p):
    """Top-k, then nucleus (Holtzman et al. 2020: the fewest most likely tokens whose mass reaches top_p; the top
    token always survives) -> candidates' logits (B, K), sorted descending, filtered ones -inf, and ids (B, K)."""
    V = logits.shape[-1]
    if top_k > 0:
        values, token_ids = torch.topk(logits, min(top_k, V), dim=-1)  # (B, K) sorted descending
        if top_p < 1.0:  # mass renormalized over what top-k leaves
            probs = torch.softmax(values, dim=-1)
            values = values.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, float("-inf"))
        return values, token_ids
    row_max = logits.max(dim=-1, keepdim=True).values  # (B, 1)
    total = torch.exp(-(row_max - logits)).sum(dim=-1, keepdim=True)  # (B, 1) the softmax's denominator
    values, token_ids = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = torch.exp(values - row_max) / total
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
    return values.masked_fill(mass_before >= top_p, float("-inf")), token_ids


plain_top_k_top_p = top_k_top_p  # warp's default, which its argument hides
