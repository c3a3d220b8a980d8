"""Evaluation: sandboxed execution of completions, HumanEval pass@1, held-out log-likelihood and the quality gate."""
