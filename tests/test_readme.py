"""Every shell command in README.md still works as written.

Each command of the README's ``bash`` blocks is either run on the CPU with tiny settings appended, from
one fresh working folder and with no ``paths.*`` override (training, sweeps, the demo, the report, the
data tools), or, where it needs a GPU, SLURM, the network or a dataset that is not here, composed as the
entry point would compose it. Placeholders (``<run>``, ``<time>_<token>``, ``$CKPT``, ``my_lesions/``)
stand for what the earlier commands left in the working folder. A command this module cannot place
fails the test, so a new README command needs a way to be checked.
"""

from __future__ import annotations

import itertools
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

from skinlesion.cli import check_group_choices
from skinlesion.config import CONFIG_DIR
from skinlesion.data.download import OPTIONS as DOWNLOAD_OPTIONS
from skinlesion.evaluate import evaluate
from skinlesion.explain import explain
from skinlesion.export import export
from skinlesion.predict import predict

from conftest import REPO_ROOT, USER_TINY, run_user

TOOLS: dict[str, Callable] = {"evaluate": evaluate, "explain": explain, "export": export, "predict": predict}
# Needs what a CPU test machine lacks (a GPU, SLURM, the hub, the ISIC archives): composed, not run. (The SLURM
# sweep also runs against a fake SLURM in test_slurm_submission.py.)
COMPOSE_ONLY = ("hydra/launcher=", "trainer=ddp", "data=isic2018", "/data/ISIC2018", "model.weights=/path")


def readme_commands() -> list[str]:
    """The README's shell commands, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (REPO_ROOT / "README.md").read_text(), re.S):
        current = ""
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line) if not line.lstrip().startswith("#") else ""
            if not line.strip():
                continue
            if line.endswith("\\"):
                current += line[:-1] + " "
                continue
            commands.append(" ".join((current + line).split()))
            current = ""
    return commands


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """The jobs of a multirun: one override list per combination of comma-separated values."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = [
        [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override() else [o.input_line]
        for o in parsed
    ]
    return [list(job) for job in itertools.product(*choices)]


def compose_command(config: str, overrides: list[str]) -> None:
    """What the entry point composes: group choices checked, every job of a sweep composed with Hydra's config."""
    check_group_choices(overrides)
    for job in expand_sweep([o for o in overrides if o not in ("-m", "--multirun")]):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name=config, overrides=job, return_hydra_config=True)
        for launcher in ("slurm", "submitit_local"):
            if f"hydra/launcher={launcher}" in job:
                assert "submitit" in cfg.hydra.launcher._target_.lower(), cfg.hydra.launcher._target_


class Workspace:
    """One empty working folder where the README's commands run in order, and what they leave there."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.variables: dict[str, str] = {}
        self.tiny_images = folder / "my_lesions"

    def run(self, *command: str) -> subprocess.CompletedProcess:
        result = run_user(self.folder, *command)
        assert result.returncode == 0, f"{shlex.join(command)}\n{result.stderr[-3000:]}"
        return result

    def newest(self, pattern: str) -> Path:
        found = sorted(self.folder.glob(pattern), key=lambda p: p.stat().st_mtime)
        assert found, f"nothing matches {pattern} in {self.folder}"
        return found[-1]

    def substitute(self, text: str) -> str:
        for name, value in self.variables.items():
            text = text.replace(f"${name}", value)
        if "<run>" in text or "ckpt_path=..." in text:
            run = self.newest("outputs/train/runs/*/checkpoints/best.ckpt").parent.parent
            text = text.replace("outputs/train/runs/<run>", str(run))
            text = text.replace("ckpt_path=...", f"ckpt_path={run / 'checkpoints' / 'best.ckpt'}")
        if "outputs/benchmark/multiruns/<" in text:
            sweep = self.newest("outputs/benchmark/multiruns/*/summary.md").parent
            text = re.sub(r"outputs/benchmark/multiruns/<[^/\s]*>", str(sweep), text)
        if "runA/" in text:
            jobs = sorted(self.newest("outputs/benchmark/multiruns/*/summary.md").parent.glob("*_seed*"))
            text = text.replace("runA/", f"{jobs[0]}/").replace("runB/", f"{jobs[1]}/")
        if "my_lesions/" in text and not self.tiny_images.exists():
            images = sorted(self.folder.glob("data/synthetic/*/HAM10000_images_part_1/*.jpg"))[:3]
            self.tiny_images.mkdir()
            for image in images:
                shutil.copy(image, self.tiny_images)
        if "/data/HAM10000" in text:
            text = text.replace("/data/HAM10000", str(self.newest("data/synthetic/*/HAM10000_metadata.csv").parent))
        return text.replace("/tmp/syn", str(self.folder / "syn")).replace("model=...", "model=mobilenetv2")

    def make_recipe(self, target: str, variables: dict[str, str]) -> list[str]:
        """The command ``make <target>`` runs (dry run), with the project's venv python as this one."""
        settings = [f"{k}={v}" for k, v in variables.items()]
        dry = subprocess.run(
            ["make", "-s", "-n", "-C", str(REPO_ROOT), target, *settings], capture_output=True, text=True
        )
        assert dry.returncode == 0, dry.stderr
        (line,) = [line for line in dry.stdout.splitlines() if " -m skinlesion." in line]
        return ["python", *shlex.split(line)[1:]]

    def check(self, command: str) -> None:
        words = shlex.split(self.substitute(command))
        if "=" in words[0] and len(words) == 1:  # CKPT=...
            name, value = words[0].split("=", 1)
            self.variables[name] = value
        elif words[0] == "make":
            self.check_make(words[1], dict(w.split("=", 1) for w in words[2:]))
        elif words[:2] == ["python", "-m"]:
            self.check_module(words[2], words[3:])
        else:
            pytest.fail(f"README command not understood by tests/test_readme.py: {command}")

    def check_make(self, target: str, variables: dict[str, str]) -> None:
        if target == "demo":
            self.run(*self.make_recipe("demo", variables), *USER_TINY)
        elif target == "sweep" and "experiment=benchmark" in variables.get("ARGS", ""):
            # One backbone over the three seeds, really run: the later report and ensemble commands read it.
            self.run(*self.make_recipe("sweep", {**variables, "MODELS": "mobilenetv2"}), *USER_TINY)
        elif target == "sweep":
            compose_command("train", self.make_recipe("sweep", variables)[3:])
        else:  # test, lint, bench, ...: the target exists and its recipe expands (running it here would recurse)
            dry = subprocess.run(["make", "-s", "-n", "-C", str(REPO_ROOT), target], capture_output=True, text=True)
            assert dry.returncode == 0, dry.stderr

    def check_module(self, module: str, args: list[str]) -> None:
        tool = module.removeprefix("skinlesion.")
        if tool == "train":
            runs = "model.pretrained=false" in args or any(a.startswith("ckpt_path=") for a in args)
            if runs and not any(marker in a for a in args for marker in COMPOSE_ONLY):
                self.run("python", "-m", module, *args, *([] if "ckpt_path" in str(args) else USER_TINY))
            else:
                compose_command("train", args)
        elif tool in TOOLS:
            if any(marker in a for a in args for marker in COMPOSE_ONLY):
                compose_command(tool, args)
                return
            out = (
                self.folder / "outputs" / tool / "readme" / str(len(list(self.folder.glob(f"outputs/{tool}/readme/*"))))
            )
            GlobalHydra.instance().clear()
            with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
                cfg = compose(config_name=tool, overrides=[*args, f"paths.output_dir={out}"])
            TOOLS[tool](cfg)
        elif tool == "report":
            self.run("python", "-m", module, *args)
        elif tool == "data.check":
            self.run("python", "-m", module, *args, "data.num_workers=0")
        elif tool == "data.synthetic":
            self.run("python", "-m", module, *args, "n_images=60", "width=120", "height=90")
        elif tool == "data.download":  # needs the network: the options exist and --help answers
            assert {a.split("=", 1)[0] for a in args} <= DOWNLOAD_OPTIONS
            self.run("python", "-m", module, "--help")
        else:
            pytest.fail(f"README runs an unknown module: {module}")


def test_the_readme_lists_the_commands_users_start_with() -> None:
    commands = readme_commands()
    assert "make demo" in commands and "make test" in commands
    assert any(c.startswith("python -m skinlesion.train -m model=") for c in commands)


def test_every_readme_command_works_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the in-process tools resolve their paths from the working folder, as users' do
    monkeypatch.delenv("SKINLESION_HOME", raising=False)
    workspace = Workspace(tmp_path)
    commands = readme_commands()
    # The commands that need a trained run come after the run that makes one.
    first = [c for c in commands if c == "python -m skinlesion.train model.pretrained=false"]
    assert first, "README no longer trains from scratch offline"
    for command in first + [c for c in commands if c not in first]:
        workspace.check(command)
