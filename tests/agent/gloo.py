"""A gloo process group for the spawned ranks of the distributed tests."""

from __future__ import annotations

import contextlib

import torch.distributed as dist


@contextlib.contextmanager
def gloo_group(rank: int, world: int, init_file: str):
    """``init_process_group`` on CPU (gloo) for the block, then ``destroy_process_group``. A block
    that completes ends with a barrier, so both ranks are done with every collective before either
    tears gloo down: a rank that destroys the group while its peer still holds pending work aborts
    the peer ("terminate called without an active exception", seen under load with FSDP and
    DDP). A block that raises skips the barrier, which would wait for the failed rank forever."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()
