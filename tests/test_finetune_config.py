"""The fine-tuning config and the refusals that happen before any Ray worker starts."""

from __future__ import annotations

import json

import pytest
import ray
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from jobs.finetune import main
from sdsat.training.config import FinetuneConfig, build_parser, load_config, parse_args
from jobs.finetune_ray import check_resources
from sdsat.training.plan import check_model, prepare
from sdsat.model.load import LoadedModel, save_model
from sdsat.model.sat import SATConfig
from tests.conftest import tiny_model


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A real, saveable byte-level tokenizer: 256 byte tokens plus <eos> (id 256)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)} | {"<eos>": len(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>", model_max_length=1024)


def save_tiny_checkpoint(directory, sat: SATConfig | None = None):
    """A tiny random Llama with a byte tokenizer, saved so that load_model(directory) works."""
    save_model(LoadedModel(tiny_model(vocab=257), tiny_tokenizer(), sat, "tiny", ""), directory)
    return str(directory)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def test_defaults_yaml_and_flags_layer(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("num_sat: 3\nlr: 2.0e-4\nmax_steps: 17\n")
    cfg, _ = parse_args(["--config", str(cfg_file), "--max-steps", "19", "--train", "sat_embeddings", "--sat-lr", "1e-2"])
    assert (cfg.num_sat, cfg.lr, cfg.max_steps, cfg.train, cfg.sat_lr) == (3, 2e-4, 19, "sat_embeddings", 1e-2)
    assert cfg.row_len == FinetuneConfig().row_len
    assert load_config(overrides={"export_dir": "none", "fail_at_step": "null"}).export_dir is None


def test_help_documents_every_field():
    text = build_parser().format_help()
    for name, field in FinetuneConfig.model_fields.items():
        assert field.description, name
        assert f"--{name.replace('_', '-')}" in text


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"nmu_sat": 3}, "nmu_sat"),
        ({"num_sat": 8, "row_len": 9}, "row_len=9 is shorter than num_sat"),
        ({"num_sat": 0}, "num_sat"),
        ({"train": "lora"}, "train"),
        ({"strategy": "fsdp", "train": "sat_embeddings"}, "strategy=fsdp"),
        ({"activation_checkpointing": True, "train": "sat_adapter"}, "activation_checkpointing applies to train=full"),
        ({"sat_lr": 0.1}, "sat_lr applies only"),
        ({"warmup_steps": 50, "max_steps": 10}, "warmup_steps"),
        ({"fail_at_step": 11, "max_steps": 10}, "fail_at_step"),
        ({"lr": "fast"}, "lr"),
    ],
)
def test_bad_values_are_refused_with_the_field_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(overrides=overrides)


def test_config_file_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(bad)


def test_shipped_configs_load():
    from pathlib import Path

    names = sorted(Path("configs").glob("finetune_*.yaml")) + sorted(Path("configs/experiments").glob("*.yaml"))
    assert len(names) >= 7
    for name in names:
        load_config(name)


def test_the_artifact_stages_are_machine_independent():
    for name in ("configs/finetune_artifact.yaml", "configs/finetune_head.yaml", "configs/finetune_continue.yaml",
                 "configs/finetune_stage4.yaml", "configs/finetune_stage5.yaml", "configs/finetune_stage6.yaml"):
        cfg = load_config(name)
        assert cfg.max_minutes is None and cfg.precision == "bf16" and cfg.distill_dtype == "bfloat16", name
        assert cfg.export_dir == "sdsat/model/artifacts/default" and cfg.distill_cache is None, name
    for name in ("configs/finetune_continue.yaml", "configs/finetune_stage4.yaml", "configs/finetune_stage5.yaml",
                 "configs/finetune_stage6.yaml"):  # continue the shipped adapter and head
        later = load_config(name)
        assert later.model == "default" and later.keep_head and not later.freeze_adapter and later.draft_head == 1024, name


def _cfg(model, **overrides):
    base = dict(model=model, num_sat=4, row_len=32, max_texts=4, eval_every=0, name="run")
    return load_config(overrides=base | overrides).model_dump()


def test_prepare_packs_rows_and_checks_model(tiny_ckpt, tmp_path):
    plan = prepare(_cfg(tiny_ckpt, storage_path=str(tmp_path), eval_every=5))
    assert plan.train_rows.shape[1] == 32 and len(plan.train_rows) > 10
    assert plan.val_rows is not None and plan.val_rows.shape[1] == 32
    assert plan.model_sats == 0 and plan.export_dir == str(tmp_path / plan.run_name / "export")


def test_refuses_unknown_dataset_and_empty_corpus(tiny_ckpt, tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        prepare(_cfg(tiny_ckpt, dataset=str(tmp_path / "nope.jsonl")))
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": "  "}) + "\n")
    with pytest.raises(ValueError, match="empty corpus"):
        prepare(_cfg(tiny_ckpt, dataset=str(empty)))
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    with pytest.raises(ValueError, match="too small"):
        prepare(_cfg(tiny_ckpt, dataset=str(short)))


def test_refuses_k_beyond_the_models_sats_and_unknown_model(tmp_path):
    with_sats = save_tiny_checkpoint(tmp_path / "m", SATConfig(sat_ids=[250, 251], sat_tokens=["<sat_1>", "<sat_2>"]))
    with pytest.raises(ValueError, match="larger than the 2 SATs"):
        prepare(_cfg(with_sats))
    with pytest.raises(ValueError, match="cannot load"):
        prepare(_cfg(str(tmp_path / "no_model")))


def _shipped_head_width() -> tuple[SATConfig, int]:
    """The shipped artifact's SAT config and its draft head's width, cross-checked against the
    weights' safetensors header (fc1: [width, 3 * hidden]) without loading them."""
    from safetensors import safe_open

    from sdsat.model.draft_head import WEIGHTS_FILE
    from sdsat.model.load import DEFAULT_ARTIFACT

    shipped = SATConfig.load(DEFAULT_ARTIFACT)
    assert shipped is not None and shipped.num_sat > 0 and shipped.head, "the repo ships a SAT artifact with a draft head"
    with safe_open(str(DEFAULT_ARTIFACT / WEIGHTS_FILE), "pt") as f:
        width = f.get_slice("fc1.weight").get_shape()[0]
    assert shipped.head["width"] == width
    return shipped, width


def test_model_default_is_checked_as_the_shipped_artifact_the_worker_loads(tmp_path):
    """model: default trains from the shipped artifact (its SATs and draft head), not the bare
    base checkpoint: num_sat beyond its SATs and keep_head with another head width are refused
    before Ray starts, and the plan reports the artifact's SATs."""
    shipped, width = _shipped_head_width()
    n = shipped.num_sat
    with pytest.raises(ValueError, match=f"num_sat={n + 1} is larger than the {n} SATs of model 'default'"):
        check_model(_cfg("default", num_sat=n + 1))
    head = dict(train="sat_adapter", draft_head=width + 1, keep_head=True)
    with pytest.raises(ValueError, match=f"keep_head: the model 'default' has no draft head of width {width + 1} "
                                         f"to continue \\(width {width}\\)"):
        prepare(_cfg("default", num_sat=n, **head))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def add(a, b):\n    return a + b\n\n" * 200)
    plan = prepare(_cfg("default", num_sat=n, dataset=str(corpus), storage_path=str(tmp_path), **(head | {"draft_head": width})))
    assert plan.model_sats == n and len(plan.train_rows) > 0
    # the base alone has no SATs (the worker adds them) and no head to keep
    assert check_model(_cfg("default-base", num_sat=n + 1))[1] == 0
    with pytest.raises(ValueError, match=f"no draft head of width {width} to continue \\(none\\)"):
        check_model(_cfg("default-base", num_sat=n, **(head | {"draft_head": width})))


def test_an_artifact_directory_is_checked_as_itself(tiny_ckpt, tmp_path):
    """A SAT artifact directory given by path brings its own SATs and head (load_model's), not
    those of the base checkpoint it names."""
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    SATConfig(sat_ids=[250, 251], sat_tokens=["<sat_1>", "<sat_2>"], base_model=tiny_ckpt, head={"width": 32}).save(artifact)
    with pytest.raises(ValueError, match="num_sat=3 is larger than the 2 SATs"):
        check_model(_cfg(str(artifact), num_sat=3))
    head = dict(train="sat_adapter", keep_head=True)
    with pytest.raises(ValueError, match="no draft head of width 16 to continue \\(width 32\\)"):
        check_model(_cfg(str(artifact), num_sat=2, draft_head=16, **head))
    assert check_model(_cfg(str(artifact), num_sat=2, draft_head=32, **head))[1] == 2
    # a checkpoint with SATs but no head; a cfg without the head keys is not checked for one
    with_sats = save_tiny_checkpoint(tmp_path / "m", SATConfig(sat_ids=[250, 251], sat_tokens=["<sat_1>", "<sat_2>"]))
    with pytest.raises(ValueError, match="no draft head of width 32 to continue \\(none\\)"):
        check_model(_cfg(with_sats, num_sat=2, draft_head=32, **head))
    assert check_model({"model": with_sats, "num_sat": 2})[1] == 2


def test_refuses_foreign_export_dir_and_bad_resume(tiny_ckpt, tmp_path):
    foreign = tmp_path / "out"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an SDSAT export"):
        prepare(_cfg(tiny_ckpt, export_dir=str(foreign)))
    with pytest.raises(ValueError, match="no complete checkpoint"):
        prepare(_cfg(tiny_ckpt, resume_from=str(foreign)))


def test_main_refuses_before_starting_ray(tiny_ckpt, tmp_path, capsys):
    assert main(["--model", tiny_ckpt, "--num-sat", "4", "--row-len", "5"]) == 2
    assert "row_len=5 is shorter" in capsys.readouterr().err
    assert main(["--model", tiny_ckpt, "--num-sat", "4", "--dataset", str(tmp_path / "x")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_refuses_workers_the_cluster_cannot_place():
    cfg = load_config(overrides={"num_workers": 4})
    with pytest.raises(ValueError, match="need 4 CPU but the cluster has 2"):
        check_resources(cfg, {"CPU": 2.0}, None, joined=False)
    with pytest.raises(ValueError, match="GPU"):
        check_resources(load_config(overrides={"use_gpu": True}), {"CPU": 8.0}, None, joined=False)
    check_resources(load_config(overrides={"num_workers": 2}), {"CPU": 2.0}, None, joined=False)


def test_gpu_workers_scaled_to_zero_wait_for_the_autoscaler(caplog):
    """A CPU head with GPU workers at min_workers 0: no GPU now, but the autoscaler can start
    them, so the job warns and goes on; beyond what it can ever start, it refuses."""
    cfg = load_config(overrides={"num_workers": 2, "use_gpu": True})
    with caplog.at_level("WARNING"):
        check_resources(cfg, {"CPU": 4.0}, {"CPU": 68.0, "GPU": 8}, joined=True)
    assert "autoscaler can start the nodes" in caplog.text
    with pytest.raises(ValueError, match="its autoscaler can reach 1"):
        check_resources(cfg, {"CPU": 4.0}, {"CPU": 20.0, "GPU": 1}, joined=True)
    check_resources(cfg, {"CPU": 4.0}, None, joined=True)  # an unknown autoscaler on a joined cluster: warn only
    assert "waiting for an autoscaler" in caplog.text


def test_a_storage_uri_stays_a_uri(tiny_ckpt):
    plan = prepare(_cfg(tiny_ckpt, storage_path="s3://bucket/runs/"))
    assert plan.run_dir == "s3://bucket/runs/run" and plan.export_dir == "s3://bucket/runs/run/export"
    plan = prepare(_cfg(tiny_ckpt, storage_path="gs://bucket", export_dir="gs://other/out"))
    assert (plan.run_dir, plan.export_dir) == ("gs://bucket/run", "gs://other/out")
    with pytest.raises(ValueError, match="give a local or shared path"):
        prepare(_cfg(tiny_ckpt, storage_path="s3://bucket/runs", resume_from="s3://bucket/runs/old"))


def test_no_arguments_run_the_default_recipe():
    from sdsat.training.config import DEFAULT_CONFIG

    recipe, _ = parse_args([])
    assert recipe == load_config(DEFAULT_CONFIG)
    assert (recipe.train, recipe.model) == ("sat_adapter", "default-base")
    # flags change the default recipe (a user redirecting the output keeps the recipe)
    flagged, _ = parse_args(["--max-steps", "30", "--storage-path", "/data/runs"])
    assert flagged == recipe.model_copy(update={"max_steps": 30, "storage_path": "/data/runs"})
    bare, _ = parse_args(["--config", "none", "--max-steps", "30"])  # only the field defaults under the flags
    assert bare == FinetuneConfig(max_steps=30)


def test_distill_cache_is_read_instead_of_generating(tmp_path):
    import numpy as np

    from sdsat.training.distill import distill_rows

    cache = tmp_path / "distilled.json"
    cache.write_text(json.dumps([[1, 2, 3, 4, 5, 6, 7, 8], [9, 10], list(range(20))]))
    cfg = load_config(overrides={"num_sat": 5, "distill_max_new_tokens": 16, "distill_cache": str(cache)}).model_dump()

    def never(parts):
        raise AssertionError("the cache should have been read")

    rows = distill_rows(cfg, np.zeros((4, 32), dtype=np.int32), never)
    assert [r.tolist() for r in rows] == [[1, 2, 3, 4, 5, 6, 7, 8], list(range(20))]  # [9, 10] is too short


def test_upload_to_a_uri_creates_its_directory(tmp_path):
    from sdsat.training.storage import join, upload

    (tmp_path / "src" / "d").mkdir(parents=True)
    (tmp_path / "src" / "a.txt").write_text("a")
    (tmp_path / "src" / "d" / "b.txt").write_text("b")
    target = join(f"file://{tmp_path}", "run", "export")
    assert target == f"file://{tmp_path}/run/export"
    upload(tmp_path / "src", target)
    assert (tmp_path / "run" / "export" / "a.txt").read_text() == "a"
    assert (tmp_path / "run" / "export" / "d" / "b.txt").read_text() == "b"


def test_the_artifact_recipe_reads_its_committed_prompts(tmp_path):
    from sdsat.training.distill import read_prompts

    cfg = load_config("configs/finetune_artifact.yaml")
    assert cfg.max_minutes is None and cfg.precision == "bf16" and cfg.distill_dtype == "bfloat16"  # machine-independent
    prompts = read_prompts(cfg.distill_prompts)
    assert len(prompts) == cfg.distill_rows == 1024 and {len(p) for p in prompts} == {cfg.distill_prompt_len}
    assert max(max(p) for p in prompts) < 49152  # the default tokenizer's vocabulary
    (tmp_path / "bad.json").write_text('{"not": "a list"}')
    with pytest.raises(ValueError, match="expected a non-empty JSON list"):
        read_prompts(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="no such file"):
        read_prompts(str(tmp_path / "missing.json"))


def test_a_prompt_file_can_be_sliced(tmp_path):
    from sdsat.training.distill import read_prompts

    (tmp_path / "a.json").write_text("[[1], [2], [3], [4], [5]]")
    (tmp_path / "b.json").write_text("[[10], [20]]")
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert read_prompts(f"{a}[3:]") == [[4], [5]]
    assert read_prompts(f"{a}[:2]") == [[1], [2]]
    assert read_prompts(f"{a}[1:3],{b}") == [[2], [10], [3], [20]]  # sliced, then interleaved
    assert read_prompts(f"{a}[:]") == read_prompts(str(a))
    for bad in ("[9:]", "[x:]", "[1:2:1]", "[-1:]", "[2]"):
        with pytest.raises(ValueError, match="slice"):
            read_prompts(f"{a}{bad}")


def test_stage5_takes_only_the_code_prompts_stage4_left_unused():
    from sdsat.training.distill import read_prompts

    stage4, stage5 = load_config("configs/finetune_stage4.yaml"), load_config("configs/finetune_stage5.yaml")
    seen = {tuple(p) for p in read_prompts(stage4.distill_prompts)[: stage4.distill_rows]}
    new = read_prompts(stage5.distill_prompts)[: stage5.distill_rows]
    assert len(new) == stage5.distill_rows and not seen & {tuple(p) for p in new}
    # and the slice starts right after the last one stage 4 used: nothing skipped
    assert tuple(read_prompts("configs/data/code_prompts_more.json")[612]) in seen


def test_stage6_fixes_what_its_time_boxed_gpu_run_resolved_to():
    """Stage 6 ran time-boxed on a GPU; its config trains on exactly the prompts that run
    distilled (the first 2816 of its interleave), none of stage 5's."""
    from sdsat.training.distill import read_prompts

    stage6 = load_config("configs/finetune_stage6.yaml")
    assert (stage6.distill_rows, stage6.max_steps, stage6.distill_sampled) == (2816, 486, 0)
    assert len(read_prompts(stage6.distill_prompts)) == 5686
    stage5 = load_config("configs/finetune_stage5.yaml")
    seen5 = {tuple(p) for p in read_prompts(stage5.distill_prompts)[: stage5.distill_rows]}
    assert not seen5 & {tuple(p) for p in read_prompts(stage6.distill_prompts)[:2816]}


def test_the_next_gpu_stage_continues_stage6_on_more_distinct_rows():
    """configs/finetune_gpu.yaml: stage 6's weights-shaping fields, its prompts and the unused
    chat pools, sampled rows on top, and the time box left to jobs/gpu_finetune.sh."""
    from sdsat.training.distill import read_prompts, work_items

    gpu, stage6 = load_config("configs/finetune_gpu.yaml"), load_config("configs/finetune_stage6.yaml")
    assert gpu.max_minutes is None and gpu.distill_rows is None and gpu.export_dir == stage6.export_dir
    same = ("model", "keep_head", "adapter_rank", "adapter_targets", "draft_head", "lr", "warmup_steps", "min_lr_ratio",
            "row_len", "distill_max_new_tokens", "poisson_lambda", "max_blocks", "precision", "w_head", "w_teacher")
    assert {k: getattr(stage6, k) for k in same} == {k: getattr(gpu, k) for k in same}
    prompts = read_prompts(gpu.distill_prompts)
    assert {tuple(p) for p in read_prompts(stage6.distill_prompts)} < {tuple(p) for p in prompts}
    assert len(prompts) == len({tuple(p) for p in prompts}) == 7766
    assert gpu.distill_sampled == 2 and len(work_items(prompts, gpu.distill_sampled)) == 23298
