"""Shared test settings: deterministic CPU execution and the fixture folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures" / "upstream"


@pytest.fixture(autouse=True)
def _deterministic_cpu():
    # Parity with the recorded tensors needs one thread and deterministic kernels.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(threads)
