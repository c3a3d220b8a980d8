"""Decoding: the mechanics of one pass (KV cache, draft/verify, fused pass, trees, lookup, acceptance) and the policy that chooses drafts."""
