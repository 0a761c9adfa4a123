"""The README's SLURM sweep reaches submission, as a user types it, with a fake SLURM on PATH.

``tests/fake_slurm.py`` provides ``sbatch``, ``srun``, ``sacct`` and ``scancel --signal``. The fast test runs the
README line as written until ``sbatch`` (which keeps the batch script, then refuses the job) and checks what would
reach the cluster: one job array of the 15 sweep jobs with the preset's ``#SBATCH`` settings. The slow tests let the
fake SLURM run the jobs here, on the CPU: the sweep finishes with its report, and a job warned of its time limit is
reported as the README says and resumes with the README's command.
"""

from __future__ import annotations

import itertools
import json
import os
import pickle
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO_ROOT, USER_TINY, run_user
from fake_slurm import FakeSlurm
from test_readme import readme_commands

# The preset's job cut to what this machine has: no GPU asked for, 2 CPUs, 4 GB.
CPU_JOB = ["hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=2", "hydra.launcher.mem_gb=4"]
BACKBONES = ("resnet50", "densenet121", "mobilenetv2", "efficientnet_b0", "inception_v3")


def readme_slurm_sweep() -> str:
    """The README's SLURM sweep line (the one without trainer=ddp)."""
    prefix = "python -m skinlesion.train -m hydra/launcher=slurm hydra.launcher."
    (line,) = [command for command in readme_commands() if command.startswith(prefix)]
    return line


@pytest.fixture
def slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSlurm]:
    fake = FakeSlurm(tmp_path / "fake-slurm")
    monkeypatch.setenv("PATH", f"{fake.bin}{os.pathsep}{os.environ['PATH']}")
    yield fake
    fake.stop()  # a job still running after a failed test


def submitit_command(sweep: Path, job_folder: str) -> list[str]:
    """The job step submitit puts at the end of its batch script: srun starting submitit's runner on the job."""
    logs = f"{sweep}/.submitit/{job_folder}/{job_folder}_%t_log"
    runner = [sys.executable, "-u", "-m", "submitit.core._submit", f"{sweep}/.submitit/%j"]
    return ["srun", "--unbuffered", "--output", f"{logs}.out", "--error", f"{logs}.err", *runner]


def wait_for(folder: Path, pattern: str, timeout: float = 300) -> Path:
    """The first file matching ``pattern`` under ``folder``, once one exists."""
    deadline = time.monotonic() + timeout
    while not (found := sorted(folder.glob(pattern))):
        assert time.monotonic() < deadline, f"no {pattern} under {folder} after {timeout} s"
        time.sleep(0.5)
    return found[0]


def test_the_readme_slurm_sweep_submits_one_job_array_with_the_preset_settings(
    tmp_path: Path, slurm: FakeSlurm
) -> None:
    as_documented = (
        "python -m skinlesion.train -m hydra/launcher=slurm hydra.launcher.partition=gpu experiment=benchmark "
        f"model={','.join(BACKBONES)} seed=0,1,2"
    )
    assert readme_slurm_sweep() == as_documented
    slurm.refuse("Batch job submission failed: stopped by the test")
    cwd = tmp_path / "work"
    cwd.mkdir()
    result = run_user(cwd, *shlex.split(as_documented))
    assert result.returncode == 1
    assert "sbatch: error: Batch job submission failed: stopped by the test" in result.stderr

    assert [name for name, _ in slurm.calls()] == ["sbatch"]
    (job,) = slurm.submissions()
    (sweep,) = (cwd / "outputs" / "benchmark" / "multiruns").iterdir()
    assert job.argv == [str(next((sweep / ".submitit").glob(".submission_file_*.sh")))]
    assert job.options == {
        "array": "0-14%10",  # the 15 sweep jobs, 10 at a time (array_parallelism)
        "partition": "gpu",  # the README's override
        "gpus-per-node": "1",  # the rest from conf/hydra/launcher/slurm.yaml
        "ntasks-per-node": "1",
        "nodes": "1",
        "cpus-per-task": "8",
        "mem": "48GB",
        "time": "720",
        "job-name": "train",
        "signal": "USR2@120",
        "output": f"{sweep}/.submitit/%A_%a/%A_%a_0_log.out",  # in the sweep folder, which every node must see
        "error": f"{sweep}/.submitit/%A_%a/%A_%a_0_log.err",
        "open-mode": "append",
        "wckey": "submitit",
    }
    assert job.command == submitit_command(sweep, "%A_%a")
    # What each array task would run: one pickled sweep job per backbone and seed, waiting for its job id.
    pickled = [pickle.loads(path.read_bytes()) for path in (sweep / ".submitit").glob("*.pkl")]
    assert sorted(tuple(submission.args[0]) for submission in pickled) == sorted(
        ("experiment=benchmark", f"model={model}", f"seed={seed}")
        for model, seed in itertools.product(BACKBONES, "012")
    )


@pytest.mark.slow
def test_the_readme_slurm_sweep_runs_its_jobs_under_sbatch_and_writes_the_report(
    tmp_path: Path, slurm: FakeSlurm
) -> None:
    # One backbone, two seeds (a job array, as every multi-job sweep is), sized for the CPU and kept on it.
    smaller = {"model": "model=mobilenetv2", "seed": "seed=0,1"}
    command = [smaller.pop(word.split("=")[0], word) for word in shlex.split(readme_slurm_sweep())]
    assert not smaller  # the README line sweeps both
    cwd = tmp_path / "work"
    cwd.mkdir()
    result = run_user(cwd, *command, *USER_TINY, *CPU_JOB, "hydra.launcher.timeout_min=10")
    assert result.returncode == 0, result.stderr[-3000:]

    (job,) = slurm.submissions()
    assert job.options["array"] == "0-1%2"
    assert job.options["partition"] == "gpu" and "gpus-per-node" not in job.options
    assert (job.options["cpus-per-task"], job.options["mem"], job.options["time"]) == ("2", "4GB", "10")
    calls = slurm.calls()
    names = [name for name, _ in calls]
    assert set(names) == {"sbatch", "srun", "sacct"} and names.count("sbatch") == 1
    (sweep,) = (cwd / "outputs" / "benchmark" / "multiruns").iterdir()
    assert [args for name, args in calls if name == "srun"] == [submitit_command(sweep, "%A_%a")[1:]] * 2
    assert all(args[args.index("-j") + 1] == job.job_id for name, args in calls if name == "sacct")  # polled
    assert slurm.states(job.job_id) == {f"{job.job_id}_0": "COMPLETED", f"{job.job_id}_1": "COMPLETED"}

    for seed in (0, 1):
        task = f"{job.job_id}_{seed}"
        log = (sweep / ".submitit" / task / f"{task}_0_log.out").read_text()
        assert f"Starting with JobEnvironment(job_id={task}," in log and "Job completed successfully" in log
        metrics = json.loads((sweep / f"{seed}_mobilenetv2_seed{seed}" / "metrics.json").read_text())
        assert (metrics["status"], metrics["backbone"], metrics["seed"]) == ("completed", "mobilenetv2", seed)
    summary = pd.read_csv(sweep / "summary.csv")
    assert (list(summary["backbone"]), list(summary["runs"]), list(summary["status"])) == (
        ["mobilenetv2"],
        [2],
        ["completed"],
    )
    assert "| mobilenetv2 |" in (sweep / "summary.md").read_text()
    assert sorted(p.name for p in cwd.iterdir()) == ["data", "outputs"]


@pytest.mark.slow
def test_a_slurm_job_stopped_at_its_time_limit_is_reported_and_resumes_as_the_readme_says(
    tmp_path: Path, slurm: FakeSlurm
) -> None:
    """SLURM warns a job ``signal_delay_s`` (120 s) before its time limit (``#SBATCH --signal=USR2@120``);
    submitit, with no time-out retries (``max_num_timeout: 0``), then stops the job. The job records that in its
    metrics.json and the report lists it as failed; the README's resume command finishes it from last.ckpt."""
    smaller = {"model": "model=mobilenetv2", "seed": "seed=0"}
    command = [smaller.pop(word.split("=")[0], word) for word in shlex.split(readme_slurm_sweep())]
    three_epochs = [*(o for o in USER_TINY if not o.startswith("trainer.max_epochs")), "trainer.max_epochs=3"]
    # submitit takes the warning for a time-out (not a preemption, which it would requeue) once the job has run for
    # min(80% of timeout_min, timeout_min - 10 min): with 10 minutes, from its start, as at the end of 12 hours.
    near_the_limit = "hydra.launcher.timeout_min=10"
    cwd = tmp_path / "work"
    cwd.mkdir()
    with ThreadPoolExecutor(1) as pool:
        sweep_run = pool.submit(run_user, cwd, *command, *three_epochs, *CPU_JOB, near_the_limit)
        try:  # after the first epoch wrote last.ckpt, two slower (stage 2) epochs are left: the warning comes in them
            last = wait_for(cwd, "outputs/benchmark/multiruns/*/0_mobilenetv2_seed0/checkpoints/last.ckpt")
            (job,) = slurm.submissions()
            # What SLURM sends 120 s before the limit (and how submitit's own tests fake a time-out).
            subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)
            result = sweep_run.result()
        finally:
            slurm.stop()  # the job, if the test failed before it stopped
    run = last.parent.parent
    timed_out = "UncompletedJobError: Job not requeued because: timed-out too many times."
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"failed: {run}: {timed_out}" in result.stderr.splitlines()
    assert slurm.states(job.job_id) == {job.job_id: "COMPLETED"}  # the job ended on its own, before the limit
    assert "scontrol" not in [name for name, _ in slurm.calls()]  # and was not requeued
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["status"], metrics["error"]) == ("failed", timed_out)
    assert 1 <= len(pd.read_csv(run / "history.csv")) < 3  # stopped early
    summary = pd.read_csv(run.parent / "summary.csv")
    assert (list(summary["status"]), list(summary["error"])) == (["failed"], [timed_out])

    # The README: resume from last.ckpt, then write the report again.
    readme = (REPO_ROOT / "README.md").read_text()
    assert "`python -m skinlesion.train ckpt_path=<sweep>/<job>/checkpoints/last.ckpt`" in readme
    assert "`python -m skinlesion.report <sweep>`" in readme
    resumed = run_user(cwd, "python", "-m", "skinlesion.train", f"ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["status"], metrics["epochs"]) == ("completed", 3)
    report = run_user(cwd, "python", "-m", "skinlesion.report", str(run.parent))
    assert report.returncode == 0, report.stderr[-3000:]
    summary = pd.read_csv(run.parent / "summary.csv")
    assert (list(summary["status"]), list(summary["epochs"])) == (["completed"], [3])
