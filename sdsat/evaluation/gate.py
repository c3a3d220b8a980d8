"""The quality gate: a fine-tuned export must keep its base model's quality.

Two measures, on the base and the export in the same dtype and on the same inputs:
- pass@1 on HumanEval (greedy completions run in the sandbox);
- mean per-token log-likelihood of held-out text (by default the HumanEval problems'
  prompts with their canonical solutions: code the training data never held).
The export fails when pass@1 drops by more than ``max_pass_drop_points`` percentage points
or the log-likelihood by more than ``max_loglik_drop`` nats per token. A ``sat_adapter``
export leaves every standard token's logits bit-identical, so it must show exactly no
change; a ``full`` fine-tune is where the gate is a real check.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..model.load import LoadedModel, load_model
from .humaneval import complete, pass_at_1
from .problems import Problem, load_problems
from .loglik import mean_loglik
from .sandbox import SandboxLimits

log = logging.getLogger(__name__)
VERDICT_FILE = "quality_gate.json"  # written into the export's directory


@dataclass(frozen=True)
class GateConfig:
    problems: int | None = 164  # HumanEval problems scored (None: all 164)
    max_new_tokens: int = 384  # per completion (they stop at the end of the function)
    batch_size: int = 8  # completions decoded together
    dtype: str = "float32"  # both models in this dtype (exactness is defined within one dtype)
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")
    max_pass_drop_points: float = 3.0  # fail when pass@1 drops by more (percentage points)
    max_loglik_drop: float = 0.05  # fail when the mean log-likelihood drops by more (nats/token)
    limits: SandboxLimits = field(default_factory=SandboxLimits)


@dataclass
class Quality:
    """One model's measurements."""

    model: str
    pass_at_1: float  # fraction of problems passed
    passed: list[bool]  # per problem
    completions: list[str]
    loglik: float  # mean log-probability per token of the held-out text
    loglik_tokens: int


@dataclass
class Verdict:
    passed: bool
    reasons: list[str]  # why it failed (empty when it passed)
    pass_drop_points: float  # base pass@1 - export pass@1, in percentage points
    loglik_drop: float  # base - export mean log-likelihood (nats/token)
    changed_completions: int  # problems whose completion differs
    base: Quality
    export: Quality
    config: GateConfig

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        state = "PASSED" if self.passed else "FAILED: " + "; ".join(self.reasons)
        return (
            f"quality gate {state} | pass@1 {100 * self.base.pass_at_1:.1f}% -> {100 * self.export.pass_at_1:.1f}% "
            f"| log-likelihood {self.base.loglik:.4f} -> {self.export.loglik:.4f} nats/token "
            f"| {self.changed_completions} of {len(self.base.passed)} completions changed"
        )


def held_out_texts(problems: list[Problem]) -> list[str]:
    """The default held-out text: each problem's prompt followed by its canonical solution."""
    return [p.prompt + p.canonical_solution for p in problems]


def measure(loaded: LoadedModel, problems: list[Problem], texts: list[str], cfg: GateConfig,
            exclude: tuple[int, ...] = ()) -> Quality:
    completions = complete(loaded, problems, cfg.max_new_tokens, cfg.batch_size)
    passed = pass_at_1(problems, completions, cfg.limits)
    ll = mean_loglik(loaded, texts, exclude=exclude)
    return Quality(loaded.source, sum(passed) / len(passed), passed, completions, ll.mean, ll.tokens)


def judge(base: Quality, export: Quality, cfg: GateConfig) -> Verdict:
    """Compare the export's measurements with the base's."""
    pass_drop = 100 * (base.pass_at_1 - export.pass_at_1)
    ll_drop = base.loglik - export.loglik
    reasons = []
    if pass_drop > cfg.max_pass_drop_points:
        reasons.append(f"pass@1 dropped {pass_drop:.1f} points (limit {cfg.max_pass_drop_points:g})")
    if ll_drop > cfg.max_loglik_drop:
        reasons.append(f"log-likelihood dropped {ll_drop:.4f} nats/token (limit {cfg.max_loglik_drop:g})")
    changed = sum(a != b for a, b in zip(base.completions, export.completions))
    return Verdict(not reasons, reasons, pass_drop, ll_drop, changed, base, export, cfg)


def run_gate(base: str | LoadedModel, export: str | LoadedModel, cfg: GateConfig = GateConfig(),
             texts: list[str] | None = None) -> Verdict:
    """Load (or take) both models, measure both on the same problems and texts, and judge."""
    problems = load_problems(cfg.problems)
    texts = texts if texts is not None else held_out_texts(problems)
    base_m, export_m = (m if isinstance(m, LoadedModel) else load_model(m, dtype=cfg.dtype, device=cfg.device)
                        for m in (base, export))
    sat_ids = tuple(sorted(set(_sat_ids(base_m)) | set(_sat_ids(export_m))))
    results = []
    for loaded in (base_m, export_m):
        log.info("quality gate: measuring %s on %d problems", loaded.source, len(problems))
        results.append(measure(loaded, problems, texts, cfg, exclude=sat_ids))
    return judge(*results, cfg)


def _sat_ids(loaded: LoadedModel) -> list[int]:
    return loaded.sat.unique_ids if loaded.sat else []


def write_verdict(verdict: Verdict, directory: str | Path) -> Path:
    """Write the verdict as quality_gate.json into ``directory`` (the export's)."""
    path = Path(directory) / VERDICT_FILE
    path.write_text(json.dumps(verdict.to_dict(), indent=2) + "\n")
    return path
