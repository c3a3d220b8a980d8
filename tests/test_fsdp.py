"""FSDP on CPU (gloo, 2 processes, a tiny random model): meta-device init with rank 0's
broadcast load equals a plain load, and sharded training steps, checkpoints and the
streamed export work in full and adapter mode. The Ray path runs in tests/test_finetune.py."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.test_finetune_config import save_tiny_checkpoint
from tests.test_training_loop import loop_config, token_rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn, *args, world: int = 2) -> None:
    mp.spawn(_run, args=(world, _free_port(), fn, args), nprocs=world, join=True)


def _compare_meta_load(rank: int, model: str, tmp: str, train: str) -> None:
    from sdsat.training.fsdp import build_sharded
    from sdsat.training.setup import build_model, select_trainable

    cfg = loop_config(model, Path(tmp), strategy="fsdp", train=train)["cfg"]
    torch.manual_seed(0)
    _, module, _ = build_sharded(cfg, rank, torch.device("cpu"))
    sharded = {name: p.full_tensor() for name, p in module.named_parameters()}
    if rank == 0:
        assert all(p.device.type == "cpu" and p.to_local().numel() < p.numel() or p.numel() < 2 for p in module.parameters())
        torch.manual_seed(0)
        plain = build_model(cfg)
        select_trainable(plain.model, plain.sat.ids_for(cfg["num_sat"]), cfg, cast_frozen=False)
        expected = {f"model.{k}": v for k, v in plain.model.named_parameters()}
        assert sharded.keys() == expected.keys()
        for name in expected:
            if not name.endswith(".a"):  # an adapter's A is a random draw of rank 0 (B starts at 0)
                assert torch.equal(sharded[name], expected[name]), name
        buffers = dict(module.named_buffers())
        for name, b in plain.model.named_buffers():
            assert torch.equal(buffers[f"model.{name}"], b), name


@pytest.mark.slow
@pytest.mark.parametrize("train", ["full", "sat_adapter"])
def test_meta_init_and_rank0_broadcast_load_equal_a_plain_load(tmp_path, train):
    spawn(_compare_meta_load, save_tiny_checkpoint(tmp_path / "base"), str(tmp_path), train)
