"""docs/results.md and the README's speed table are generated from results/*.json and current."""

from __future__ import annotations

import json

import pytest

from jobs.results_doc import BEGIN, END, load_results, main, render_doc, render_readme


def test_generated_docs_are_current():
    """Fails when results/ changed but docs/results.md or README.md was not regenerated:
    run python jobs/results_doc.py."""
    assert main(["--check"]) == 0


def _bench(speedup: float, json_name: str, dtype: str = "bfloat16", mismatches=()) -> dict:
    return {
        "command": f"python jobs/bench.py --num-sat 5 --dtype {dtype} --json results/{json_name}",
        "machine": {"cpu": "Test CPU", "cpu_flags": ["avx2"], "cores": 2, "torch_threads": 2, "gpu": None},
        "model": "default", "dtype": dtype, "k": 5, "batch": 1, "prompts": "humaneval:2", "max_new_tokens": 8,
        "decoder": "fused", "lookup": 16, "plain_tokens_per_s": 10.0, "sdsat_tokens_per_s": 10.0 * speedup,
        "speedup": speedup, "tau": 2.0, "tokens_per_forward": 2.0, "accept_rate_per_offset": [0.5, 0.25],
        "identical": not mismatches, "token_match_rate": 1.0 if not mismatches else 0.5,
        "near_tie_threshold_fp32": 0.25, "non_tie_mismatches": list(mismatches),
    }


def _evaluate(tmp_path) -> dict:
    row = {"plain_tokens_per_s": 10.0, "sdsat_tokens_per_s": 15.0, "speedup": 1.5, "tau": 2.5,
           "tokens_per_forward": 1.25, "accept_rate_per_offset": [0.6, 0.4]}
    (tmp_path / "evaluate").mkdir()
    (tmp_path / "evaluate" / "speedup_vs_k.png").write_bytes(b"png")
    return {
        "command": "python jobs/evaluate.py --limit 2 --json results/evaluate.json",
        "machine": {"cpu": "Test CPU", "cpu_flags": ["avx512_bf16"], "cores": 16, "torch_threads": 8, "gpu": None},
        "model": "default", "dtype": "bfloat16", "device": "cpu",
        "speed": {"prompts": "humaneval:2", "max_new_tokens": 8, "k_capped_at": 5,
                  "across_k": [row | {"k": 1}, row | {"k": 2}], "across_batch": [row | {"batch": 4, "rows": 2, "k": 5}]},
        "plots": {"speedup_vs_k": "evaluate/speedup_vs_k.png"},
    }


def test_runs_of_one_command_share_a_row_and_plots_are_embedded(tmp_path):
    results_dir, docs = tmp_path / "results", tmp_path / "docs"
    results_dir.mkdir()
    tie = {"prompt": 7, "margin_fp32": 0.3, "position": 0}
    for name, data in {"a.json": _bench(2.0, "a.json", mismatches=[tie]), "b.json": _bench(2.2, "b.json"),
                       "c.json": _bench(1.4, "c.json", dtype="float32")}.items():
        (results_dir / name).write_text(json.dumps(data))
    (results_dir / "evaluate.json").write_text(json.dumps(_evaluate(results_dir)))
    results = load_results(results_dir)
    doc = render_doc(results, docs / "results.md")
    assert "**2.00-2.20x (2 runs)**" in doc and "**1.40x**" in doc
    assert "Test CPU, 2 cores, no native bf16, 2 threads" in doc and "Test CPU, 16 cores, native bf16, 8 threads" in doc
    assert "`python jobs/bench.py --num-sat 5 --dtype bfloat16`" in doc  # the command, its --json left out
    assert "![speedup_vs_k](../results/evaluate/speedup_vs_k.png)" in doc and "k capped at 5" in doc
    assert "1 of 1 float32 runs identical" in doc and "prompt 7 (margin 0.300) in 1" in doc
    readme = render_readme(f"intro\n{BEGIN}\nold table\n{END}\nrest\n", results, tmp_path / "README.md")
    assert "old table" not in readme and readme.startswith("intro\n") and readme.endswith(f"{END}\nrest\n")
    assert "| 4 | 5 | default |" in readme and "| not recorded |" in readme and "(results/evaluate.json)" in readme


def test_a_result_without_its_command_is_refused(tmp_path):
    (tmp_path / "old.json").write_text(json.dumps({"speedup": 2.0}))
    with pytest.raises(ValueError, match="old.json: no 'command'"):
        load_results(tmp_path)
    (tmp_path / "old.json").write_text(json.dumps({"command": "python jobs/other.py"}))
    with pytest.raises(ValueError, match="not a command of"):
        render_doc(load_results(tmp_path), tmp_path / "docs" / "results.md")


def test_readme_without_markers_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="markers"):
        render_readme("no markers here\n", [], tmp_path / "README.md")


def test_load_tests_get_a_line_under_the_speed_table(tmp_path):
    results_dir = tmp_path / "results"
    results_dir.mkdir()
    (results_dir / "b.json").write_text(json.dumps(_bench(1.5, "b.json")))
    level = {"requests": 2, "errors": 0, "output_tokens": 10, "wall_s": 1.0, "ttft_p50_s": 0.1, "ttft_p99_s": 0.2,
             "tpot_p50_s": 0.05, "tpot_p99_s": 0.06, "error_samples": []}
    rows = [level | {"mode": m, "num_sat": k, "concurrency": c, "tokens_per_s": t, "mean_tau": tau}
            for c, m, k, t, tau in ((1, "plain", 0, 10.0, 1.0), (1, "sdsat", 5, 21.0, 3.0), (4, "plain", 0, 30.0, 1.0),
                                    (4, "sdsat", 5, 33.0, 2.0))]
    load = {"command": "python jobs/load_test.py --concurrency 1,4 --json results/load.json",
            "machine": _bench(1.0, "x")["machine"], "serve_command": "serve run deployments.sdsat:app",
            "server": {"dtype": "bfloat16"}, "max_tokens": 8, "prompts": "mixed", "results": rows,
            "speedup": {"1": 2.1, "4": 1.1}}
    (results_dir / "load.json").write_text(json.dumps(load))
    readme = render_readme(f"{BEGIN}\n{END}\n", load_results(results_dir), tmp_path / "README.md")
    assert "Over HTTP ([load.json](results/load.json) against `serve run deployments.sdsat:app`, bfloat16," in readme
    assert "**2.10x** at 1, **1.10x** at 4." in readme


def test_head_levers_get_one_row_each(tmp_path):
    results_dir = tmp_path / "results"
    results_dir.mkdir()
    lever = {"full": [0.7, 0.6], "top64": [0.65, 0.55], "top256": [0.68, 0.58], "sat": [0.5, 0.4], "seconds": 9}
    (results_dir / "levers.json").write_text(json.dumps({
        "command": "python jobs/head_levers.py --distilled rows.json --json results/levers.json",
        "machine": {"cpu": "Test CPU", "cpu_flags": ["avx2"], "cores": 2, "torch_threads": 2, "gpu": None},
        "levers": {"base": lever | {"settings": {}}, "kl": lever | {"settings": {"kl": 1.0}, "full": [0.71, 0.62]}},
        "samples": 1000, "train_rows": 10, "val_rows": 2, "model": "default", "k": 2, "distilled": "rows.json"}))
    doc = render_doc(load_results(results_dir), tmp_path / "docs" / "results.md")
    assert "| base | (base) | 0.70 0.60 | 0.65 0.55 | 0.68 0.58 |" in doc
    assert "| kl | kl=1.0 | 0.71 0.62 |" in doc and "The SATs alone: 0.50 0.40." in doc


def test_near_tie_spreads_and_kernel_runs_get_their_own_rows(tmp_path):
    results_dir = tmp_path / "results"
    results_dir.mkdir()
    spread = {"0.5": 0.125, "0.9": 0.25, "0.99": 0.375, "0.999": 0.5, "max": 0.625, "n": 100}
    (results_dir / "near_tie.json").write_text(json.dumps({
        "model": "default-base", "prompts": "mixed", "new_tokens": 8, "near_tie_threshold_fp32": 0.25,
        "gap_difference": {"1-token, ATen vs 6-token, oneDNN": spread}, "error_vs_fp32": {"1-token, ATen": spread},
        "machine": {"cpu": "Test CPU", "cpu_flags": ["avx512_bf16"], "cores": 2, "torch_threads": 2, "gpu": None,
                    "command": "jobs/near_tie.py --json results/near_tie.json"}}))
    bench = {"model": "default", "dtype": "bfloat16", "batch": 1, "k": 5, "decoder": "scheduled", "lookup": 16,
             "plain_tokens_per_s": 20.0, "sdsat_tokens_per_s": 30.0, "speedup": 1.5, "tau": 2.0, "tokens_per_forward": 2.0,
             "accept_rate_per_offset": [0.5], "identical": True, "token_match_rate": 1.0, "prompts": "mixed",
             "max_new_tokens": 8, "near_tie_threshold_fp32": 0.25}
    command = "jobs/bench.py --dtype bfloat16"
    native = {"cpu": "Test CPU", "cpu_flags": ["avx512_bf16"], "cores": 2, "torch_threads": 2, "gpu": None, "command": command}
    capped = native | {"isa_cap": "AVX2", "native_bf16": False}
    (results_dir / "a.json").write_text(json.dumps(bench | {"machine": native, "kernels": {"aten_max_tokens": 4}}))
    (results_dir / "b.json").write_text(json.dumps(bench | {"machine": capped, "kernels": {"aten_max_tokens": 0}, "speedup": 1.2}))
    fp32 = bench | {"dtype": "float32", "speedup": 1.1, "machine": native | {"command": command.replace("bfloat16", "float32")},
                    "kernels": {"aten_max_tokens": 0, "reason": "float32: one kernel family", "measured_ms": {}}}
    (results_dir / "c.json").write_text(json.dumps(fp32))
    doc = render_doc(load_results(results_dir), tmp_path / "docs" / "results.md")
    assert "| 1-token, ATen vs 6-token, oneDNN | 0.125 | 0.250 | 0.375 | 0.500 | 0.625 | 100 |" in doc
    fp32_row = next(line for line in doc.splitlines() if line.startswith("| Test CPU") and "**1.10x**" in line)
    assert "oneDNN" not in fp32_row and "ATen" not in fp32_row  # nothing was chosen in fp32
    rows = [line for line in doc.splitlines() if line.startswith("| Test CPU")]
    assert any("native bf16, 2 threads" in r and "ATen <= 4 tokens" in r and "**1.50x**" in r for r in rows)
    assert any("no native bf16 (kernels capped at AVX2)" in r and ", oneDNN" in r and "**1.20x**" in r for r in rows)
