"""`bar_lightning.distributed.join_torchrun_process_group`, the process group of evaluate.py and pretokenization
under torchrun: the backend and device each process binds, and the group's end at exit (a group left to
interpreter shutdown can abort a process whose work is done)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch

from bar_lightning import distributed

from .test_distributed import ENVIRONMENT, ROOT

WORKER = textwrap.dedent(
    """
    import atexit, json, sys
    import torch
    from bar_lightning.distributed import join_torchrun_process_group

    folder = sys.argv[1]
    state = {}
    # Registered first, so it runs after the helper's exit handler (atexit runs handlers last-in, first-out).
    atexit.register(lambda: open(f"{folder}/rank{state['rank']}.json", "w").write(json.dumps(
        {**state, "initialized_after_exit_handlers": torch.distributed.is_initialized()})))
    rank, world_size = join_torchrun_process_group()
    total = torch.tensor([float(rank + 1)])
    torch.distributed.all_reduce(total)
    state.update(rank=rank, world_size=world_size, backend=torch.distributed.get_backend(), total=total.item())
    """
)


def test_two_processes_join_one_gloo_group_and_leave_it_at_exit(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**ENVIRONMENT, "PYTHONPATH": str(ROOT / "src")},
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    for rank in range(2):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert record == {"rank": rank, "world_size": 2, "backend": "gloo", "total": 3.0,
                          "initialized_after_exit_handlers": False}


def test_a_single_process_joins_no_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.join_torchrun_process_group() == (0, 1)
    assert not torch.distributed.is_initialized()


def test_on_gpus_each_process_binds_nccl_to_the_gpu_of_its_local_rank(monkeypatch):
    calls = []
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda **kwargs: calls.append(("init_process_group", kwargs)))
    monkeypatch.setattr(distributed.atexit, "register", lambda function: calls.append(("atexit", function)))
    assert distributed.join_torchrun_process_group() == (5, 8)
    gpu = torch.device("cuda", 1)
    assert calls == [("set_device", gpu), ("init_process_group", {"backend": "nccl", "device_id": gpu}),
                     ("atexit", distributed.leave_process_group)]
