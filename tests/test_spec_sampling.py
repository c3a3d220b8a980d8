"""Speculative sampling keeps plain sampling's distribution (sdsat/decode/sample_accept.py).

Hand-made distributions check the acceptance rules against their closed forms; a tiny model
with a 16-token vocabulary checks the distribution of the first three generated tokens
against the exact one (computed with transformers' own logits warpers), with drafts that are
often right and drafts that are always wrong. Seeds are fixed, so every run draws the same.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from sdsat.decode.batch import Batch, Sequence
from sdsat.decode.decoding import prefill
from sdsat.decode.fused import RowNodes, fused_pass
from sdsat.decode.generate import generate, make_sequences
from sdsat.decode.kv_cache import SlotCache
from sdsat.decode.row_tree import accept_rows, row_trees
from sdsat.decode.sample_accept import RowSampler, accept_proposals, sample_nodes
from sdsat.decode.scheduler import Scheduler
from sdsat.decode.target import SamplingParams, inverse_cdf, penalize, target_probs
from sdsat.model.load import LoadedModel
from sdsat.model.sat import SATConfig
from tests.conftest import TinyTokenizer, hf_greedy, tiny_loaded, tiny_model

VOCAB = 16
SATS = list(range(12, 16))  # banned: never drawn, so a SAT id is a draft that is always wrong
PROMPT = [1, 2, 3, 4, 5]


def tv(freq: torch.Tensor, expected: torch.Tensor) -> float:
    return 0.5 * float((freq - expected).abs().sum())


def chi_square_p(counts: dict, expected: dict, n: int) -> float:
    """p-value of a chi-square test; outcomes expected fewer than 5 times are pooled."""
    stat, df, pooled_obs, pooled_exp = 0.0, -1, 0.0, 0.0
    for outcome in set(counts) | set(expected):
        e, o = expected.get(outcome, 0.0) * n, counts.get(outcome, 0)
        if e < 5:
            pooled_obs, pooled_exp = pooled_obs + o, pooled_exp + e
            continue
        stat, df = stat + (o - e) ** 2 / e, df + 1
    if pooled_exp > 0:
        stat, df = stat + (pooled_obs - pooled_exp) ** 2 / pooled_exp, df + 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))


# --- The target distribution ---------------------------------------------------------------------


def test_target_applies_temperature_top_k_and_top_p_keeping_ties():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5], [0.25, 0.25, 0.25, 0.25]])
    params = [SamplingParams(1.0, top_p=0.75), SamplingParams(1.0, top_k=2), SamplingParams(1.0, top_p=0.3)]
    out = target_probs(probs.log(), params)
    assert torch.allclose(out[0], torch.tensor([0.625, 0.375, 0, 0]))
    assert torch.allclose(out[1], torch.tensor([0, 0, 0.375, 0.625]))
    assert torch.allclose(out[2], probs[2])  # the nucleus needs 2 tokens; all 4 are tied
    # top-k first, then top-p on what top-k kept: {0.5, 0.3} renormalised is {0.625, 0.375}.
    both = target_probs(probs[:1].log(), [SamplingParams(1.0, top_p=0.6, top_k=2)])
    assert torch.allclose(both[0], torch.tensor([1.0, 0, 0, 0]))
    hot = target_probs(probs[:1].log(), [SamplingParams(0.5)])
    assert torch.allclose(hot[0], probs[0] ** 2 / (probs[0] ** 2).sum())


def test_top_p_on_a_large_vocabulary_is_the_smallest_nucleus():
    logits = torch.randn(4, 5000, generator=torch.Generator().manual_seed(0)) * 3
    out = target_probs(logits, [SamplingParams(1.0, top_p=0.95)] * 4)
    ordered = torch.softmax(logits, -1).sort(dim=-1, descending=True).values
    nucleus = ((ordered.cumsum(-1) - ordered) < 0.95).sum(-1)
    assert torch.equal((out > 0).sum(-1), nucleus)
    assert int(nucleus.min()) > 64  # beyond the first look: the widening path ran


def test_penalties_count_generated_tokens_and_the_path_to_the_node():
    logits = torch.zeros(1, 3, 5)  # [B, N, V]: the root and two nodes
    counts = torch.tensor([[0.0, 2, 0, 1, 0]])
    path = torch.tensor([[[-1, -1], [2, -1], [2, 2]]])  # node 1: path (2); node 2: path (2, 2)
    out = penalize(logits, counts, torch.tensor([0.5]), torch.tensor([0.25]), path)
    root = torch.tensor([0, -1.0, 0, -0.75, 0])  # presence 0.5 + 0.25 per count
    assert torch.allclose(out[0, 0], root)
    assert torch.allclose(out[0, 1], root + torch.tensor([0, 0, -0.75, 0, 0]))
    assert torch.allclose(out[0, 2], root + torch.tensor([0, 0, -1.0, 0, 0]))


def test_inverse_cdf_never_draws_an_impossible_token():
    probs = torch.tensor([[0.0, 0.5, 0.5, 0.0]] * 4)
    u = torch.tensor([0.0, 0.5, 0.5001, 1 - 1e-16], dtype=torch.float64)
    assert inverse_cdf(probs, u).tolist() == [1, 1, 2, 2]


def test_inverse_cdf_by_blocks_agrees_with_one_cumulative_sum():
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(64, 1000, generator=gen) * (torch.rand(64, 1000, generator=gen) < 0.3)  # 1000: a partial block
    u = torch.rand(64, dtype=torch.float64, generator=gen)
    cdf = probs.double().cumsum(-1)
    expected = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None])[:, 0]
    assert torch.equal(inverse_cdf(probs, u), expected)


def test_sampling_params_validate():
    SamplingParams(0.0)  # greedy
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=-1), dict(top_k=1.5), dict(presence_penalty=3)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)


# --- The walk for deterministic drafts, on hand-made distributions ----------------------------


def samplers(n: int, params: SamplingParams = SamplingParams(1.0), first_seed: int = 0) -> list[RowSampler]:
    return [RowSampler(replace(params, seed=first_seed + i)) for i in range(n)]


def test_walk_acceptance_matches_the_closed_form():
    # Tree: root -> node 1 (token 1) -> node 2 (token 0); root -> node 3 (token 2).
    rows = 20000
    p0, p1 = torch.tensor([0.1, 0.4, 0.3, 0.2]), torch.tensor([0.5, 0.1, 0.1, 0.3])
    logits = torch.stack([p0, p1, p0, p0]).log().expand(rows, -1, -1)  # [B, 4, V]
    tokens = torch.tensor([3, 1, 0, 2]).expand(rows, -1)
    t = row_trees(((-1, 0, 1, 0),) * rows, "cpu")
    own = samplers(rows)
    z = sample_nodes(logits, tokens, t.depths, t.paths, own, None)
    paths, emitted, _ = accept_rows(tokens, z, t)
    emitted = [row[1:] for row in emitted]  # the root's own token is not new
    a = torch.tensor([len(p) - 1 for p in paths])
    first = torch.tensor([e[0] for e in emitted])
    assert tv(torch.bincount(first, minlength=4) / rows, p0) < 0.015
    assert abs(float((a >= 1).float().mean()) - float(p0[1] + p0[2])) < 0.015  # descends on 1 or 2
    assert abs(float((a == 2).float().mean()) - float(p0[1] * p1[0])) < 0.015
    second = torch.tensor([e[1] for e, p in zip(emitted, paths) if p[:2] == [0, 1]])
    assert tv(torch.bincount(second, minlength=4) / len(second), p1) < 0.02  # the draw after token 1
    # Each row spends one uniform per emitted token: its n-th token is drawn with uniform n.
    for sampler, row in zip(own[:50], emitted[:50]):
        assert row[0] == int(inverse_cdf(p0[None], sampler.uniforms(1))[0])


def test_temperature_zero_draws_the_argmax_and_greedy_rows_stay_greedy():
    logits = torch.randn(3, 5, 10, generator=torch.Generator().manual_seed(1))
    tokens = torch.zeros(3, 5, dtype=torch.long)
    t = row_trees(((-1, 0, 1, 0, 3),) * 3, "cpu")
    own = [RowSampler(SamplingParams(0.0)), None, RowSampler(SamplingParams(1.0, seed=0))]
    banned = torch.tensor([9])
    z = sample_nodes(logits, tokens, t.depths, t.paths, own, banned)
    greedy = logits.index_fill(-1, banned, float("-inf")).argmax(-1)
    assert torch.equal(z[:2], greedy[:2])


# --- Drafts drawn from a proposal q: min(1, p/q) with residual draws ------------------------------


def proposal_walk(p: torch.Tensor, q: torch.Tensor, parents: tuple[int, ...], rows: int, seed: int = 0):
    """Draw every node's token from its proposal q[node] (independently) and run the rule.
    p [N, V]: target after each node; q [N, V]: proposal of each node (row 0 unused)."""
    gen = torch.Generator().manual_seed(seed)
    n = len(parents)
    tokens = torch.zeros(rows, n, dtype=torch.long)
    for i in range(1, n):
        tokens[:, i] = torch.multinomial(q[i], rows, replacement=True, generator=gen)
    depth = max(row_trees((parents,), "cpu").depths[0].tolist())
    width = max(sum(1 for x in parents[1:] if x == j) for j in range(n))
    u = torch.rand(rows, depth + 1, width + 1, dtype=torch.float64, generator=gen)
    paths, emitted, _ = accept_proposals(tokens, p.expand(rows, -1, -1), q.expand(rows, -1, -1), [list(parents)] * rows, u)
    return tokens, paths, emitted


def test_one_proposal_is_accepted_with_the_overlap_and_keeps_p():
    p0, q1 = torch.tensor([0.1, 0.4, 0.3, 0.2]), torch.tensor([0.4, 0.4, 0.1, 0.1])
    rows = 40000
    _, paths, emitted = proposal_walk(torch.stack([p0, p0]), torch.stack([q1, q1]), (-1, 0), rows)
    accepted = sum(len(path) > 1 for path in paths) / rows
    assert abs(accepted - float(torch.minimum(p0, q1).sum())) < 0.01  # 0.1 + 0.4 + 0.1 + 0.1
    first = torch.tensor([e[0] for e in emitted])
    assert tv(torch.bincount(first, minlength=4) / rows, p0) < 0.01


def test_sibling_proposals_try_in_turn_against_the_residual():
    p0, q = torch.tensor([0.1, 0.4, 0.3, 0.2]), torch.tensor([0.4, 0.4, 0.1, 0.1])
    rows = 40000
    _, paths, emitted = proposal_walk(torch.stack([p0, p0, p0]), torch.stack([q, q, q]), (-1, 0, 0), rows)
    beta1 = torch.minimum(p0, q).sum()
    residual = (p0 - q).clamp(min=0)
    beta2 = torch.minimum(residual / residual.sum(), q).sum()
    accepted = sum(len(path) > 1 for path in paths) / rows
    assert abs(accepted - float(beta1 + (1 - beta1) * beta2)) < 0.01
    first = torch.tensor([e[0] for e in emitted])
    assert tv(torch.bincount(first, minlength=4) / rows, p0) < 0.01


def test_a_chain_of_proposals_keeps_p_at_every_depth():
    # root -> node 1 (from q1) -> node 2 (from q2, drawn without seeing node 1, as SAT drafts are).
    p0, p1, p2 = torch.tensor([0.1, 0.4, 0.3, 0.2]), torch.tensor([0.6, 0.1, 0.1, 0.2]), torch.tensor([0.25] * 4)
    q1, q2 = torch.tensor([0.2, 0.5, 0.2, 0.1]), torch.tensor([0.3, 0.3, 0.2, 0.2])
    rows = 40000
    _, paths, emitted = proposal_walk(torch.stack([p0, p1, p2]), torch.stack([q1, q1, q2]), (-1, 0, 1), rows)
    deep = [e for path, e in zip(paths, emitted) if len(path) > 1]
    assert abs(len(deep) / rows - float(torch.minimum(p0, q1).sum())) < 0.01
    second = torch.tensor([e[1] for e in deep])
    assert tv(torch.bincount(second, minlength=4) / len(deep), p1) < 0.015
    deepest = sum(len(path) == 3 for path in paths) / len(deep)
    assert abs(deepest - float(torch.minimum(p1, q2).sum())) < 0.015


def test_a_fixed_draft_is_a_one_hot_proposal():
    p0 = torch.tensor([0.1, 0.4, 0.3, 0.2])
    one_hot = torch.tensor([0.0, 0.0, 1.0, 0.0])
    rows = 40000
    _, paths, emitted = proposal_walk(torch.stack([p0, p0]), torch.stack([one_hot, one_hot]), (-1, 0), rows)
    assert abs(sum(len(path) > 1 for path in paths) / rows - 0.3) < 0.01
    first = torch.tensor([e[0] for e in emitted])
    assert tv(torch.bincount(first, minlength=4) / rows, p0) < 0.01


# --- On a tiny model: SDSAT sampling vs plain sampling ---------------------------------------------


@pytest.fixture(scope="module")
def peaked():
    """A 16-token random model with peaked next-token distributions (perplexity ~4-8)."""
    model = tiny_model(vocab=VOCAB, layers=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(12)
    return model


def exact_first_tokens(model, params: SamplingParams, n: int) -> dict[tuple[int, ...], float]:
    """The exact distribution of the first n sampled tokens, with transformers' own warpers."""
    warpers = [TemperatureLogitsWarper(params.temperature), TopPLogitsWarper(params.top_p)]
    dist = {(): 1.0}
    for _ in range(n):
        prefixes = list(dist)
        ids = torch.tensor([PROMPT + list(pre) for pre in prefixes])
        with torch.no_grad():
            logits = model(ids).logits[:, -1].float()
        logits[:, SATS] = float("-inf")
        for warp in warpers:
            logits = warp(ids, logits)
        probs = torch.softmax(logits, -1)
        dist = {pre + (tok,): dist[pre] * float(row[tok]) for pre, row in zip(prefixes, probs) for tok in row.nonzero()[:, 0].tolist()}
    return dist


def plain_sample(model, params: list[SamplingParams], n: int) -> list[list[int]]:
    """Plain sampling: one pass per token."""
    batch = Batch(model, banned_ids=SATS)
    sequences = [Sequence(PROMPT, n) for _ in params]
    batch.add(sequences, params)
    while len(batch):
        batch.step([])
    return [s.output_ids for s in sequences]


def seeded(rows: int, params: SamplingParams, first_seed: int = 0) -> list[SamplingParams]:
    return [replace(params, seed=first_seed + i) for i in range(rows)]


@torch.inference_mode()
def spec_sample(model, own: list[RowSampler | None], n: int, drafts, prompt=PROMPT, sat_ids=(), banned=SATS):
    """Speculative sampling with fused passes: drafts(outputs) gives each row a chain of drafts;
    sat_ids: every pass also runs a draft block, whose guesses the next pass verifies (a
    second chain). Returns (outputs, accepted drafts per row)."""
    rows = len(own)
    filler = banned[0]
    banned = torch.tensor(banned)
    cache = SlotCache.for_model(model, rows)
    last = prefill(model, cache, [prompt] * rows, 0)
    pending = [[] for _ in range(rows)]
    outputs, accepted = [[] for _ in range(rows)], [0] * rows
    draw = lambda *args: sample_nodes(*args, own, banned)  # noqa: E731
    while min(len(o) for o in outputs) < n:
        nodes = []
        for chain, sat in zip(drafts(outputs), pending):
            parents = [i - 1 for i in range(len(sat))] + [-1 if i == 0 else len(sat) + i - 1 for i in range(len(chain))]
            nodes.append(RowNodes(sat + chain, parents, len(sat_ids)))
        width = max(2, 1 + max(len(r.drafts) + r.block for r in nodes))
        emitted, last, pending, acc = fused_pass(model, cache, last, nodes, width, list(sat_ids), banned, filler, draw)
        for row, tokens in enumerate(emitted):
            if own[row] is not None:
                own[row].advance(tokens)
            outputs[row] += tokens
            accepted[row] += acc[row]
    return [o[:n] for o in outputs], accepted


def oracle(references: list[list[int]], wrong_every: int = 0):
    """Drafts: the next 3 tokens of each row's reference (every wrong_every-th row a wrong one)."""

    def drafts(outputs):
        out = []
        for row, o in enumerate(outputs):
            chain = references[row][len(o) : len(o) + 3]
            if wrong_every and row % wrong_every == 0 and chain:
                chain = [(chain[0] + 1) % 12] + chain[1:]
            out.append(chain)
        return out

    return drafts


ROWS, FIRST = 2000, 3  # samples, and how many first tokens form an outcome


@pytest.fixture(scope="module")
def plain_runs(peaked):
    """Plain sampling of FIRST + 2 tokens for ROWS seeds (and ROWS other seeds), per temperature."""
    runs = {}

    def run(temperature: float, first_seed: int = 0) -> list[list[int]]:
        key = (temperature, first_seed)
        if key not in runs:
            runs[key] = plain_sample(peaked, seeded(ROWS, SamplingParams(temperature, top_p=0.9), first_seed), FIRST + 2)
        return runs[key]

    return run


@pytest.mark.parametrize("temperature", [0.7, 1.0])
@pytest.mark.parametrize("kind", ["often right", "independent", "always wrong"])
def test_spec_sampling_keeps_the_distribution_of_the_first_tokens(peaked, plain_runs, temperature, kind):
    params = SamplingParams(temperature, top_p=0.9)
    rows, n = ROWS, FIRST
    expected = exact_first_tokens(peaked, params, n)
    plain = plain_runs(temperature)
    if kind == "often right":  # the row's own plain output (right unless rounding flips a draw), some spoiled
        drafts = oracle(plain, wrong_every=3)
    elif kind == "independent":  # another seed's plain output: drafts that know nothing of this row's draws
        drafts = oracle(plain_runs(temperature, first_seed=10**6))
    else:  # SAT ids: probability 0 under the target
        drafts = lambda outputs: [[SATS[1], SATS[2]] for _ in outputs]  # noqa: E731
    out, accepted = spec_sample(peaked, samplers(rows, params), n, drafts)
    counts: dict = {}
    for row in out:
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    assert chi_square_p(counts, expected, rows) > 1e-3
    plain_counts: dict = {}
    for row in plain:
        plain_counts[tuple(row[:n])] = plain_counts.get(tuple(row[:n]), 0) + 1
    assert chi_square_p(plain_counts, expected, rows) > 1e-3
    if kind == "always wrong":
        assert sum(accepted) == 0
    else:
        assert sum(accepted) > rows * (1.0 if kind == "often right" else 0.2)
    # Each output token is drawn with its own position's uniform: seeded rows give plain's tokens.
    same = sum(row == ref[:n] for row, ref in zip(out, plain))
    assert same >= rows - 3


def test_the_distribution_check_catches_a_biased_sampler(peaked, plain_runs):
    """The check above can fail: outputs that repeat their first token are caught."""
    expected = exact_first_tokens(peaked, SamplingParams(1.0, top_p=0.9), FIRST)
    counts: dict = {}
    for row in plain_runs(1.0):
        counts[tuple(row[:FIRST])] = counts.get(tuple(row[:FIRST]), 0) + 1
    wrong: dict = {}
    for (a, b, c), k in counts.items():
        wrong[(a, a, a)] = wrong.get((a, a, a), 0) + k  # every token drawn as the first was
    assert chi_square_p(wrong, expected, ROWS) < 1e-6


def test_seeded_rows_repeat_alone_and_beside_other_rows(peaked):
    params = SamplingParams(0.8, top_p=0.95, seed=1234)
    alone, _ = spec_sample(peaked, [RowSampler(params)], 30, lambda outputs: [[] for _ in outputs])
    again, _ = spec_sample(peaked, [RowSampler(params)], 30, lambda outputs: [[7, 7] for _ in outputs])
    crowd = [RowSampler(SamplingParams(1.0, seed=s)) for s in range(3)]
    crowd.insert(2, RowSampler(params))
    beside, accepted = spec_sample(peaked, crowd + [None], 30, oracle([alone[0]] * 5))
    assert alone[0] == again[0] == beside[2]
    assert accepted[2] > 0
    assert beside[0] != beside[1]
    other = spec_sample(peaked, [RowSampler(replace(params, seed=99))], 30, lambda outputs: [[] for _ in outputs])[0]
    assert other[0] != alone[0]


def test_penalised_sampling_through_drafts_gives_plain_sampling_tokens(peaked):
    params = SamplingParams(0.9, presence_penalty=1.5, frequency_penalty=0.7)
    rows, n = 64, 24
    plain = plain_sample(peaked, seeded(rows, params), n + 3)
    out, accepted = spec_sample(peaked, samplers(rows, params), n, oracle(plain))
    assert out == [row[:n] for row in plain]
    assert sum(accepted) > rows * n / 3
    unpenalised = plain_sample(peaked, seeded(rows, replace(params, presence_penalty=0, frequency_penalty=0)), n)
    repeats = lambda outs: sum(len(row) - len(set(row)) for row in outs)  # noqa: E731
    assert repeats(plain) < repeats(unpenalised)


@pytest.mark.parametrize("temperature", [0.0, None])  # a temperature-0 sampler, or a greedy row
def test_temperature_zero_is_greedy_with_lookup_and_sat_drafts(temperature):
    loaded = tiny_loaded(k=8)
    prompts = [[5, 6, 7, 5, 6, 7, 5, 6], [9, 9, 9, 9]]
    refs = [hf_greedy(loaded, p, 40) for p in prompts]
    for prompt, ref in zip(prompts, refs):
        own = [RowSampler(SamplingParams(0.0)) if temperature == 0.0 else None]
        drafts = oracle([ref])
        out, _ = spec_sample(loaded.model, own, 40, drafts, prompt, loaded.sat.sat_ids[:3], loaded.sat.unique_ids)
        assert out[0] == ref


# --- In the scheduled batch: greedy and sampling rows share passes ---------------------------------


def test_scheduled_batch_mixes_greedy_and_sampling_rows(peaked):
    """The default decoder (scheduler, lookup tries, SAT drafts) with sampling rows beside a
    greedy one: every row gives its plain decoding's tokens, and sampling rows accept drafts."""
    sat = SATConfig(sat_ids=SATS, sat_tokens=[f"<sat_{i}>" for i in range(1, len(SATS) + 1)])
    loaded = LoadedModel(model=peaked, tokenizer=TinyTokenizer(), sat=sat, source="peaked", path="")
    prompts = [[1, 2, 3, 4] * 6, [5, 6, 7] * 8, [8, 9] * 10, [1, 2, 3, 4] * 6]
    sampling = [SamplingParams(0.8, seed=3), None, SamplingParams(1.0, top_p=0.9, seed=4), SamplingParams(0.5, seed=5)]
    plain = generate(loaded, make_sequences(loaded, prompts, 40, eos=False), 0, sampling=sampling)
    spec = generate(
        loaded, make_sequences(loaded, prompts, 40, eos=False), len(SATS), lookup=8, scheduler=Scheduler(lambda rows, q: 1.0), sampling=sampling
    )
    assert [s.output_ids for s in spec] == [s.output_ids for s in plain]
    assert plain[1].output_ids == hf_greedy(loaded, prompts[1], 40)
    for row in (0, 2, 3):
        assert spec[row].stats.drafted > 0 and spec[row].stats.accepted > 0
        assert spec[row].stats.iterations < 40
    assert spec[0].output_ids != spec[3].output_ids  # same prompt, other seed and temperature
