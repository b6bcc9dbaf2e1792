"""Waiting ranks: under torchrun, rank 0 runs check, data, scores, select, subset and export alone.
The other ranks wait for its marker file, not in a collective, so a rank-0 stage may outlast the
process group's timeout (two gloo processes, a 2 s collective timeout, a 5 s rank-0 stage)."""
from __future__ import annotations

import time

import pytest
import torch.distributed as dist
from torch.multiprocessing import ProcessRaisedException

from icons.distributed import spawn
from icons.pipeline.runner import run_stage


def _slow_rank0_stage(rank: int, world: int, tmp, mode: str) -> None:
    def stage():
        time.sleep(5)
        if mode == "fail":
            raise ValueError("bad input in the pool")
        return "done"

    if mode == "barrier":  # what a collective wait does: the other rank's barrier times out
        if rank == 0:
            time.sleep(5)
        dist.barrier()
        return
    try:
        out = run_stage(stage, False, rank, world, tmp / "marker", "stage check", 1.0 if mode == "short_wait" else 60.0)
    except (ValueError, RuntimeError) as err:  # kept for the test to read (mp.spawn reports one process only)
        (tmp / f"error-{rank}").write_text(str(err))
        return
    assert out == ("done" if rank == 0 else None)
    if mode == "ok":
        dist.barrier()  # the group still works afterwards
    (tmp / f"finished-{rank}").write_text("ok")


def test_a_rank0_stage_longer_than_the_collective_timeout_finishes(tmp_path):
    spawn(_slow_rank0_stage, 2, (tmp_path, "ok"), threads=1, timeout_s=2)
    assert sorted(p.name for p in tmp_path.glob("finished-*")) == ["finished-0", "finished-1"]


def test_the_same_wait_in_a_collective_times_out(tmp_path):
    with pytest.raises(ProcessRaisedException):
        spawn(_slow_rank0_stage, 2, (tmp_path, "barrier"), threads=1, timeout_s=2)


@pytest.mark.parametrize("mode,message", [("fail", "rank 0 failed in stage check (ValueError: bad input in the pool)"),
                                          ("short_wait", "waited 1s for rank 0 to finish stage check")])
def test_waiting_ranks_stop_with_one_line_when_rank0_fails_or_the_wait_is_too_long(tmp_path, mode, message):
    spawn(_slow_rank0_stage, 2, (tmp_path, mode), threads=1, timeout_s=30)
    got = (tmp_path / "error-1").read_text()
    assert message in got and "\n" not in got
