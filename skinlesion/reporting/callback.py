"""The Hydra callback that writes a training sweep's report when the sweep ends.

It lives apart from the ``report`` command because ``conf/train.yaml`` names it
(``hydra.callbacks.report``) and no command module is imported by another module.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from skinlesion import cli
from skinlesion.errors import ConfigError
from skinlesion.reporting.rank import DEFAULT_RANK_BY
from skinlesion.reporting.write import SUMMARY_MD, write_report

log = logging.getLogger(__name__)


class MultirunReport(Callback):
    """Hydra callback (``hydra.callbacks.report`` in conf/train.yaml): the report of a sweep once it ends.

    Hydra calls ``on_multirun_end`` only when no job raised, which is why jobs return NaN on failure
    (:func:`skinlesion.cli.run_task`); the failed ones are handed to :mod:`skinlesion.cli`, which ends the
    command with a non-zero exit status after this report is written.
    """

    def __init__(self, rank_by: str = DEFAULT_RANK_BY, reference: str | None = None) -> None:
        self.rank_by, self.reference = rank_by, reference

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(config.hydra.sweep.dir)
        try:
            report = write_report(folder, self.rank_by, reference=self.reference)
        except ConfigError as err:  # a mistyped reference must not cost the sweep its report
            log.error("%s; pairing with rank 1 instead (python -m skinlesion.report --reference redoes it)", err)
            report = write_report(folder, self.rank_by)
        for _, row in report.failed.iterrows():
            cli.record_failed_job(row["run_dir"], row["error"])
        log.info("comparison report: %s", folder / SUMMARY_MD)
