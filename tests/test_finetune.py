"""jobs/finetune.py on a real local Ray cluster (2 CPU workers, DDP over gloo) with a tiny
random model, plus the training set-up pieces that need no Ray."""

from __future__ import annotations

import os

import pytest
import ray
import torch
from safetensors.torch import load_file

from jobs.finetune import main
from sdsat.training.checkpoint import checkpoint_dirs, is_complete, read_state
from sdsat.training.setup import make_scheduler, select_trainable
from sdsat.decode.generate import generate, make_sequences
from sdsat.model.load import load_model
from tests.conftest import tiny_model
from tests.test_finetune_config import save_tiny_checkpoint

K = 4
RUN = ["--config", "none", "--num-sat", str(K), "--row-len", "32", "--max-texts", "6", "--num-workers", "2", "--batch-size", "2",
       "--max-steps", "6", "--checkpoint-every", "2", "--warmup-steps", "1", "--eval-every", "3", "--eval-rows", "3",
       "--precision", "fp32", "--seed", "3"]


@pytest.fixture(scope="module")
def ray_cluster():
    """A fresh 2-CPU local cluster for this module; only it is shut down afterwards."""
    if ray.is_initialized():
        pytest.skip("a Ray session is already open in this process")
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.5"  # inherited by the cluster's processes
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("base"))


def _run(tiny_path, storage, name, *extra) -> int:
    return main(["--model", tiny_path, "--storage-path", str(storage), "--name", name, *RUN, *extra])


def _weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


def _assert_lossless(exported, reference=None) -> None:
    """SDSAT decoding with the export equals plain greedy decoding of ``reference`` (default: the export)."""
    reference = reference or exported
    prompts = [exported.tokenizer.encode("def add(a, b):\n"), exported.tokenizer.encode("import os\nfor x in")]
    plain = generate(reference, make_sequences(reference, prompts, 24, eos=False), num_sat=0)
    sdsat = generate(exported, make_sequences(exported, prompts, 24, eos=False), num_sat=K)
    assert [s.output_ids for s in sdsat] == [s.output_ids for s in plain]
    assert all(len(s.output_ids) == 24 for s in sdsat)


@pytest.mark.slow
def test_two_workers_train_checkpoint_export_and_decode(ray_cluster, tiny_path, tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    assert _run(tiny_path, storage, "plain") == 0
    run_dir = storage / "plain"
    steps = sorted(read_state(d)["step"] for d in checkpoint_dirs(run_dir))
    assert steps == [2, 4, 6] and all(is_complete(d) for d in checkpoint_dirs(run_dir))
    final = read_state(run_dir / "checkpoint_000006")
    assert final["metrics"]["val_loss"] > 0 and len([k for k in final["metrics"] if k.startswith("sat_acc_")]) == K

    exported = load_model(str(run_dir / "export"), dtype="float32")
    assert exported.sat.num_sat_trained == K and exported.sat.recipe["max_steps"] == 6
    base = _weights(tiny_path)
    trained = _weights(run_dir / "export")
    assert not torch.equal(base["model.layers.0.mlp.up_proj.weight"], trained["model.layers.0.mlp.up_proj.weight"])

    _assert_lossless(exported)

    # A worker dies at step 3: the run restarts from checkpoint 2 (max_failures=1, and a
    # restart from scratch would die again), keeps every checkpoint and ends with the same
    # weights as the uninterrupted run: step count, data position, optimizer and schedule
    # all continued.
    assert _run(tiny_path, storage, "failing", "--fail-at-step", "3", "--max-failures", "1") == 0
    failing_dir = storage / "failing"
    assert sorted(read_state(d)["step"] for d in checkpoint_dirs(failing_dir)) == [2, 4, 6]
    assert read_state(failing_dir / "checkpoint_000006")["samples"] == 6 * 2 * 2
    resumed = _weights(failing_dir / "export")
    assert resumed.keys() == trained.keys()
    for key in trained:
        torch.testing.assert_close(resumed[key], trained[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
def test_a_later_run_resumes_a_finished_one(ray_cluster, tiny_path, tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    assert _run(tiny_path, storage, "first", "--max-steps", "2", "--warmup-steps", "0", "--eval-every", "0") == 0
    assert _run(tiny_path, storage, "second", "--max-steps", "4", "--warmup-steps", "0", "--eval-every", "0",
                "--num-workers", "1", "--resume-from", str(storage / "first")) == 0
    second = storage / "second"
    assert sorted(read_state(d)["step"] for d in checkpoint_dirs(second)) == [4]
    assert read_state(second / "checkpoint_000004")["samples"] == 2 * 2 * 2 + 2 * 2 * 1  # 2 steps x 2 workers, 2 x 1
    assert load_model(str(second / "export")).sat.num_sat_trained == K


@pytest.mark.slow
def test_sat_adapter_run_keeps_the_base_and_exports_checkpoint_and_artifact(ray_cluster, tiny_path, tmp_path_factory):
    """train=sat_adapter on 2 workers: the base weights come out bit-identical, SDSAT with the
    export equals plain greedy of the untouched base, and an artifact export loads onto it."""
    storage = tmp_path_factory.mktemp("runs")
    adapter_args = ("--train", "sat_adapter", "--adapter-rank", "4", "--lr", "1e-2", "--sat-lr", "5e-2",
                    "--poisson-lambda", "6", "--w-kl", "0.5")
    assert _run(tiny_path, storage, "adapter", *adapter_args) == 0
    export = storage / "adapter" / "export"
    base, exported_weights = _weights(tiny_path), _weights(export)
    assert set(exported_weights) == set(base)  # the adapter is not in model.safetensors
    for key in base:
        if key not in ("model.embed_tokens.weight", "lm_head.weight"):  # these grew by the SAT rows
            assert torch.equal(exported_weights[key], base[key]), key
    adapter = load_file(os.path.join(export, "sdsat_adapter.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if k.endswith(".b"))  # the deltas trained

    exported = load_model(str(export), dtype="float32")
    reference = load_model(tiny_path, dtype="float32", add_sat=K)
    _assert_lossless(exported, reference)

    assert _run(tiny_path, storage, "artifact", *adapter_args, "--export-format", "artifact",
                "--export-dtype", "bfloat16", "--max-steps", "2", "--checkpoint-every", "1") == 0
    artifact = storage / "artifact" / "export"
    assert sorted(p.name for p in artifact.iterdir()) == ["sdsat_adapter.safetensors", "sdsat_config.json"]
    loaded = load_model(str(artifact), dtype="float32")
    assert loaded.sat.num_sat_trained == K and loaded.sat.adapter["rank"] == 4
    _assert_lossless(loaded, reference)


def test_sat_embeddings_trains_only_the_sat_rows():
    model = tiny_model()
    sat_ids = [252, 253, 254, 255]
    cfg = {"train": "sat_embeddings", "lr": 1e-3, "sat_lr": 0.5, "weight_decay": 0.1}
    options = select_trainable(model, sat_ids, cfg)
    assert options == {"lr": 0.5, "weight_decay": 0.0}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **options)
    x = torch.tensor([[5, 6, 7, 252, 253, 8, 254, 255, 9]])
    for _ in range(2):
        optimizer.zero_grad()
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
    embed = model.get_input_embeddings().weight
    others = [i for i in range(embed.shape[0]) if i not in sat_ids]
    assert torch.equal(embed[others], before["model.embed_tokens.weight"][others])
    assert not torch.equal(embed[sat_ids], before["model.embed_tokens.weight"][sat_ids])
    for name, p in model.named_parameters():
        if name != "model.embed_tokens.weight":
            assert not p.requires_grad and torch.equal(p, before[name]), name


def test_schedule_warms_up_then_decays_to_the_floor():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(optimizer, {"warmup_steps": 4, "max_steps": 20, "min_lr_ratio": 0.1})
    lrs = []
    for _ in range(20):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8]) and lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and scheduler.get_last_lr()[0] == pytest.approx(0.1)


@pytest.mark.slow
def test_fsdp_full_training_with_a_failure_resumes_and_exports(ray_cluster, tiny_path, tmp_path_factory):
    """strategy=fsdp, train=full on 2 workers (meta init, rank-0 broadcast load, bf16 mixed
    precision policy, activation checkpointing): a worker dies at step 3, the run resumes from
    its step-2 checkpoint, and the streamed export loads and decodes losslessly."""
    storage = tmp_path_factory.mktemp("runs")
    args = ("--strategy", "fsdp", "--precision", "bf16", "--activation-checkpointing", "true", "--max-steps", "4",
            "--eval-every", "2", "--fail-at-step", "3", "--max-failures", "1")
    assert _run(tiny_path, storage, "fsdp", *args) == 0
    run_dir = storage / "fsdp"
    assert sorted(read_state(d)["step"] for d in checkpoint_dirs(run_dir)) == [2, 4]
    assert read_state(run_dir / "checkpoint_000004")["samples"] == 4 * 2 * 2
    assert read_state(run_dir / "checkpoint_000004")["world"] == 2
    exported = load_model(str(run_dir / "export"), dtype="float32")
    trained, base = _weights(run_dir / "export"), _weights(tiny_path)
    assert not torch.equal(base["model.layers.0.mlp.up_proj.weight"], trained["model.layers.0.mlp.up_proj.weight"])
    assert exported.sat.recipe["strategy"] == "fsdp" and "storage_path" not in exported.sat.recipe
    _assert_lossless(exported)


@pytest.mark.slow
def test_fsdp_adapter_training_keeps_the_base_resumes_and_exports(ray_cluster, tiny_path, tmp_path_factory):
    """strategy=fsdp with train=sat_adapter on 2 workers: the exported base is bit-identical,
    a later run resumes the sharded checkpoint and exports an artifact that decodes losslessly."""
    storage = tmp_path_factory.mktemp("runs")
    adapter_args = ("--strategy", "fsdp", "--train", "sat_adapter", "--adapter-rank", "4", "--lr", "1e-2",
                    "--poisson-lambda", "6", "--eval-every", "0")
    assert _run(tiny_path, storage, "first", *adapter_args, "--max-steps", "2") == 0
    base, exported = _weights(tiny_path), _weights(storage / "first" / "export")
    for key in base:
        if key not in ("model.embed_tokens.weight", "lm_head.weight"):  # these grew by the SAT rows
            assert torch.equal(exported[key], base[key]), key
    assert _run(tiny_path, storage, "second", *adapter_args, "--max-steps", "4", "--export-format", "artifact",
                "--resume-from", str(storage / "first")) == 0
    assert sorted(read_state(d)["step"] for d in checkpoint_dirs(storage / "second")) == [4]
    artifact = storage / "second" / "export"
    assert sorted(p.name for p in artifact.iterdir()) == ["sdsat_adapter.safetensors", "sdsat_config.json"]
    first_adapter = load_file(os.path.join(storage / "first" / "export", "sdsat_adapter.safetensors"))
    second_adapter = load_file(os.path.join(artifact, "sdsat_adapter.safetensors"))
    assert any(not torch.equal(first_adapter[k], second_adapter[k]) for k in first_adapter)  # it trained on
    loaded = load_model(str(artifact), dtype="float32")
    reference = load_model(tiny_path, dtype="float32", add_sat=K)
    _assert_lossless(loaded, reference)


@pytest.mark.slow
def test_a_uri_storage_path_keeps_checkpoints_and_export_there(ray_cluster, tiny_path, tmp_path_factory):
    """storage_path as a URI (file://, the same pyarrow path s3:// and gs:// take): Ray Train
    writes the checkpoints there, and the export and the training curve are copied up beside them."""
    storage = tmp_path_factory.mktemp("bucket")
    args = ["--model", tiny_path, "--storage-path", f"file://{storage}", "--name", "uri", *RUN,
            "--max-steps", "2", "--eval-every", "0", "--distill-max-new-tokens", "6", "--distill-prompt-len", "8",
            "--distill-rows", "4"]  # self-distillation as Ray tasks first
    assert main(args) == 0
    assert sorted(read_state(d)["step"] for d in checkpoint_dirs(storage / "uri")) == [2]
    exported = load_model(str(storage / "uri" / "export"), dtype="float32")
    assert exported.sat.num_sat_trained == K
    assert (storage / "uri" / "training_curve.png").stat().st_size > 0 and (storage / "uri" / "metrics.jsonl").exists()
