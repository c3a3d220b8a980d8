"""HumanEval pass@1 with greedy completions: completions, and scoring them in the sandbox.

A completion is the model's greedy continuation of the raw prompt,
cut at the usual stop sequences (a new top-level statement); greedy decoding is
deterministic, so pass@1 is the fraction of problems whose completion passes its tests.
"""

from __future__ import annotations

from ..decode.generate import generate, make_sequences
from ..model.load import LoadedModel
from .problems import Problem
from .sandbox import SandboxLimits, SandboxResult, run_python

# Where a function body ends: the standard HumanEval stop sequences.
STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


def truncate(completion: str) -> str:
    """The completion up to the first stop sequence."""
    cut = min((i for i in (completion.find(s) for s in STOP) if i >= 0), default=len(completion))
    return completion[:cut]


def program(problem: Problem, completion: str) -> str:
    """The program that passes (exits 0) exactly when the completion is correct."""
    return f"{problem.prompt}{completion}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


def score(problem: Problem, completion: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    return run_python(program(problem, truncate(completion)), limits)


def complete(loaded: LoadedModel, problems: list[Problem], max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """Plain greedy completions (the model's own output; SDSAT decoding gives the same)."""
    out = []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        prompts = [loaded.tokenizer.encode(p.prompt) for p in chunk]
        seqs = generate(loaded, make_sequences(loaded, prompts, max_new_tokens, stop=STOP))
        out += [s.text(loaded.tokenizer) for s in seqs]
    return out


def pass_at_1(problems: list[Problem], completions: list[str], limits: SandboxLimits = SandboxLimits()) -> list[bool]:
    """Whether each problem's completion passes its tests (pass@1 is their mean)."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
    return [score(p, c, limits).passed for p, c in zip(problems, completions)]
