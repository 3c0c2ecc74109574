"""FSDP with the units of `trainer=fsdp` over two CPU processes (gloo), outside Lightning, which runs FSDP on GPUs
only: the generator's loss, gradient norm and preview samples equal an unwrapped copy's although every unit is
sharded (tests/fsdp_worker.py).

Both paths reach the head and the blocks through more than a unit's `forward` unless the code routes them: the
training loss goes through the head's `forward`, previews run inside `callbacks.full_weights`.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .test_distributed import ENVIRONMENT, ROOT


def test_a_sharded_generator_trains_and_previews_like_an_unwrapped_one(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "tests" / "fsdp_worker.py"), str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**ENVIRONMENT, "PYTHONPATH": str(ROOT / "src")},
    )
    written = sorted(path.name for path in tmp_path.glob("rank*.json"))
    assert result.returncode == 0, f"records written: {written}\n" + (result.stdout + result.stderr)[-3000:]
    for rank in range(2):
        records = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert sorted(records) == ["linear/False", "linear/True", "mbm/False", "mbm/True"]
        for case, record in records.items():
            assert record["local_numel"] <= record["full_numel"] // 2 + 64, case  # each process holds half
            assert record["loss"] == pytest.approx(record["reference_loss"], rel=1e-6), case
            assert record["gradient_norm"] == pytest.approx(record["reference_gradient_norm"], rel=1e-5), case
            assert record["previews"] == [record["reference_preview"]] * 2, case
            assert record["units_restored"], case
