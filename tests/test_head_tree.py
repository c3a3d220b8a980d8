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


def test_the_first_guesses_siblings_are_the_trees_next_ranks():
    """guess() gives the chain and, per row, the head's rank-1.. guesses for the first draft:
    the siblings a depth-1 tree would verify beside it (none for a row that guesses nothing)."""
    loaded, head = _headed()
    banned = torch.tensor(loaded.sat.unique_ids)
    hidden, first, anchor, candidates = _inputs(loaded, k=4)
    tree = DraftTree.parse("3")
    tokens = head.tree(hidden, first, anchor, tree.parents, tree.depths, tree.ranks, banned, candidates)
    counts = [4, 0, 2]
    chains, siblings = head.guess(hidden, first, anchor, counts, banned, candidates, siblings=2)
    assert chains == head.chain(hidden, first, anchor, counts, banned, candidates)
    assert [len(c) for c in chains] == counts
    assert siblings[0] == tokens[0, 2:].tolist() and siblings[2] == tokens[2, 2:].tolist() and siblings[1] == []
    assert [c[0] for c in chains if c] == [tokens[0, 1].item(), tokens[2, 1].item()]


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


# --- The default decoder: the head's alternatives to the first pending draft ---------------------


def test_a_fused_pass_offers_the_heads_next_best_guesses_beside_the_first_next_draft():
    from sdsat.decode.fused import HEAD_ALTERNATIVES
    from tests.test_draft_head import block_pass

    loaded, head = _headed()
    banned = torch.tensor(loaded.sat.unique_ids)
    alternatives = []
    _, bonus, nxt, accepted = block_pass(loaded, alternatives)
    with torch.inference_mode():
        # nothing was accepted: the first next draft is block position 1's guess given the bonus
        hidden = head.hidden
        logits = loaded.model.lm_head(hidden[:, 1])
        among = logits.topk(loaded.model.config.vocab_size, dim=-1).indices  # every token: the tiny vocabulary is under 256
        ranked = _ranked(head, hidden[:, 1], bonus, hidden[:, 0], among, banned)
    assert accepted == [0] * len(PROMPTS)
    assert [row[0] for row in nxt] == ranked[:, 0].tolist()
    assert alternatives == ranked[:, 1 : 1 + HEAD_ALTERNATIVES].tolist()


def test_alternatives_are_scored_on_every_pass_and_valued_by_rank():
    from sdsat.decode.scheduler import ALTERNATIVE, RowCandidates, Scheduler

    scheduler = Scheduler(lambda rows, q: 1.0 + 0.01 * rows * q)
    acc = scheduler.acceptance
    for _ in range(50):  # rank 1 is the token that follows 40% of the time, rank 2 never
        for first in (7, 7, 8, 9, 9):
            acc.observe_alt([7, 5], first, lookup_right=False, with_lookup=False)
    assert acc.alt_p(1, False) > 0.3 > 0.05 > acc.alt_p(2, False)
    acc.observe_alt([7], 7, lookup_right=True, with_lookup=True)  # lookup already had it: no gain
    assert acc.alt.hits[(False, 1, True)] < 1.0
    values = scheduler.values(RowCandidates([3, 4], block=2, alternatives=[7, 5]))
    alt = [v for v, source in values if source == ALTERNATIVE]
    assert alt == sorted(alt, reverse=True) and len(alt) == 2 and alt[0] > 0.3


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_scheduled_decoding_with_head_alternatives_equals_plain_greedy(arch):
    from sdsat.decode.scheduler import Scheduler

    loaded, _ = _headed(arch)
    refs = [hf_greedy(loaded, p, NEW) for p in PROMPTS]
    seqs = make_sequences(loaded, PROMPTS, NEW, eos=False)
    scheduler = Scheduler(lambda rows, q: 1.0, explore_fraction=0.5, explore_every=3)  # every node is free: all are verified
    scheduler.total_s = 1e9
    generate(loaded, seqs, 4, lookup=0, scheduler=scheduler)
    assert [s.output_ids for s in seqs] == refs
    assert sum(scheduler.acceptance.alt.seen.values()) > 0  # alternatives were offered and scored


def test_tree_search_picks_trees_from_the_heads_ranks(tmp_path):
    import json

    from jobs import tree_search
    from sdsat.model.draft_head import HeadConfig, attach_head
    from sdsat.model.load import LoadedModel, load_model, save_model
    from tests.conftest import tiny_model
    from tests.test_draft_head import K, _randomize
    from tests.test_finetune_config import tiny_tokenizer

    save_model(LoadedModel(tiny_model(vocab=257), tiny_tokenizer(), None, "tiny", ""), tmp_path / "base")
    loaded = load_model(str(tmp_path / "base"), add_sat=K)
    _randomize(attach_head(loaded.model, HeadConfig(width=8)), seed=3)
    save_model(loaded, tmp_path / "ckpt")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("abc abc abc", "hello world")))
    result = tree_search.main(["--model", str(tmp_path / "ckpt"), "--prompts", str(prompts), "--num-sat", str(K),
                               "--max-new-tokens", "12", "--sizes", f"{K},8", "--dtype", "float32", "--device", "cpu"])
    assert result["head"] and result["positions"] > 0
    same_size, larger = result["trees"]
    assert same_size["accepted_per_pass"] >= result["chain"]  # the chain is one of the trees of its size
    assert larger["accepted_per_pass"] >= same_size["accepted_per_pass"]
    assert DraftTree.parse(larger["spec"]).size == larger["nodes"] <= 9
