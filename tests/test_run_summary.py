"""metrics.json is one type: each task writes its own fields, old files read back, and a failure never
replaces a completed run's results."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from skinlesion.runfolder.summary import COMPLETED, EVALUATE, FAILED, FAILURE_FILE, TRAIN, RunSummary
from skinlesion.train import _record_failure


def test_each_task_writes_its_own_fields_and_reads_them_back(tmp_path: Path) -> None:
    trained = RunSummary(TRAIN, COMPLETED, str(tmp_path), backbone="resnet50", metrics={"test/acc": 0.5}, epochs=3)
    saved = json.loads(trained.write().read_text())
    assert saved["task"] == "train" and saved["epochs"] == 3 and "split_check" not in saved and "error" not in saved
    assert RunSummary.read(tmp_path) == trained
    evaluated = RunSummary(EVALUATE, COMPLETED, str(tmp_path / "eval"), split="test", images=7)
    saved = json.loads(evaluated.write().read_text())
    assert saved["images"] == 7 and "epochs" not in saved and "finetune" not in saved


def test_a_failed_run_records_its_error_and_no_results(tmp_path: Path) -> None:
    saved = json.loads(RunSummary(TRAIN, FAILED, str(tmp_path), seed=1, error="DataError: x").write().read_text())
    assert saved == {"task": "train", "status": "failed", "run_dir": str(tmp_path), "backbone": None, "seed": 1,
                     "error": "DataError: x", "traceback": None}  # fmt: skip


def test_a_file_written_before_the_task_key_reads_as_a_training_run(tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "completed", "metrics": None, "extra": 1}))
    summary = RunSummary.read(tmp_path)
    assert summary.task == TRAIN and summary.completed and summary.metrics == {}


def test_a_failure_after_the_run_completed_goes_beside_its_metrics(tmp_path: Path) -> None:
    completed = RunSummary(TRAIN, COMPLETED, str(tmp_path), metrics={"test/acc": 0.5})
    completed.write()
    cfg = OmegaConf.create({"model": {"name": "resnet50"}, "seed": 0})
    _record_failure(tmp_path, cfg, RuntimeError("out of memory"))
    assert RunSummary.read(tmp_path) == completed
    failure = RunSummary.read(tmp_path / FAILURE_FILE)
    assert failure.status == FAILED and failure.error == "RuntimeError: out of memory"
