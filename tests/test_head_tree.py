"""Draft trees through the draft head: every branch is the head's guess given its own parent,
the rank-0 path is the head's chain, and decoding with such a tree is exactly plain greedy
(fp32, tiny random models with random heads)."""

from __future__ import annotations

import pytest
import torch

from sdsat.decode.generate import generate, make_sequences
from sdsat.decode.tree import DraftTree
from tests.conftest import hf_greedy
from tests.test_draft_head import NEW, PROMPTS, _headed

VOCAB_TOP = 16  # candidates per SAT position: fewer than the tiny vocabulary, so the restriction bites


def _inputs(loaded, batch=3, k=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    size = loaded.model.config.hidden_size
    vocab = loaded.model.get_output_embeddings().weight.shape[0]
    hidden, anchor = torch.randn(batch, k, size, generator=gen), torch.randn(batch, size, generator=gen)
    first = torch.randint(0, vocab, (batch,), generator=gen)
    candidates = torch.stack([torch.randperm(vocab, generator=gen)[:VOCAB_TOP] for _ in range(batch * k)]).view(batch, k, -1)
    return hidden, first, anchor, candidates


def _ranked(head, hidden, prev, anchor, among, banned):
    """The head's guesses for one position, best first, computed directly."""
    logits = head.logits(hidden, prev, anchor, among).masked_fill(torch.isin(among, banned), float("-inf"))
    return among.gather(1, logits.argsort(-1, descending=True))


def test_every_node_is_the_heads_rank_r_guess_given_its_parent():
    loaded, head = _headed()
    banned = torch.tensor(loaded.sat.unique_ids)
    hidden, first, anchor, candidates = _inputs(loaded)
    tree = DraftTree.parse("3,2,2")
    tokens = head.tree(hidden, first, anchor, tree.parents, tree.depths, tree.ranks, banned, candidates)
    assert torch.equal(tokens[:, 0], first)
    for j in range(1, tree.size):
        d, parent = tree.depths[j], tree.parents[j]
        ranked = _ranked(head, hidden[:, d - 1], tokens[:, parent], anchor, candidates[:, d - 1], banned)
        assert torch.equal(tokens[:, j], ranked[:, tree.ranks[j]])
    # siblings differ, so branches are distinct continuations of their parent
    assert all(len(set(row[1:4])) == 3 for row in tokens.tolist())


def test_the_rank_zero_path_is_the_heads_chain():
    loaded, head = _headed()
    banned = torch.tensor(loaded.sat.unique_ids)
    hidden, first, anchor, candidates = _inputs(loaded, k=4)
    tree = DraftTree.parse("2,2,1,1")
    tokens = head.tree(hidden, first, anchor, tree.parents, tree.depths, tree.ranks, banned, candidates)
    rank0 = [j for j in range(1, tree.size) if all(tree.ranks[n] == 0 for n in _path(tree, j))]
    chain = head.chain(hidden, first, anchor, [4] * 3, banned, candidates)
    assert tokens[:, rank0].tolist() == chain


def _path(tree, node):
    while node > 0:
        yield node
        node = tree.parents[node]


def test_true_ranks_find_the_path_a_tree_drafted():
    """Take the tokens a full tree drafted along one rank path as the 'true' continuation: the
    head's ranks of them, each given the true token before it, are that path."""
    loaded, head = _headed()
    banned = torch.tensor(loaded.sat.unique_ids)
    hidden, first, anchor, candidates = _inputs(loaded)
    tree = DraftTree.parse("4,4,4")
    tokens = head.tree(hidden, first, anchor, tree.parents, tree.depths, tree.ranks, banned, candidates)
    for path in ((0, 0, 0), (2, 1, 3), (3, 0, 1)):
        node = next(j for j in range(tree.size) if tuple(reversed([tree.ranks[n] for n in _path(tree, j)])) == path)
        true = tokens[:, list(reversed(list(_path(tree, node))))]
        assert head.true_ranks(hidden, first, anchor, true, banned, candidates).tolist() == [list(path)] * 3
    outside = torch.full((3, 3), int(banned[0]))  # a banned token is never among the guesses
    assert head.true_ranks(hidden, first, anchor, outside, banned, candidates)[:, 0].tolist() == [VOCAB_TOP] * 3


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("spec", ["2,1,1,1", "3,2,1,1", "0;1;2;0.0;0.1;1.0;0.0.0;0.0.0.0"])
def test_decoding_with_a_head_tree_equals_plain_greedy(arch, spec, monkeypatch):
    loaded, head = _headed(arch)
    refs = [hf_greedy(loaded, p, NEW) for p in PROMPTS]
    seqs = make_sequences(loaded, PROMPTS, NEW, eos=False)
    calls = []
    drafted_by_head = head.tree
    monkeypatch.setattr(head, "tree", lambda *a, **kw: calls.append(1) or drafted_by_head(*a, **kw))
    generate(loaded, seqs, 4, tree=spec, two_step=True)
    assert [s.output_ids for s in seqs] == refs
    assert calls  # the tree's tokens came from the head
    tree = DraftTree.parse(spec)
    assert all(s.stats.drafted == (tree.size - 1) * s.stats.iterations for s in seqs)  # every node counted as verified
