"""The sandbox, HumanEval scoring, held-out log-likelihood and the quality gate (fast: tiny models)."""

from __future__ import annotations

import copy
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sdsat.evaluation.gate import GateConfig, Quality, judge, run_gate, write_verdict
from sdsat.evaluation.humaneval import score, truncate
from sdsat.evaluation.problems import load_problems
from sdsat.evaluation.loglik import mean_loglik
from sdsat.evaluation.sandbox import SandboxLimits, run_python
from sdsat.model.adapter import AdapterConfig, attach_adapter
from tests.conftest import tiny_loaded
from tests.test_adapter import _randomize

# Generous: each program starts a fresh interpreter; these survive a much slower CPU.
ROOMY = SandboxLimits(timeout_s=60, memory_mb=512)


def test_sandbox_kills_an_infinite_loop():
    result = run_python("while True:\n    pass\n", SandboxLimits(timeout_s=3))
    assert result.status == "timeout" and result.returncode is None and not result.passed


def test_sandbox_stops_a_memory_hog():
    hog = "chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))\n"
    result = run_python(hog, replace(ROOMY, memory_mb=256))
    assert result.status == "failed" and "MemoryError" in result.output


def test_sandbox_blocks_a_network_call():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=5)\nprint('connected')\n"
        result = run_python(program, ROOMY)
        assert result.status == "failed" and "connected" not in result.output
        with pytest.raises(BlockingIOError):  # nobody knocked
            server.accept()
    finally:
        server.close()


def test_sandbox_blocks_processes_and_writes_outside_its_directory(tmp_path):
    outside = tmp_path / "written.txt"
    for program in ("import os\nos.system('true')\n", "import subprocess\nsubprocess.run(['true'])\n",
                    f"open({str(outside)!r}, 'w').write('x')\n"):
        result = run_python(program, ROOMY)
        assert result.status == "failed" and "sandbox:" in result.output, program
    assert not outside.exists()
    inside = run_python("open('mine.txt', 'w').write('ok')\nprint(open('mine.txt').read())\n", ROOMY)
    assert inside.passed and inside.output.strip() == "ok"


def test_sandbox_refuses_bad_limits():
    with pytest.raises(ValueError, match="positive"):
        run_python("pass", SandboxLimits(timeout_s=0))


def test_humaneval_scores_known_correct_and_wrong_completions():
    problem = load_problems(1)[0]  # HumanEval/0: has_close_elements
    assert problem.task_id == "HumanEval/0"
    assert score(problem, problem.canonical_solution, ROOMY).passed
    wrong = "    return False\n"
    assert score(problem, wrong, ROOMY).status == "failed"
    looping = "    while True:\n        pass\n"
    assert score(problem, looping, SandboxLimits(timeout_s=3)).status == "timeout"


def test_truncate_cuts_at_the_next_top_level_statement():
    assert truncate("    return 1\n\ndef other():\n    pass\n") == "    return 1\n"
    assert truncate("    return 1\n\nif __name__ == '__main__':\n    main()") == "    return 1\n"
    assert truncate("    return 1\n") == "    return 1\n"


def test_loglik_counts_predicted_tokens_and_refuses_sat_tokens():
    base = tiny_loaded(k=4)
    texts = ["def f(x):\n    return x + 1\n", "for i in range(3):\n    print(i)\n"]
    first = mean_loglik(base, texts)
    assert first.tokens == sum(len(t) - 1 for t in texts) and first.mean < 0
    with pytest.raises(ValueError, match="SAT token"):
        mean_loglik(base, [texts[0] + chr(base.sat.sat_ids[0])])
    with pytest.raises(ValueError, match="no held-out"):
        mean_loglik(base, [])


def _gate_config() -> GateConfig:
    return GateConfig(problems=2, max_new_tokens=8, batch_size=2, limits=ROOMY)


def test_gate_shows_exactly_no_change_for_a_sat_adapter_export():
    base = tiny_loaded(k=4)
    export = tiny_loaded(k=4)  # the same seeded weights, then a trained-looking adapter
    _randomize(attach_adapter(export.model, export.sat.sat_ids, AdapterConfig(rank=4)))
    verdict = run_gate(base, export, _gate_config())
    assert verdict.passed and verdict.reasons == []
    assert verdict.pass_drop_points == 0.0 and verdict.loglik_drop == 0.0
    assert verdict.changed_completions == 0 and verdict.base.completions == verdict.export.completions
    assert verdict.base.loglik == verdict.export.loglik


def test_gate_fails_an_export_made_worse_on_purpose(tmp_path):
    base = tiny_loaded(k=4)
    worse = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in worse.model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.5)
    verdict = run_gate(base, worse, _gate_config())
    assert not verdict.passed
    assert verdict.loglik_drop > 0.05 and any("log-likelihood" in r for r in verdict.reasons)
    path = write_verdict(verdict, tmp_path)
    assert Path(path).name == "quality_gate.json" and '"passed": false' in path.read_text()


def test_judge_fails_a_pass_at_1_drop_beyond_the_limit():
    cfg = GateConfig(max_pass_drop_points=3.0)
    base = Quality("base", 0.20, [True] * 2 + [False] * 8, ["a"] * 10, -1.0, 100)
    same_ll = replace(base, model="export", pass_at_1=0.10, passed=[True] + [False] * 9, completions=["b"] * 10)
    verdict = judge(base, same_ll, cfg)
    assert not verdict.passed and verdict.pass_drop_points == pytest.approx(10.0)
    assert verdict.reasons == ["pass@1 dropped 10.0 points (limit 3)"] and verdict.changed_completions == 10
    within = replace(same_ll, pass_at_1=0.18)
    assert judge(base, within, cfg).passed
