"""The optimizer tests run many tiny tensor ops: one intra-op thread is fastest for them (and
does not fight other jobs for the cores). Restored after each test."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
