"""Greedy tree verification equals plain greedy decoding, token for token (fp32, tiny random models)."""

from __future__ import annotations

import pytest
import torch

from sdsat.decode.decoding import forward, greedy, prefill
from sdsat.decode.generate import generate, make_sequences, oracle_drafts
from sdsat.decode.kv_cache import SlotCache
from sdsat.decode.tree import DraftTree, best_tree, sdsat_tree_step, tree_accept, tree_candidates, true_token_ranks
from tests.conftest import hf_greedy, tiny_loaded
from tests.test_decoding import logits_for

NEW_TOKENS = 48
RAGGED = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25], [3]]
SPECS = ["2,2,1", "3,2,1,1,1", "2,1,2,1,2,1", "0;1;2;0.0;1.0;1.1;0.0.0;1.0.0.0"]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request):
    loaded = tiny_loaded(request.param, k=8)
    refs = [hf_greedy(loaded, p, NEW_TOKENS) for p in RAGGED]
    return loaded, refs


def run(loaded, prompts, k, override=None, tree=None):
    seqs = make_sequences(loaded, prompts, NEW_TOKENS, eos=False)
    return generate(loaded, seqs, k, override(seqs) if override else None, tree)


def planted(references: list[list[int]], rank: list[int], garbage: int = 200):
    """A candidate override that puts the true draft at candidate rank rank[i-1] of depth i
    and garbage at the other ranks, so the accepted path runs through those ranks.

    references[b]: row b's full greedy output; ``done[b]`` tokens are already emitted.
    """
    done = [0] * len(references)

    def override(candidates: torch.Tensor) -> torch.Tensor:  # [B, k, C]
        batch, k, width = candidates.shape
        out = torch.full_like(candidates, garbage)
        out += torch.arange(width)  # distinct garbage per rank
        for b, ref in enumerate(references):
            for i in range(k):
                at = done[b] + 1 + i  # y0 is token done[b]; the depth-i draft is token done[b]+i
                if at < len(ref) and rank[i] < width:
                    out[b, i, rank[i]] = ref[at]
        return out

    return override, done


def decode_planted(loaded, prompts, refs, tree: DraftTree, rank: list[int]):
    """Decode with sdsat_tree_step and planted candidates; return (outputs, accepted per step, cache, last)."""
    model = loaded.model
    cache = SlotCache.for_model(model, len(prompts))
    banned = torch.tensor(loaded.sat.unique_ids)
    sat = torch.tensor(loaded.sat.ids_for(tree.depth))
    override, done = planted(refs, rank)
    outputs = [[] for _ in prompts]
    accepted = []
    with torch.inference_mode():
        last = prefill(model, cache, prompts, 0)
        while min(len(o) for o in outputs) < NEW_TOKENS:
            emitted, last, paths = sdsat_tree_step(model, cache, last, sat, banned, tree, override)
            for b, tokens in enumerate(emitted):
                outputs[b] += tokens
                done[b] = len(outputs[b])
            accepted.append([len(p) - 1 for p in paths])
    return outputs, accepted, cache, last


# --- The tree itself ---------------------------------------------------------------------------


def test_tree_from_counts_structure():
    tree = DraftTree.parse("2,2,1")
    assert tree.size == 1 + 2 + 4 + 4
    assert (tree.depth, tree.width) == (3, 2)
    assert tree.parents == (-1, 0, 0, 1, 1, 2, 2, 3, 4, 5, 6)
    assert tree.depths == (0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3)
    assert tree.ranks == (0, 0, 1, 0, 1, 0, 1, 0, 0, 0, 0)
    anc = tree.on("cpu").ancestors
    assert anc[9].nonzero()[:, 0].tolist() == [0, 2, 5, 9]  # rank path (1, 0, 0)
    assert torch.equal(anc.diagonal(), torch.ones(tree.size, dtype=torch.bool))
    assert not anc.triu(1).any()  # parents come before children


def test_tree_from_paths_adds_prefixes_and_dedupes():
    tree = DraftTree.parse("1.0.0;0;0.0;0.0")
    assert tree.ranks == (0, 0, 1, 0, 0, 0)
    assert tree.depths == (0, 1, 1, 2, 2, 3)
    assert tree.parents == (-1, 0, 0, 1, 2, 4)


def test_chain_tree_is_causal():
    tree = DraftTree.chain(4)
    assert tree.size == 5 and tree.width == 1
    assert torch.equal(tree.on("cpu").ancestors, torch.ones(5, 5, dtype=torch.bool).tril())
    assert tree.on("cpu").depths.tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("spec", ["", "2,0,1", "1;-1", "a,b"])
def test_bad_specs_are_refused(spec):
    with pytest.raises(ValueError, match="bad tree spec"):
        DraftTree.parse(spec)


def test_tree_candidates_gathers_ranks_per_depth():
    tree = DraftTree.parse("2,2")
    y0 = torch.tensor([7])
    candidates = torch.tensor([[[10, 11], [20, 21]]])  # [B=1, k=2, C=2]
    assert tree_candidates(y0, candidates, tree).tolist() == [[7, 10, 11, 20, 21, 20, 21]]


# --- The acceptance rule on hand-made logits: +/-100 so the argmax is known -------------------
# tree "2,2": nodes 0 root, 1 (0,), 2 (1,), 3 (0,0), 4 (0,1), 5 (1,0), 6 (1,1)
TREE_22 = DraftTree.parse("2,2")


def test_accept_root_only():
    tokens = torch.tensor([[1, 4, 5, 6, 7, 6, 7]])
    z = greedy(logits_for([[9, 0, 0, 0, 0, 0, 0]]), None)  # the model wants 9 after y0: no candidate
    paths, emitted, bonus = tree_accept(tokens, z, TREE_22)
    assert paths == [[0]]
    assert emitted == [[1, 9]]
    assert torch.equal(bonus, torch.tensor([9]))


def test_accept_second_candidate_at_depth_1():
    tokens = torch.tensor([[1, 4, 5, 6, 7, 6, 7]])
    # after y0 the model wants 5 (node 2, rank 1); after node 2 it wants 7 (node 6); then 12
    z = greedy(logits_for([[5, 3, 7, 0, 0, 0, 12]]), None)
    paths, emitted, bonus = tree_accept(tokens, z, TREE_22)
    assert paths == [[0, 2, 6]]
    assert emitted == [[1, 5, 7, 12]]
    assert torch.equal(bonus, torch.tensor([12]))


def test_accept_second_candidate_then_stop():
    tokens = torch.tensor([[1, 4, 5, 6, 7, 6, 7]])
    z = greedy(logits_for([[5, 6, 9, 0, 0, 0, 0]]), None)  # node 1's child would match, but node 1 is wrong
    paths, emitted, _ = tree_accept(tokens, z, TREE_22)
    assert paths == [[0, 2]]
    assert emitted == [[1, 5, 9]]


def test_accept_full_path_plus_bonus():
    tokens = torch.tensor([[1, 4, 5, 6, 7, 6, 7]])
    z = greedy(logits_for([[4, 6, 0, 11, 0, 0, 0]]), None)
    paths, emitted, bonus = tree_accept(tokens, z, TREE_22)
    assert paths == [[0, 1, 3]]
    assert emitted == [[1, 4, 6, 11]]
    assert torch.equal(bonus, torch.tensor([11]))


def test_accept_mixed_batch():
    tokens = torch.tensor([[1, 4, 5, 6, 7, 6, 7], [2, 4, 5, 6, 7, 6, 7], [3, 4, 5, 6, 7, 6, 7]])
    z = greedy(
        logits_for([[8, 0, 0, 0, 0, 0, 0], [4, 7, 0, 0, 13, 0, 0], [5, 0, 6, 0, 0, 14, 0]]), None
    )
    paths, emitted, bonus = tree_accept(tokens, z, TREE_22)
    assert paths == [[0], [0, 1, 4], [0, 2, 5]]
    assert emitted == [[1, 8], [2, 4, 7, 13], [3, 5, 6, 14]]
    assert torch.equal(bonus, torch.tensor([8, 13, 14]))


def test_accept_chain_tree_matches_chain_rule():
    """The chain tree's rule equals decoding.accept's: longest prefix, stop at the first mismatch."""
    from sdsat.decode.decoding import accept

    tokens = torch.tensor([[1, 4, 5, 6], [1, 4, 5, 6], [1, 4, 5, 6]])
    z = greedy(logits_for([[4, 9, 6, 2], [4, 5, 6, 11], [7, 5, 6, 2]]), None)
    _, emitted, bonus = tree_accept(tokens, z, DraftTree.chain(3))
    chain_emitted, chain_bonus = accept(tokens[:, 0], tokens[:, 1:], z)
    assert emitted == chain_emitted == [[1, 4, 9], [1, 4, 5, 6, 11], [1, 7]]
    assert torch.equal(bonus, chain_bonus)


# --- Decoding with a tree equals plain greedy --------------------------------------------------


@pytest.mark.parametrize("spec", SPECS)
def test_tree_matches_greedy_batch_1(tiny, spec):
    loaded, refs = tiny
    k = DraftTree.parse(spec).depth
    for prompt, ref in zip(RAGGED, refs):
        (seq,) = run(loaded, [prompt], k, tree=spec)
        assert seq.output_ids == ref


@pytest.mark.parametrize("spec", SPECS + ["2,2,2,2,2,2"])
def test_tree_matches_greedy_ragged_batch(tiny, spec):
    loaded, refs = tiny
    out = run(loaded, RAGGED, DraftTree.parse(spec).depth, tree=spec)
    assert [s.output_ids for s in out] == refs


@pytest.mark.parametrize("rank", [[1, 0, 0], [1, 1, 0], [0, 1, 0], [1, 1, 1]])
def test_planted_candidates_off_the_first_rank_are_accepted(tiny, rank):
    """True drafts at rank 1 of some depths: accepted paths leave the first branch, so the
    cache compaction moves keys; the output is still exactly greedy."""
    loaded, refs = tiny
    tree = DraftTree.parse("2,2,2")
    outputs, accepted, _, _ = decode_planted(loaded, RAGGED, refs, tree, rank)
    assert [o[:NEW_TOKENS] for o in outputs] == refs
    assert all(a == 3 for a in accepted[0])  # every row accepted the whole planted path


def test_planted_rank_outside_tree_stops_there(tiny):
    """The tree "2,1,1" holds no rank-1 node at depth 2: rows accept depth 1 only."""
    loaded, refs = tiny
    outputs, accepted, _, _ = decode_planted(loaded, RAGGED, refs, DraftTree.parse("2,1,1"), [1, 1, 0])
    assert [o[:NEW_TOKENS] for o in outputs] == refs
    assert all(a == 1 for step in accepted[:-1] for a in step)


def test_cache_compaction_matches_full_forward(tiny):
    """After tree steps that accept non-contiguous nodes, the cached state's next-token logits
    equal a plain forward of the whole sequence."""
    loaded, refs = tiny
    prompts = RAGGED
    outputs, accepted, cache, last = decode_planted(loaded, prompts, refs, DraftTree.parse("2,2,2"), [1, 0, 1])
    assert any(a == 3 for step in accepted for a in step)
    with torch.inference_mode():
        cached = forward(loaded.model, cache, last[:, None])[:, 0]  # [B, V]
        for b, (prompt, out) in enumerate(zip(prompts, outputs)):
            assert cache.lengths[b] == len(prompt) + len(out) - 1
            full = loaded.model(torch.tensor([prompt + out])).logits[0, -1]
            torch.testing.assert_close(cached[b], full, atol=1e-4, rtol=1e-4)


def test_chain_tree_equals_chain_step(tiny):
    """The tree "1,...,1" gives the same tokens and the same stats as today's chain."""
    loaded, refs = tiny
    k = 5

    def decode(tree):  # rows 0 and 2 draft the truth, rows 1 and 3 their own SAT drafts
        seqs = make_sequences(loaded, RAGGED, NEW_TOKENS, eos=False)
        right = oracle_drafts({s.seq_id: r for s, r in zip(seqs, refs)})
        good = {seqs[0].seq_id, seqs[2].seq_id}

        def mixed(sequences, drafts):
            pick = torch.tensor([s.seq_id in good for s in sequences])[:, None]
            return torch.where(pick, right(sequences, drafts), drafts)

        return generate(loaded, seqs, k, mixed, tree)

    chain, tree = decode(None), decode(DraftTree.chain(k))
    assert [s.output_ids for s in chain] == [s.output_ids for s in tree] == refs
    for a, b in zip(chain, tree):
        assert (a.stats.iterations, a.stats.forward_passes, a.stats.new_tokens) == (
            b.stats.iterations,
            b.stats.forward_passes,
            b.stats.new_tokens,
        )
        assert a.stats.accepted_per_offset == b.stats.accepted_per_offset
        assert a.stats.drafted_per_offset == b.stats.drafted_per_offset
    assert chain[0].stats.accepted > chain[1].stats.accepted


@pytest.mark.parametrize("spec", ["2,2,1", "3,2,1,1,1"])
def test_oracle_drafts_accepted_by_tree(tiny, spec):
    """The oracle override replaces the first candidate of each depth: every draft accepted."""
    loaded, refs = tiny
    k = DraftTree.parse(spec).depth
    seqs = make_sequences(loaded, RAGGED, NEW_TOKENS, eos=False)
    generate(loaded, seqs, k, oracle_drafts({s.seq_id: r for s, r in zip(seqs, refs)}), spec)
    assert [s.output_ids for s in seqs] == refs
    iterations = -(-NEW_TOKENS // (k + 2))
    for seq in seqs:
        assert seq.stats.iterations == iterations
        assert seq.stats.accepted >= (iterations - 1) * k


def test_garbage_drafts_accept_nothing_at_first_rank(tiny):
    loaded, refs = tiny
    seqs = make_sequences(loaded, RAGGED, NEW_TOKENS, eos=False)
    wrong = oracle_drafts({s.seq_id: r for s, r in zip(seqs, refs)}, wrong=True, vocab_size=200)
    generate(loaded, seqs, 3, wrong, "1,1,1")
    assert [s.output_ids for s in seqs] == refs
    assert all(s.stats.accepted == 0 for s in seqs)


def test_tree_deeper_than_k_is_refused(tiny):
    loaded, _ = tiny
    with pytest.raises(ValueError, match="needs num_sat >= 3"):
        run(loaded, RAGGED[:1], 2, tree="2,2,1")


def test_shallower_tree_drafts_its_own_depth(tiny):
    loaded, refs = tiny
    (seq,) = run(loaded, RAGGED[:1], 6, tree="2,2")
    assert seq.output_ids == refs[0]
    assert len(seq.stats.drafted_per_offset) == 2  # draft passes used 2 SATs, not 6


# --- The default model in fp32 -----------------------------------------------------------------

DEFAULT_PROMPTS = ["def fibonacci(n):\n", "import json\n\ndef load_config(path):\n    \"\"\"Read a JSON config file.\"\"\"\n"]
DEFAULT_NEW_TOKENS = 64


@pytest.mark.slow
@pytest.mark.parametrize("oracle", [False, True])
def test_default_model_tree_equals_plain_greedy(default_fp32, oracle):
    """fp32, tree "2,2,1,1,1" (k=5): identical to plain greedy, or a near-tie flip (as in
    tests/test_default_model_lossless.py: a pass over 19 tokens can round ~1e-6 differently)."""
    from tests.test_default_model_lossless import assert_same_or_tie

    loaded = default_fp32
    prompts = [loaded.tokenizer.encode(p) for p in DEFAULT_PROMPTS]
    plain = [s.output_ids for s in generate(loaded, make_sequences(loaded, prompts, DEFAULT_NEW_TOKENS, eos=False), 0)]
    seqs = make_sequences(loaded, prompts, DEFAULT_NEW_TOKENS, eos=False)
    override = oracle_drafts({s.seq_id: p for s, p in zip(seqs, plain)}) if oracle else None
    generate(loaded, seqs, 5, override, "2,2,1,1,1")
    assert_same_or_tie(loaded, prompts, plain, [s.output_ids for s in seqs])
    if oracle:
        assert all(s.stats.tau > 6.0 for s in seqs)  # 7 tokens per iteration but the last


def test_best_tree_takes_the_most_frequent_rank_prefixes():
    observed = [(0, 0, 3), (0, 0, 0), (1, 0, 0), (1, 0, 5), (0, 2, 0), (4, 4, 4)]
    # prefix counts: (0,)=3 (1,)=2 (0,0)=2 (1,0)=2 (0,0,0)=1 ...; the root is free
    tree = best_tree(observed, 4)
    assert tree == DraftTree.parse("0;1;0.0;1.0")
    accepted = sum(next((d for d in range(3, 0, -1) if path[:d] in set(_paths(tree))), 0) for path in observed)
    assert accepted == 3 + 2 + 2 + 2  # the nodes' counts
    assert best_tree(observed, 1) == DraftTree.chain(1)


def _paths(tree: DraftTree) -> list[tuple[int, ...]]:
    out = [()]
    for parent, rank in zip(tree.parents[1:], tree.ranks[1:]):
        out.append(out[parent] + (rank,))
    return out


def test_true_token_ranks():
    logits = torch.tensor([[[0.0, 3.0, 1.0, 2.0], [5.0, 4.0, 3.0, 9.0]]])  # [1, 2, 4]
    assert true_token_ranks(logits, torch.tensor([[3, 0]]), None).tolist() == [[1, 1]]
    assert true_token_ranks(logits, torch.tensor([[3, 0]]), torch.tensor([1])).tolist() == [[0, 1]]  # 3.0 is banned
