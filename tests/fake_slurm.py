"""A fake SLURM on this machine: ``sbatch``, ``srun`` and ``sacct`` as submitit (Hydra's submitit launcher) uses them.

``FakeSlurm(folder)`` writes one small wrapper per command into ``folder/bin``; put that first on PATH. Every call
is appended to ``folder/calls.jsonl``. ``sbatch <script>`` keeps a copy of the script (as SLURM does) in
``folder/jobs/<job id>/``, prints ``Submitted batch job <id>`` as the real one does and runs the job in the
background: each array task in turn, the script under bash with the SLURM_* variables a batch job sees and its
output where ``#SBATCH --output/--error`` say. ``srun`` starts ``SLURM_NTASKS`` copies of its command, each with its
rank, and writes their output where its ``--output``/``--error`` say. ``sacct --parsable2`` reports each job's state:
PENDING, RUNNING, then COMPLETED or FAILED from the batch script's exit status. ``scancel --signal=SIG <id>`` sends the
signal to the job's tasks. Cancelling, ``scontrol``, ``squeue`` and ``sinfo`` are recorded and fail, so a test sees
when they would be needed.

After ``refuse(message)``, ``sbatch`` keeps the script and then fails as sbatch does when SLURM rejects a job.
One node only: a script asking for several is rejected. Time limits are not enforced, and the warning signal of
``#SBATCH --signal`` is sent only when a test asks for it with ``scancel --signal``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

COMMANDS = ("sbatch", "srun", "sacct", "scancel", "scontrol", "squeue", "sinfo")
FIRST_JOB_ID = 1000
SBATCH_LINE = re.compile(r"^#SBATCH\s+--([\w-]+)(?:=(.*))?$", re.M)


@dataclass(frozen=True)
class Submission:
    """One ``sbatch`` call: its job id, its arguments, the script it was given and that script's #SBATCH options."""

    job_id: str
    argv: list[str]
    script: str
    options: dict[str, str]

    @property
    def command(self) -> list[str]:
        """The script's last command line (submitit's ``srun ... python -m submitit.core._submit <folder>``)."""
        lines = [line for line in self.script.splitlines() if line.strip() and not line.startswith("#")]
        return shlex.split(lines[-1])


class FakeSlurm:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.bin = folder / "bin"
        self.bin.mkdir(parents=True)
        (folder / "jobs").mkdir()
        for name in COMMANDS:
            wrapper = self.bin / name
            program = shlex.join([sys.executable, __file__, name, str(folder)])
            wrapper.write_text(f'#!/bin/sh\nexec {program} "$@"\n')
            wrapper.chmod(0o755)

    def refuse(self, message: str) -> None:
        (self.folder / "refuse").write_text(message)

    def calls(self) -> list[tuple[str, list[str]]]:
        """Every call, in order: the command's name and its arguments."""
        log = self.folder / "calls.jsonl"
        calls = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
        return [(call["command"], call["argv"]) for call in calls]

    def states(self, job_id: str) -> dict[str, str]:
        """What sacct reports for the job: the state of the job, or of each of its array tasks (``<id>_<task>``)."""
        return _states(self.folder, job_id)

    def submissions(self) -> list[Submission]:
        jobs = sorted((self.folder / "jobs").iterdir(), key=lambda job: int(job.name))
        return [
            Submission(
                job.name, json.loads((job / "argv.json").read_text()), (job / "script.sh").read_text(), _options(job)
            )
            for job in jobs
        ]

    def stop(self) -> None:
        """End the jobs still running (a failed test's), by the process group each job runner leads; sacct then
        reports them CANCELLED, so a launcher still waiting for them stops waiting."""
        for pid_file in (self.folder / "jobs").glob("*/runner.pid"):
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.killpg(int(pid_file.read_text()), signal.SIGTERM)
            for label, state in _states(self.folder, pid_file.parent.name).items():
                if state in ("PENDING", "RUNNING"):
                    _write_state(pid_file.parent, label, "CANCELLED")


def _states(folder: Path, job_id: str) -> dict[str, str]:
    return {state.stem: state.read_text() for state in (folder / "jobs" / job_id).glob("*.state")}


def _options(job: Path) -> dict[str, str]:
    return json.loads((job / "options.json").read_text())


def _script_options(script: str, argv: list[str]) -> dict[str, str]:
    """The #SBATCH options of the script, then those on the command line (which win), values unquoted."""
    options = {key: shlex.split(value)[0] if value else "" for key, value in SBATCH_LINE.findall(script)}
    for arg in argv:
        if arg.startswith("--"):
            key, _, value = arg[2:].partition("=")
            options[key] = value
    return options


def _array_tasks(spec: str) -> list[int]:
    """``0-14%10`` or ``1,3,5-7``: the task indices (the ``%`` limit is moot, tasks run one after another here)."""
    tasks: list[int] = []
    for part in spec.split("%")[0].split(","):
        low, _, high = part.partition("-")
        tasks += range(int(low), int(high or low) + 1)
    return tasks


def _write_state(job: Path, label: str, state: str) -> None:
    tmp = job / f"{label}.state-new"
    tmp.write_text(state)
    tmp.replace(job / f"{label}.state")


def _job_label() -> str:
    """The job as sacct and scancel name it: ``<id>``, or ``<array job id>_<task>`` for an array task."""
    env = os.environ
    return (
        f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
        if "SLURM_ARRAY_JOB_ID" in env
        else env["SLURM_JOB_ID"]
    )


def _expand(pattern: str, rank: int | None = None) -> str:
    """SLURM's filename patterns: %A array job id, %a task index, %j job id, %t task rank, %% a percent sign."""
    env = os.environ
    values = {
        "A": env.get("SLURM_ARRAY_JOB_ID", env["SLURM_JOB_ID"]),
        "a": env.get("SLURM_ARRAY_TASK_ID", "4294967294"),
        "j": env["SLURM_JOB_ID"],
        "t": str(rank or 0),
        "%": "%",
    }
    return re.sub(r"%([Aajt%])", lambda m: values[m.group(1)], pattern)


def sbatch(folder: Path, argv: list[str]) -> int:
    *flags, script_path = argv
    script = Path(script_path).read_text()
    options = _script_options(script, flags)
    counter = folder / "next_job_id"
    job_id = int(counter.read_text()) if counter.is_file() else FIRST_JOB_ID
    tasks = _array_tasks(options["array"]) if "array" in options else []
    counter.write_text(str(job_id + 1 + len(tasks)))  # array tasks get job ids of their own, as on SLURM
    job = folder / "jobs" / str(job_id)
    job.mkdir()
    (job / "argv.json").write_text(json.dumps(argv))
    (job / "script.sh").write_text(script)
    (job / "options.json").write_text(json.dumps(options))
    if (folder / "refuse").is_file():
        print(f"sbatch: error: {(folder / 'refuse').read_text()}", file=sys.stderr)
        return 1
    if int(options.get("nodes", "1")) != 1:
        print("sbatch: error: the fake SLURM has one node", file=sys.stderr)
        return 1
    for label in [f"{job_id}_{task}" for task in tasks] or [str(job_id)]:
        _write_state(job, label, "PENDING")
    runner = subprocess.Popen(  # detached: submitit reads sbatch's output to its end before it moves the job's pickle
        [sys.executable, __file__, "run-job", str(folder), str(job_id)],
        stdin=subprocess.DEVNULL,
        stdout=(job / "runner.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    (job / "runner.pid").write_text(str(runner.pid))
    print(f"Submitted batch job {job_id}")
    return 0


def run_job(folder: Path, argv: list[str]) -> int:
    """The batch job: the script once per array task (or once), as SLURM would on one node."""
    job = folder / "jobs" / argv[0]
    options = _options(job)
    tasks_per_node = int(options.get("ntasks-per-node", "1"))
    host = socket.gethostname()
    base = {
        "SLURM_JOB_NAME": options.get("job-name", "sbatch"),
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_NNODES": "1",
        "SLURM_JOB_NODELIST": host,
        "SLURM_NODELIST": host,
        "SLURM_NODEID": "0",
        "SLURM_NTASKS": str(tasks_per_node),
        "SLURM_NPROCS": str(tasks_per_node),
        "SLURM_NTASKS_PER_NODE": str(tasks_per_node),
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_SUBMIT_DIR": os.getcwd(),
        "SLURM_SUBMIT_HOST": host,
    }
    for key, variable in (("partition", "SLURM_JOB_PARTITION"), ("cpus-per-task", "SLURM_CPUS_PER_TASK")):
        if key in options:
            base[variable] = options[key]
    tasks = _array_tasks(options["array"]) if "array" in options else [None]
    try:
        for n, task in enumerate(tasks):
            env = {**os.environ, **base, "SLURM_JOB_ID": argv[0], "SLURM_JOBID": argv[0]}
            label = argv[0]
            if task is not None:
                own_id = str(int(argv[0]) + 1 + n)
                env |= {"SLURM_JOB_ID": own_id, "SLURM_JOBID": own_id, "SLURM_ARRAY_JOB_ID": argv[0]}
                env |= {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_COUNT": str(len(tasks))}
                label = f"{argv[0]}_{task}"
            os.environ.update(env)  # for _expand
            out = open(_expand(options["output"]), "a") if "output" in options else subprocess.DEVNULL  # noqa: SIM115
            err = open(_expand(options["error"]), "a") if "error" in options else subprocess.STDOUT  # noqa: SIM115
            _write_state(job, label, "RUNNING")
            status = subprocess.run(["bash", str(job / "script.sh")], env=env, stdout=out, stderr=err).returncode
            _write_state(job, label, "COMPLETED" if status == 0 else "FAILED")
    finally:
        (job / "runner.pid").unlink()
    return 0


def srun(folder: Path, argv: list[str]) -> int:
    """``srun [options] command...``: one copy of the command per task of the job, each with its rank."""
    valued = {"--output": "output", "-o": "output", "--error": "error", "-e": "error"}
    files: dict[str, str] = {}
    while argv and argv[0].startswith("-"):
        option = argv.pop(0)
        if option in valued:
            files[valued[option]] = argv.pop(0)
        elif option.split("=", 1)[0] in valued:
            files[valued[option.split("=", 1)[0]]] = option.split("=", 1)[1]
        elif option not in ("--unbuffered", "-u"):
            print(f"srun: the fake srun does not know {option}", file=sys.stderr)
            return 1
    env = os.environ
    steps = folder / "jobs" / env.get("SLURM_ARRAY_JOB_ID", env["SLURM_JOB_ID"]) / "steps"
    steps.mkdir(exist_ok=True)
    label = _job_label()
    processes = []
    for rank in range(int(env.get("SLURM_NTASKS", "1"))):
        task_env = {**env, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_STEP_ID": "0"}
        out = open(_expand(files["output"], rank), "a") if "output" in files else None  # noqa: SIM115
        err = open(_expand(files["error"], rank), "a") if "error" in files else None  # noqa: SIM115
        process = subprocess.Popen(argv, env=task_env, stdout=out, stderr=err or (out and subprocess.STDOUT))
        (steps / f"{label}.{process.pid}").touch()  # where scancel --signal finds the job's tasks
        processes.append(process)
    status = max(process.wait() for process in processes)
    for process in processes:
        (steps / f"{label}.{process.pid}").unlink()
    return status


def scancel(folder: Path, argv: list[str]) -> int:
    """``scancel --signal=SIG <job id>`` (or ``-s SIG``): the signal to the tasks of the job's steps (not to the
    batch shell), as SLURM sends it; submitit itself simulates a time-out this way. Cancelling is not provided."""
    name, job_ids, args = None, [], iter(argv)
    for arg in args:
        if arg in ("--signal", "-s"):
            name = next(args, None)
        elif arg.startswith("--signal="):
            name = arg.split("=", 1)[1]
        elif not arg.startswith("-"):
            job_ids.append(arg)
    if name is None:
        print("scancel: the fake scancel only sends signals (--signal)", file=sys.stderr)
        return 1
    number = getattr(signal, name if name.startswith("SIG") else f"SIG{name}")
    for job_id in job_ids:
        for step in (folder / "jobs" / job_id.split("_")[0] / "steps").glob("*.*"):
            label, pid = step.name.rsplit(".", 1)
            if job_id in (label, label.split("_")[0]):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), number)
    return 0


def sacct(folder: Path, argv: list[str]) -> int:
    """``sacct -o JobID,State,NodeList --parsable2 -j <id> ...``: a header, then one line per job or array task."""
    fields, ids, args = ["JobID", "State"], [], iter(argv)
    for arg in args:
        if arg in ("-o", "--format"):
            fields = next(args, "").split(",")
        elif arg.startswith("--format="):
            fields = arg.split("=", 1)[1].split(",")
        elif arg in ("-j", "--jobs"):
            ids += next(args, "").split(",")
    if "--parsable2" not in argv and "-P" not in argv:
        print("sacct: the fake sacct only prints --parsable2", file=sys.stderr)
        return 1
    print("|".join(fields))
    for job_id in ids:
        for label, state in sorted(_states(folder, job_id).items()):
            values = {"JobID": label, "State": state, "NodeList": socket.gethostname()}
            print("|".join(values.get(field, "") for field in fields))
    return 0


def main() -> int:
    command, folder, *argv = sys.argv[1:]
    folder = Path(folder)
    if command == "run-job":
        return run_job(folder, argv)
    with (folder / "calls.jsonl").open("a") as log:
        log.write(json.dumps({"command": command, "argv": argv}) + "\n")
    programs = {"sbatch": sbatch, "srun": srun, "sacct": sacct, "scancel": scancel}
    if command not in programs:
        print(f"{command}: not provided by the fake SLURM (called with {shlex.join(argv)})", file=sys.stderr)
        return 1
    return programs[command](folder, argv)


if __name__ == "__main__":
    sys.exit(main())
