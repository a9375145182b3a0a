"""The sampler is exact: cached, batched, left-padded decoding gives what a full recompute of each row
alone gives; the filters are exact on hand-made logits; sampling follows softmax(logits / T)."""

import pytest
import torch

from conftest import make_tiny_model
import sampler
from sampler import generate, sample, top_k_top_p

PROMPTS = [[5, 9, 3], [7], [11, 2, 8, 4, 6, 1, 30], [3, 3], [60, 61, 62, 63, 64]]


def greedy_full_recompute(model, prompt, max_new_tokens, stop_ids=(), repetition_penalty=1.0):
    """The slow reference: no cache, no batch, the whole sequence re-run every step; the penalty written out on
    every distinct token the sequence holds."""
    ids = list(prompt)
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids]))[0, -1]
        for t in set(ids):
            logits[t] = logits[t] / repetition_penalty if logits[t] > 0 else logits[t] * repetition_penalty
        tok = int(logits.argmax())
        ids.append(tok)
        if tok in stop_ids:
            break
    return ids[len(prompt):]


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("prefill_rows", [1, 2, 8])
def test_greedy_ragged_batch_equals_each_row_alone_without_cache(model_type, static, prefill_rows, monkeypatch):
    """Whatever groups of rows the prefill runs in (each cut to its own longest prompt)."""
    monkeypatch.setattr(sampler, "PREFILL_ROWS", prefill_rows)
    model = make_tiny_model(model_type)
    with torch.no_grad():
        expected = [greedy_full_recompute(model, p, 12) for p in PROMPTS]
    got = generate(model, PROMPTS, 12, temperature=0, batch_size=5, progress=False, static=static)
    assert got == expected


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("prefill_rows", [1, 2, 8])
def test_shared_prefix_prefilled_once_gives_what_each_row_gives_alone(static, prefill_rows, monkeypatch):
    """Prompts that start alike (a system prompt): the shared tokens are prefilled once and copied to every row,
    including a prompt that is the prefix plus one token and rows whose group recomputes part of the prefix."""
    monkeypatch.setattr(sampler, "PREFILL_ROWS", prefill_rows)
    model = make_tiny_model("qwen2")
    prefix = [40, 41, 42, 43, 44]
    prompts = [prefix + p for p in PROMPTS] + [prefix[:-1] + [50]]
    assert sampler.shared_prefix_length(prompts) == 4
    with torch.no_grad():
        expected = [greedy_full_recompute(model, p, 10) for p in prompts]
    assert generate(model, prompts, 10, temperature=0, batch_size=6, progress=False, static=static) == expected
    assert sampler.shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # each prompt keeps one token of its own
    assert sampler.shared_prefix_length([[1, 2], [3, 2]]) == 0


def test_compiled_decode_gives_the_eager_tokens_and_compiles_once_per_shape(tiny_model):
    """compile=True sends the decode step through torch.compile with fullgraph (a graph break fails). On a CPU
    this checks that its shapes stay fixed over the steps, which CUDA graphs need: one graph serves every step
    of a batch, and after a second batch shape (compiled with dynamic shapes) a third needs no new graph."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = generate(tiny_model, PROMPTS, 8, temperature=0, static=True, return_logprobs=True, progress=False)
    compiled = generate(tiny_model, PROMPTS, 8, temperature=0, compile=True, return_logprobs=True, progress=False)
    assert [t for t, _ in compiled] == [t for t, _ in eager]
    assert max(abs(a - b) for (_, x), (_, y) in zip(compiled, eager) for a, b in zip(x, y)) < 1e-4
    assert counters["stats"]["unique_graphs"] == 1
    generate(tiny_model, [[1, 2, 3, 4, 5, 6, 7, 8, 9]] + PROMPTS[:2], 12, temperature=0, compile=True, progress=False)
    generate(tiny_model, PROMPTS[:2], 5, temperature=0, compile=True, progress=False)
    assert counters["stats"]["unique_graphs"] == 2
    torch._dynamo.reset()


def test_the_decode_loop_looks_at_the_host_once_every_8_steps(tiny_model, monkeypatch):
    """A 64-token decode (rows stopping, leaving at the looks) waits on the device at most once per LOOK_EVERY = 8
    steps after prefill: every item / tolist / bool / nonzero / cpu call is counted (on a GPU each one drains the
    queue)."""
    calls = []
    for name in ("item", "tolist", "__bool__", "nonzero", "cpu"):
        def counted(self, *args, _original=getattr(torch.Tensor, name), _name=name, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    prefill = sampler.prefill
    monkeypatch.setattr(sampler, "prefill", lambda *args: (prefill(*args), calls.clear())[0])  # count after it
    free = generate(tiny_model, PROMPTS, 64, temperature=1.0, top_p=0.9, seed=2, progress=False)
    assert all(len(t) == 64 for t in free) and len(calls) <= 64 // sampler.LOOK_EVERY, calls
    stop = [free[0][20], free[1][30]]  # two rows stop early, and leave the batch at a look
    out = generate(tiny_model, PROMPTS, 64, temperature=1.0, top_p=0.9, seed=2, stop_token_ids=stop,
                   return_logprobs=True, progress=False)
    assert min(len(t) for t, _ in out) <= 21 and max(len(t) for t, _ in out) == 64
    assert len(calls) <= 64 // sampler.LOOK_EVERY, calls


@pytest.mark.parametrize("temperature, top_p", [(1.0, 0.9), (0.7, 1.0)])
def test_a_rows_tokens_depend_on_the_seed_and_its_index_alone(tiny_model, temperature, top_p):
    """Each row's draws are a hash of (seed, its index, step): the same tokens in any batch size, static or not,
    whichever rows stop (and leave) around it; its index in generate's list, not its content, picks them."""
    run = lambda prompts, **kw: generate(tiny_model, prompts, 24, temperature=temperature, top_p=top_p, seed=5,  # noqa: E731
                                         stop_token_ids=stop, progress=False, **kw)
    stop = []
    free = run(PROMPTS)
    stop = [free[2][5], free[4][12]]
    out = run(PROMPTS, batch_size=5)
    assert len({len(t) for t in out}) > 2 and max(len(t) for t in out) > sampler.LOOK_EVERY  # rows leave at looks
    assert run(PROMPTS, batch_size=2) == run(PROMPTS, batch_size=1) == run(PROMPTS, static=True) == out
    twice = run(PROMPTS + PROMPTS)
    assert twice[:5] == out and twice[5:] != out  # other indices, other draws


def test_uniforms_are_splitmix64_of_seed_index_and_step():
    """The tensor hash equals the same hash on Python integers (wrap-around and shifts exact), for seeds past 2**63;
    draws look uniform and uncorrelated across rows and steps."""
    def splitmix64(x):
        x = (x + 0x9E3779B97F4A7C15) % 2**64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
        return x ^ (x >> 31)

    for seed in (0, 7, 2**63 + 1, 2**70 + 3):
        for step in (0, 1, 511):
            expected = [(splitmix64((splitmix64((i + splitmix64(seed % 2**64)) % 2**64) + step) % 2**64) >> 40)
                        * 2**-24 for i in range(20)]
            assert sampler.uniforms(seed, torch.arange(20), step).tolist() == expected
    u = torch.stack([sampler.uniforms(3, torch.arange(1000), step) for step in range(200)])  # (steps, rows)
    assert abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.002
    assert abs(torch.corrcoef(torch.stack([u[1:, :-1].flatten(), u[:-1, 1:].flatten()]))[0, 1]) < 0.01


def test_prefill_gives_each_rows_next_token_logits_and_the_batch_to_decode(tiny_model):
    prompts = sorted(PROMPTS, key=len, reverse=True)
    logits, batch = sampler.prefill(tiny_model, prompts, 4)
    with torch.no_grad():
        for row, prompt in zip(logits, prompts):
            assert torch.allclose(row, tiny_model(torch.tensor([prompt]))[0, -1], atol=1e-5)
    assert batch.P == 7 and batch.seen.shape == batch.slot_is_real.shape == (5, 11)
    assert batch.next_position.tolist() == [len(p) for p in prompts] and batch.live.tolist() == [0, 1, 2, 3, 4]


def test_the_filter_comes_from_the_argument_else_from_the_model_else_the_plain_one():
    """transforms/cpu_speedups.py gives a CPU model its filter as an attribute; an argument overrides it."""
    calls = []

    def counted(logits, top_k, top_p):
        calls.append(top_p)
        return top_k_top_p(logits, top_k, top_p)

    model = make_tiny_model("qwen2")
    run = lambda **filter: generate(model, PROMPTS, 5, temperature=0.9, top_p=0.8, seed=1, progress=False, **filter)
    plain = run()
    assert run(top_k_top_p=counted) == plain and calls
    calls.clear()
    model.top_k_top_p = counted
    assert run() == plain and calls
    calls.clear()
    assert run(top_k_top_p=top_k_top_p) == plain and not calls


def test_stop_ids_end_each_row_and_are_included(tiny_model):
    with torch.no_grad():
        free = [greedy_full_recompute(tiny_model, p, 10) for p in PROMPTS]
    stop = free[0][3]  # a token row 0 emits at its 4th step
    got = generate(tiny_model, PROMPTS, 10, temperature=0, stop_token_ids=[stop], progress=False)
    for row, completion in zip(free, got):
        cut = row.index(stop) + 1 if stop in row else len(row)
        assert completion == row[:cut]
    assert got[0][-1] == stop and len(got[0]) == 4


@pytest.mark.parametrize("static", [False, True])
def test_greedy_repetition_penalty_covers_prompt_and_completion_in_a_ragged_batch(static):
    """Rows of different lengths, some stopping early and leaving the batch: each row is penalized on its own
    tokens only. The penalty is large enough to change the tiny model's greedy tokens."""
    model = make_tiny_model("qwen2")
    with torch.no_grad():
        free = [greedy_full_recompute(model, p, 12) for p in PROMPTS]
        expected = [greedy_full_recompute(model, p, 12, (free[0][2],), repetition_penalty=3.0) for p in PROMPTS]
    assert expected != [r[:len(e)] for r, e in zip(free, expected)]
    got = generate(model, PROMPTS, 12, temperature=0, stop_token_ids=[free[0][2]], repetition_penalty=3.0,
                   batch_size=5, progress=False, static=static)
    assert got == expected


@pytest.mark.parametrize("repetition_penalty", [1.0, 1.3])
def test_max_new_tokens_and_logprobs(tiny_model, repetition_penalty):
    """The log-probs are the model's own at temperature 1, whatever the penalty did to the choice."""
    out = generate(tiny_model, PROMPTS, 6, temperature=1.0, seed=3, return_logprobs=True, progress=False,
                   repetition_penalty=repetition_penalty)
    for prompt, (tokens, logprobs) in zip(PROMPTS, out):
        assert len(tokens) == len(logprobs) == 6
        with torch.no_grad():  # the log-prob of each sampled token under a full forward, temperature 1
            logits = tiny_model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1:-1]
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(logprobs), expected, atol=1e-5)


def test_same_seed_same_tokens_other_seed_other_tokens(tiny_model):
    run = lambda seed: generate(tiny_model, PROMPTS, 8, temperature=1.5, top_p=0.95, seed=seed, batch_size=2,
                                progress=False)
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    probs = torch.softmax(logits, -1)
    u = torch.rand(200, generator=torch.Generator().manual_seed(0))
    assert set(sample(logits.expand(200, 5), 1.0, 1.0, 2, u).tolist()) == {1, 3}
    assert sample(logits.expand(200, 5), 1.0, 1.0, 1, u).tolist() == [1] * 200 and probs.argmax() == 1


def kept_tokens(logits, top_k, top_p):
    values, ids = top_k_top_p(logits, top_k, top_p)
    return sorted(ids[0][torch.isfinite(values[0])].tolist())


def test_top_p_keeps_smallest_set_reaching_p():
    logits = torch.tensor([[0.05, 0.5, 0.3, 0.15]]).log()
    assert kept_tokens(logits, 0, 0.49) == [1]  # 0.5 alone reaches 0.49
    assert kept_tokens(logits, 0, 0.6) == [1, 2]  # 0.5 < 0.6 <= 0.8
    assert kept_tokens(logits, 0, 0.9) == [1, 2, 3]  # 0.8 < 0.9 <= 0.95
    assert kept_tokens(logits, 0, 0.96) == [0, 1, 2, 3]
    assert kept_tokens(logits, 0, 0.01) == [1]  # the top token always survives


def test_top_p_after_top_k_renormalizes_within_the_k():
    logits = torch.tensor([[0.05, 0.5, 0.3, 0.15]]).log()
    # top-2 leaves {0.5, 0.3} -> renormalized {0.625, 0.375}: 0.6 is reached by the first alone
    assert kept_tokens(logits, 2, 0.6) == [1]
    assert kept_tokens(logits, 2, 0.7) == [1, 2]


def full_sort_nucleus(logits, top_p):
    """The textbook nucleus: sort the whole vocabulary, keep while the mass before is below top_p
    (the same float arithmetic as top_k_top_p, so rounding at the boundary is the same too)."""
    values, ids = logits.sort(dim=-1, descending=True)
    row_max = values[:, :1]
    probs = torch.exp(values - row_max) / torch.exp(logits - row_max).sum(-1, keepdim=True)
    return [sorted(i[(p.cumsum(-1) - p) < top_p].tolist()) for p, i in zip(probs, ids)]


@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0])
def test_nucleus_equals_the_textbook_on_realistic_vocabularies(scale):
    logits = torch.randn(8, 49152, generator=torch.Generator().manual_seed(0)) * scale  # flat to peaked rows
    for top_p in (0.5, 0.9, 0.99):
        values, ids = top_k_top_p(logits, 0, top_p)
        assert [sorted(i[torch.isfinite(v)].tolist()) for v, i in zip(values, ids)] == full_sort_nucleus(logits, top_p)


def test_nucleus_with_banned_tokens_at_minus_infinity():
    logits = torch.tensor([[0.05, 0.5, 0.3, 0.15, 0.0]]).log()  # the last token has probability 0
    assert kept_tokens(logits, 0, 0.9) == [1, 2, 3]
    assert kept_tokens(logits, 0, 0.999) == [0, 1, 2, 3]


def test_filtered_sampling_follows_the_renormalized_distribution():
    logits = torch.tensor([[0.05, 0.5, 0.3, 0.15]]).log().expand(20000, 4)
    draws = sample(logits, 1.0, 0.9, 0, torch.rand(20000, generator=torch.Generator().manual_seed(0)))
    freq = torch.bincount(draws, minlength=4).float() / 20000
    assert freq[0] == 0 and torch.allclose(freq[1:], torch.tensor([0.5, 0.3, 0.15]) / 0.95, atol=0.015)


def test_first_token_distribution_matches_softmax_over_temperature():
    """Chi-square goodness of fit of 4000 first tokens against softmax(logits / T), fixed seed. The tiny model's
    lm_head is scaled back from make_tiny_model's x20 to x2, so the distribution is far from one-hot (p from 0.004
    to 0.54 at T = 0.7) and every token is expected at least 5 times, where the chi-square test is valid."""
    model = make_tiny_model(vocab_size=11)
    with torch.no_grad():
        model.lm_head.weight.div_(10)
    prompt, T, n = [3, 1, 4], 0.7, 4000
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([prompt]))[0, -1].double() / T, -1)
    expected = probs * n
    assert expected.min().item() >= 5 and probs.max().item() < 0.6
    draws = generate(model, [prompt] * n, 1, temperature=T, seed=0, batch_size=1000, progress=False)
    counts = torch.bincount(torch.tensor([d[0] for d in draws]), minlength=11).double()
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 29.588  # the 99.9% quantile of chi-square with 10 degrees of freedom


def test_repetition_penalty_on_a_hand_made_row():
    """transformers' rule: a seen token's logit is divided by the penalty when positive, multiplied when negative
    (zero stays zero); a token seen twice is penalized once; unseen tokens keep theirs; the input is left alone."""
    logits = torch.tensor([[3.0, -1.0, 1.75, -3.0, 4.5, 0.0]])
    seen = torch.tensor([[0, 1, 4, 1, 5]])  # prompt tokens 0 and 1, then 4 generated, 1 again, and 5 (logit 0)
    penalized = sampler.apply_repetition_penalty(logits, seen, 3.0)
    assert penalized.tolist() == [[1.0, -3.0, 1.75, -3.0, 1.5, 0.0]]
    assert logits.tolist() == [[3.0, -1.0, 1.75, -3.0, 4.5, 0.0]]
    assert int(sample(logits, 0, 1.0, 0, None)) == 4 and int(sample(penalized, 0, 1.0, 0, None)) == 2  # greedy moves


@pytest.mark.parametrize("penalty, temperature, top_k, top_p", [(1.3, 0.7, 20, 0.9), (1.1, 1.0, 20, 1.0),
                                                                 (1.05, 0.1, 50, 0.8), (1.0, 1.5, 0, 0.95),
                                                                 (0.8, 1.0, 5, 1.0), (1.3, 1.0, 0, 1.0)])
def test_penalty_and_filters_equal_transformers_processors(penalty, temperature, top_k, top_p):
    """What generate draws from: the penalty on the raw logits, then warp (temperature, top-k, top-p), equals
    transformers' processors in the order its generate applies them: the same surviving tokens with the same
    renormalized probabilities, on random rows with ids seen once or more."""
    from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                              TopKLogitsWarper, TopPLogitsWarper)

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 2000, generator=g) * 3
    seen = torch.randint(0, 2000, (6, 40), generator=g)  # prompt and completion so far, with repeats
    processors = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(penalty), TemperatureLogitsWarper(temperature)]
                                     + ([TopKLogitsWarper(top_k)] if top_k else [])
                                     + ([TopPLogitsWarper(top_p)] if top_p < 1 else []))
    expected = torch.log_softmax(processors(seen, logits.clone()), dim=-1)

    values, ids = sampler.warp(sampler.apply_repetition_penalty(logits, seen, penalty), temperature, top_p, top_k)
    scores = values if ids is None else torch.full_like(logits, float("-inf")).scatter(1, ids, values)
    got = torch.log_softmax(scores, dim=-1)  # log-probs: the unlikely tokens count as much as the likely ones
    assert torch.equal(got.isfinite(), expected.isfinite())
    assert torch.allclose(got, expected, atol=1e-5)  # -inf where filtered, on both sides
    assert top_k == 0 or int(got.isfinite().sum(-1).max()) <= top_k


def test_bad_arguments(tiny_model):
    with pytest.raises(ValueError, match="top_p"):
        generate(tiny_model, PROMPTS, 4, top_p=0.0)
    with pytest.raises(ValueError, match="at least one token"):
        generate(tiny_model, [[]], 4)
    with pytest.raises(ValueError, match="repetition_penalty > 0"):
        generate(tiny_model, PROMPTS, 4, repetition_penalty=0.0)
    with pytest.raises(ValueError, match="resolve them first"):  # a Sampling still waiting for the model's defaults
        sampler.generate_kwargs(sampler.Sampling(0.7))
