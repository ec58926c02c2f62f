"""A gloo process group for the spawned ranks of the distributed tests."""

from __future__ import annotations

import gc
from typing import Callable

import torch.distributed as dist


def in_gloo_group(rank: int, world: int, init_file: str, work: Callable[[], None]) -> None:
    """``work()`` in a gloo process group on CPU, then ``destroy_process_group``.

    ``work`` holds the DDP or FSDP module, the optimizer and the agent as its locals, so they are
    gone (their reference cycles collected) before the group is destroyed: a module that outlived
    ``destroy_process_group`` kept the group and its gloo threads until interpreter shutdown,
    whose teardown aborted the rank ("terminate called without an active exception": 1 of 30
    two-rank DDP runs under load, with or without the agent; none of 80 in this order). A
    ``work`` that completes ends with a barrier, so both ranks are done with every collective
    before either tears gloo down; one that raises skips it (the barrier would wait for the
    failed rank forever)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        work()
        dist.barrier()
    finally:
        gc.collect()
        dist.destroy_process_group()
