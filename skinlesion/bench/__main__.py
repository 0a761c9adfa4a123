"""python -m skinlesion.bench {data,train,overhead,stages,all,paired} [options]: speed is measured, not
asserted; ``paired`` measures an option's effect on a metric against a reference run."""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys

import torch

from skinlesion import cli
from skinlesion.errors import SkinLesionError

SUITES = {
    "data": "skinlesion.bench.data",  # DataLoader images/s: decoded-image cache vs decode-per-epoch
    "train": "skinlesion.bench.training",  # train-step images/s per backbone, AMP / channels_last
    "overhead": "skinlesion.bench.overhead",  # Lightning Trainer vs a plain PyTorch loop
    "stages": "skinlesion.bench.stages",  # train-step images/s per stage; what a frozen backbone could save
}
MEASURES = {"paired": "skinlesion.bench.paired"}  # not in "all": it compares runs the user names


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_cores": torch.get_num_threads()}
    info["platform"] = platform.platform()
    info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m skinlesion.bench", description=__doc__)
    parser.add_argument("suite", choices=[*SUITES, "all", *MEASURES])
    parser.add_argument("--json", help="also write the results to this JSON file")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    names = list(SUITES) if args.suite == "all" else [args.suite]
    results = {"machine": machine()}
    print(json.dumps(results["machine"]))
    for name in names:
        try:
            results[name] = importlib.import_module({**SUITES, **MEASURES}[name]).main(rest)
        except SkinLesionError as err:
            cli.fail(str(err))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
