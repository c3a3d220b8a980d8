"""Fused SDSAT (verify and draft in one pass, per-row drafts) and prompt-lookup drafts: exactly plain greedy."""

from __future__ import annotations

import pytest
import torch

from sdsat.decode.batch import Batch
from sdsat.decode.decoding import prefill
from sdsat.decode.fused import RowNodes, fused_pass, row_layout
from sdsat.decode.generate import generate, make_sequences
from sdsat.decode.scheduler import Scheduler
from sdsat.decode.kv_cache import SlotCache
from sdsat.decode.lookup import LookupIndex, build_trie, lookup_tree
from sdsat.decode.row_tree import accept_rows, row_trees
from sdsat.decode.tree import DraftTree, tree_accept
from tests.conftest import hf_greedy, tiny_loaded

NEW_TOKENS = 40
RAGGED = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25], [3]]
GARBAGE = 200


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request):
    loaded = tiny_loaded(request.param, k=8)
    refs = [hf_greedy(loaded, p, NEW_TOKENS) for p in RAGGED]
    return loaded, refs


# --- Lookup drafts ------------------------------------------------------------------------------


def test_lookup_takes_the_longest_ngram_and_the_newest_match_first():
    history = [1, 2, 3, 9, 9, 2, 3, 7, 8, 1, 2, 3]
    # "1 2 3" occurred at 0 (then 9 9 2 ...); "2 3" also at 5 (then 7 8) but 3-grams win.
    assert lookup_tree(history, 3)[:2] == ([9, 9, 2], [-1, 0, 1])
    assert lookup_tree([4, 2, 3, 5, 6, 0, 2, 3], 2)[:2] == ([5, 6], [-1, 0])  # no 3-gram: the 2-gram "2 3"
    # "4" was followed by 5, 6 and 7: the newest (7 4, cut at the end) comes first.
    assert lookup_tree([4, 5, 4, 6, 4, 7, 4], 5)[:2] == ([7, 4, 6, 4, 7], [-1, 0, -1, 2, 3])


def test_lookup_without_a_match_gives_nothing():
    assert lookup_tree([1, 2, 3, 4], 4) == ([], [], [])
    assert lookup_tree([7], 4) == ([], [], [])
    assert lookup_tree([1, 2, 1, 2], 0) == ([], [], [])


def test_lookup_tree_offers_every_way_the_context_continued_before():
    # "5 6" was followed by 7 (older) and by 8 (newer); the 3-gram "4 5 6" matched only
    # before 8, so all of 8's branch outweighs 7, which comes once 8's branch is in.
    history = [5, 6, 7, 1, 4, 5, 6, 8, 9, 2, 4, 5, 6]
    assert lookup_tree(history, 4)[:2] == ([8, 9, 2, 4], [-1, 0, 1, 2])
    assert lookup_tree(history, 8)[:2] == ([8, 9, 2, 4, 5, 6, 7, 1], [-1, 0, 1, 2, 3, 4, -1, 6])
    # A chain is the one-continuation trie; the budget caps the node count.
    assert lookup_tree([1, 2, 3, 4, 1, 2], 2)[:2] == ([3, 4], [-1, 0])
    assert lookup_tree([1, 2, 3], 4) == ([], [], [])


def test_build_trie_keeps_the_best_nodes_with_their_parents():
    # scores: 5: 100 * 0.9; 1: (10 + 10 / 2) * 0.9; 1.2: 10 * 0.81; 1.2.3: 10 * 0.729; 1.4: 5 * 0.81
    continuations = [(1, 0, [1, 2, 3]), (1, 1, [1, 4]), (2, 0, [5])]
    assert build_trie(continuations, budget=4)[:2] == ([5, 1, 2, 3], [-1, -1, 1, 2])
    tokens, parents, scores = build_trie(continuations, budget=9)
    assert tokens == [5, 1, 2, 3, 4] and parents == [-1, -1, 1, 2, 1]
    assert scores == pytest.approx([90.0, 13.5, 8.1, 7.29, 4.05])  # best first, as scored above
    for i, p in enumerate(parents):
        assert p < i  # parents first


def test_lookup_index_trie_agrees_with_the_scan_as_the_sequence_grows():
    import random

    rng = random.Random(1)
    for trial in range(30):
        tokens = [rng.randrange(5) for _ in range(rng.randrange(1, 5))]
        index = LookupIndex(list(tokens))
        for _ in range(50):
            for budget in (1, 4, 10):
                assert index.tree(budget) == lookup_tree(tokens, budget), (trial, tokens, budget)
            new = [rng.randrange(5) for _ in range(rng.randrange(1, 4))]
            tokens += new
            index.extend(new)


# --- Trees per row ------------------------------------------------------------------------------


def test_row_trees_accept_like_the_static_tree():
    """Every row given the static tree's parents: the same paths and tokens as tree_accept."""
    tree = DraftTree.parse("2,2,1")
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 3, (64, tree.size), generator=gen)
    z = torch.randint(0, 3, (64, tree.size), generator=gen)
    rows = row_trees((tree.parents,) * 64, "cpu")
    assert accept_rows(tokens, z, rows)[:2] == tree_accept(tokens, z, tree)[:2]


def test_row_trees_differ_per_row_and_refuse_bad_parents():
    rows = row_trees(((-1, 0, 1, 2), (-1, 0, 0, 2)), "cpu")
    assert rows.depths.tolist() == [[0, 1, 2, 3], [0, 1, 1, 2]]
    assert rows.ancestors[1, 3].nonzero()[:, 0].tolist() == [0, 2, 3]
    assert rows.paths[1, 3, :3].tolist() == [0, 2, 3]
    # row 1: node 2 (depth 1) is right, node 3 under it is right: a = 2 through the second branch
    tokens = torch.tensor([[9, 1, 2, 3], [9, 4, 5, 6]])
    z = torch.tensor([[1, 2, 7, 7], [5, 7, 6, 8]])
    paths, emitted, bonus = accept_rows(tokens, z, rows)
    assert paths == [[0, 1, 2], [0, 2, 3]] and emitted == [[9, 1, 2, 7], [9, 5, 6, 8]]
    with pytest.raises(ValueError, match="same node count"):
        row_trees(((-1, 0), (-1,)), "cpu")
    with pytest.raises(ValueError, match="parent comes before"):
        row_trees(((-1, 2, 0),), "cpu")


def test_a_mask_per_row_is_the_shared_mask_row_by_row():
    cache = SlotCache(num_layers=1, batch_size=2)
    cache.lengths = [3, 5]
    tree = row_layout(RowNodes([1, 2, 3], [-1, 0, -1], 2), 6)
    shared = row_trees((tree,), "cpu").ancestors[0]
    assert torch.equal(cache.prepare(6, torch.float32, shared), cache.prepare(6, torch.float32, shared.expand(2, -1, -1)))
    other = row_trees((tree, (-1, 0, 0, 0, 3, 0)), "cpu").ancestors
    mixed = cache.prepare(6, torch.float32, other)
    assert torch.equal(mixed[0], cache.prepare(6, torch.float32, shared)[0])
    assert not torch.equal(mixed[1], cache.prepare(6, torch.float32, shared)[1])


# --- One row's nodes ----------------------------------------------------------------------------


def test_row_layout_puts_drafts_then_block_then_filler_under_the_root():
    # drafts: a chain of 2 and a 1-node branch; a block of 3; 2 filler nodes
    parents = row_layout(RowNodes([7, 8, 9], [-1, 0, -1], 3), 9)
    assert parents == (-1, 0, 1, 0, 0, 4, 5, 0, 0)
    anc = row_trees((parents,), "cpu").ancestors[0]
    assert anc[6].nonzero()[:, 0].tolist() == [0, 4, 5, 6]  # the block sees the root and itself only
    assert row_layout(RowNodes(), 2) == (-1, 0)
    with pytest.raises(ValueError, match="do not fit"):
        row_layout(RowNodes([1, 2], [-1, 0], 2), 4)
    with pytest.raises(ValueError, match="earlier draft"):
        row_layout(RowNodes([1, 2], [-1, 1], 0), 4)


# --- Exactness ----------------------------------------------------------------------------------


FREE = lambda rows, q: 1.0  # noqa: E731  (an injected cost: wide passes cost nothing extra)
COSTS = {
    "cheap": lambda rows, q: 1.0,  # extra query tokens are free: the widest pass
    "dear": lambda rows, q: float(q),  # every token costs a pass: plain steps
    "bumpy": lambda rows, q: 1.0 + 0.3 * (q % 5),  # a cost with no shape: any width
}


@pytest.mark.parametrize("cost", sorted(COSTS))
@pytest.mark.parametrize("k,lookup", [(1, 0), (4, 0), (4, 4), (8, 3), (2, 16), (0, 5)])
def test_scheduled_decoding_equals_plain_greedy(tiny, k, lookup, cost):
    loaded, refs = tiny
    seqs = make_sequences(loaded, RAGGED, NEW_TOKENS, eos=False)
    scheduler = Scheduler(COSTS[cost], explore_fraction=0.5, explore_every=3)
    scheduler.total_s = 1e9  # exploration never runs out of budget here: every kind of pass is taken
    generate(loaded, seqs, k, lookup=lookup, scheduler=scheduler)
    assert [s.output_ids for s in seqs] == refs
    for seq in seqs:
        assert seq.stats.forward_passes == seq.stats.iterations  # one pass per iteration
        assert seq.stats.new_tokens == NEW_TOKENS
    assert len(scheduler.widths) > 1  # the output stayed exact across passes of several widths


def test_lookup_drafts_are_accepted_on_repetitive_output(tiny):
    """Tiny random models fall into loops, which lookup drafts predict."""
    loaded, refs = tiny
    without = generate(loaded, make_sequences(loaded, RAGGED, NEW_TOKENS, eos=False), 4, lookup=0, scheduler=Scheduler(FREE))
    seqs = generate(loaded, make_sequences(loaded, RAGGED, NEW_TOKENS, eos=False), 4, lookup=4, scheduler=Scheduler(FREE))
    assert [s.output_ids for s in seqs] == refs
    assert sum(s.stats.iterations for s in seqs) < sum(s.stats.iterations for s in without)


def planted_decode(loaded, prompts, refs, k: int, pending_true: bool, lookup_true: bool, m: int):
    """Decode with fused_pass, planting the true continuation as SAT drafts (k) and/or lookup drafts (m)."""
    model = loaded.model
    cache = SlotCache.for_model(model, len(prompts))
    banned = torch.tensor(loaded.sat.unique_ids)
    sat = list(loaded.sat.ids_for(k))
    outputs: list[list[int]] = [[] for _ in prompts]
    accepted_log = []
    with torch.inference_mode():
        last = prefill(model, cache, prompts, 0)
        while min(len(o) for o in outputs) < NEW_TOKENS:
            # Row b has emitted len(outputs[b]) tokens; ``last`` is the newest; drafts follow it.
            width = max(k, m)
            rows = []
            for ref, out in zip(refs, outputs):
                true = ref[len(out) : len(out) + width]
                true = true + [GARBAGE] * (width - len(true))
                garbage = [GARBAGE + 1] * width
                pending = (true if pending_true else garbage)[:k]
                lookup = (true if lookup_true else garbage)[:m]
                parents = [i - 1 for i in range(k)] + [-1 if i == 0 else k + i - 1 for i in range(m)]
                rows.append(RowNodes(pending + lookup, parents, k))
            emitted, last, _, accepted = fused_pass(model, cache, last, rows, 1 + 2 * k + m, sat, banned, sat[0])
            for b, tokens in enumerate(emitted):
                outputs[b] += tokens
            accepted_log.append(accepted)
    return [o[:NEW_TOKENS] for o in outputs], accepted_log, cache


@pytest.mark.parametrize(
    "pending_true,lookup_true,m,want", [(True, False, 3, 4), (False, True, 3, 3), (False, True, 7, 7), (False, False, 3, 0)]
)
def test_planted_drafts_are_accepted_from_either_chain(tiny, pending_true, lookup_true, m, want):
    """k = 4 SAT drafts, m lookup drafts (longer than k too): the true chain is accepted whole."""
    loaded, refs = tiny
    k = 4
    outputs, accepted, cache = planted_decode(loaded, RAGGED, refs, k, pending_true, lookup_true, m)
    assert outputs == refs
    # Every step but those near the end (where the reference runs out) accepts `want` drafts.
    assert all(a == want for a in accepted[0])
    assert cache.lengths == [len(p) - 1 + sum(a + 1 for a in col) for p, col in zip(RAGGED, zip(*accepted))]


def test_planted_tries_are_accepted_through_any_branch(tiny):
    """Per row a different trie: a wrong first branch, the true continuation on the second;
    the true branch is accepted whole and the output stays plain greedy."""
    loaded, refs = tiny
    model, depth = loaded.model, 3
    cache = SlotCache.for_model(model, len(RAGGED))
    banned = torch.tensor(loaded.sat.unique_ids)
    sat = list(loaded.sat.ids_for(2))
    outputs: list[list[int]] = [[] for _ in RAGGED]
    with torch.inference_mode():
        last = prefill(model, cache, RAGGED, 0)
        while min(len(o) for o in outputs) < NEW_TOKENS:
            rows = []
            for b, (ref, out) in enumerate(zip(refs, outputs)):
                true = (ref[len(out) : len(out) + depth] + [GARBAGE] * depth)[:depth]
                w = b % 3  # 0, 1 or 2 wrong nodes first, a chain under the root
                chain = [-1] + list(range(w - 1)) if w else []
                rows.append(RowNodes([GARBAGE + 1] * w + true, chain + [-1, w, w + 1], 0))
            emitted, last, _, accepted = fused_pass(model, cache, last, rows, 1 + 2 + depth, sat, banned, sat[0])
            for b, tokens in enumerate(emitted):
                outputs[b] += tokens
            if min(len(o) for o in outputs) + depth < NEW_TOKENS:
                assert accepted == [depth] * len(RAGGED)
    assert [o[:NEW_TOKENS] for o in outputs] == refs


def test_rows_joining_a_scheduled_batch_mid_way(tiny):
    """The serving pattern: a row joins after others took fused steps; all stay exact."""
    loaded, refs = tiny
    sat = loaded.sat.ids_for(4)
    batch = Batch(loaded.model, banned_ids=loaded.sat.unique_ids, scheduler=Scheduler(FREE))
    first = make_sequences(loaded, RAGGED[:2], NEW_TOKENS, eos=False)
    later = make_sequences(loaded, RAGGED[2:], NEW_TOKENS, eos=False)
    batch.add(first)
    for _ in range(3):
        batch.scheduled_step(sat, lookup=2)
    batch.add(later)
    batch.step([])  # a plain step between fused ones drops the pending drafts
    while len(batch):
        batch.scheduled_step(sat, lookup=2)
    assert [s.output_ids for s in first + later] == refs


def test_bad_decoder_options_are_refused(tiny):
    loaded, _ = tiny
    seqs = make_sequences(loaded, RAGGED[:1], 4, eos=False)
    with pytest.raises(ValueError, match="lookup must be >= 0"):
        generate(loaded, seqs, 2, lookup=-1)
    with pytest.raises(ValueError, match="two-step iteration needs num_sat"):
        generate(loaded, seqs, 0, two_step=True)
    batch = Batch(loaded.model)
    batch.add(seqs)
    with pytest.raises(ValueError, match="needs a Batch built with a scheduler"):
        batch.scheduled_step([], 4)


def test_filler_is_never_accepted_even_where_it_is_the_next_token(tiny):
    """Padding nodes carry a standard token (a SAT id would switch the adapter on); the rule is
    told they are padding, so the true next token as filler is not accepted, and the output
    stays plain greedy."""
    loaded, refs = tiny
    cache = SlotCache.for_model(loaded.model, 1)
    banned = torch.tensor(loaded.sat.unique_ids)
    sat = list(loaded.sat.ids_for(2))
    out: list[int] = []
    with torch.inference_mode():
        last = prefill(loaded.model, cache, RAGGED[:1], 0)
        while len(out) < NEW_TOKENS:
            filler = refs[0][len(out)]  # the argmax at the root, and at every filler node's parent
            row = RowNodes([GARBAGE + 1], [-1], 0)
            emitted, last, _, accepted = fused_pass(loaded.model, cache, last, [row], 4, sat, banned, filler)
            assert accepted == [0] and len(emitted[0]) == 1
            out += emitted[0]
    assert out[:NEW_TOKENS] == refs[0]
    assert cache.lengths == [len(RAGGED[0]) - 1 + len(out)]


@pytest.mark.parametrize("planted", [0, 2])
def test_next_drafts_are_the_draft_pass_guesses_past_the_accepted_ones(tiny, planted):
    """The block's guess i is the two-step draft pass's draft i (same cache, same ``last``);
    after a accepted drafts the next drafts start at guess a+1."""
    from sdsat.decode.decoding import draft

    loaded, refs = tiny
    k = 4
    prompts = RAGGED[:1]
    banned = torch.tensor(loaded.sat.unique_ids)
    sat = list(loaded.sat.ids_for(k))
    with torch.inference_mode():
        two_step = SlotCache.for_model(loaded.model, 1)
        last = prefill(loaded.model, two_step, prompts, 0)
        _, drafts = draft(loaded.model, two_step, last, torch.tensor(sat), banned)
        cache = SlotCache.for_model(loaded.model, 1)
        last = prefill(loaded.model, cache, prompts, 0)
        pending = refs[0][:planted] + [GARBAGE] * (k - planted)
        row = RowNodes(pending, [i - 1 for i in range(k)], k)
        _, _, nxt, accepted = fused_pass(loaded.model, cache, last, [row], 1 + 2 * k, sat, banned, sat[0])
    assert accepted == [planted]
    assert nxt[0] == drafts[0, planted:].tolist()


def test_lookup_alone_works_for_a_model_without_sats():
    """k = 0 with lookup drafts is prompt-lookup decoding: no SATs needed, output unchanged."""
    from dataclasses import replace

    loaded = replace(tiny_loaded("llama", k=8), sat=None)
    plain = generate(loaded, make_sequences(loaded, RAGGED, NEW_TOKENS, eos=False), 0)
    seqs = generate(loaded, make_sequences(loaded, RAGGED, NEW_TOKENS, eos=False), 0, lookup=6, scheduler=Scheduler(FREE))
    assert [s.output_ids for s in seqs] == [s.output_ids for s in plain]
    assert sum(s.stats.iterations for s in seqs) < sum(s.stats.iterations for s in plain)
    assert sum(s.stats.accepted for s in seqs) > 0
