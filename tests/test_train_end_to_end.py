"""Issue 2: one tiny fit through skinlesion.train writes a complete run folder."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from skinlesion.train import train


def test_tiny_fit_writes_metrics_checkpoints_and_resolved_config(train_cfg, tmp_path: Path) -> None:
    cfg = train_cfg()
    summary = train(cfg)
    run = tmp_path / "run"

    saved = json.loads((run / "metrics.json").read_text())
    assert saved["status"] == "completed"
    assert saved["metrics"] == summary["metrics"]
    for split in ("val", "test"):
        assert 0.0 <= saved["metrics"][f"{split}/balanced_acc"] <= 1.0
    assert (run / "checkpoints" / "best.ckpt").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    resolved = (run / "config.yaml").read_text()
    assert "${" not in resolved and "mobilenetv2_100" in resolved
    history = pd.read_csv(run / "history.csv")
    assert list(history["epoch"]) == [0, 1]
    assert saved["epochs"] == 2
