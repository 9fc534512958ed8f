"""A training job's process (its own session, so the trainer can stop its whole group) does not
outlive a trainer killed without a word: it would hold the GPU for a job the queue re-queues
elsewhere. Real processes: a stand-in trainer starts a runner-like child that starts a worker of
its own; the trainer is SIGKILLed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

TRAINER = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(os.getpid())],
                         start_new_session=True)
time.sleep(60)
"""
JOB = """
import subprocess, sys, time
from atoll.plugins.training.runner import die_with_parent
die_with_parent(int(sys.argv[1]))
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(__import__("os").getpid(), worker.pid, flush=True)
time.sleep(60)
"""


def alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_a_job_and_its_workers_end_when_the_trainer_is_killed() -> None:
    trainer = subprocess.Popen(
        [sys.executable, "-c", TRAINER, JOB], stdout=subprocess.PIPE, text=True
    )
    try:
        assert trainer.stdout is not None
        job, worker = (int(p) for p in trainer.stdout.readline().split())
        time.sleep(1.0)  # a few parent checks: all keep running while the trainer lives
        assert alive(job) and alive(worker)
        os.kill(trainer.pid, signal.SIGKILL)
        trainer.wait()
        deadline = time.monotonic() + 10
        while (alive(job) or alive(worker)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(job) and not alive(worker)
    finally:
        trainer.kill()


def test_a_job_whose_trainer_is_gone_before_it_looks_ends_at_once() -> None:
    job = subprocess.run(
        [sys.executable, "-c", JOB, "1"],  # pid 1 is not its parent
        capture_output=True, text=True, timeout=60, start_new_session=True,
    )  # fmt: skip
    assert job.returncode == -signal.SIGKILL and job.stdout == ""
