"""Options against a reference on the same images: the paired lesion-bootstrap difference of a metric.

    python -m skinlesion.bench paired REFERENCE OTHER [OTHER ...] [--split test] [--metric balanced_acc]

Each argument is a run folder of ``train`` or ``evaluate`` (its ``predictions_<split>.csv``) or such a CSV,
so train-time options (two training runs) and evaluation-time ones (TTA, ensemble selection: two
``evaluate`` folders) are measured the same way. The sweep report pairs training runs by itself
(``--reference``); this is for anything else. Each row is OTHER minus REFERENCE (positive: the option
helps), with the percentile interval over 1,000 resamples of the test lesions drawn once for all rows.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from skinlesion.errors import ConfigError
from skinlesion.inference.predictions import read_predictions
from skinlesion.scoring.bootstrap import BOOTSTRAP_METRICS
from skinlesion.scoring.paired import PairedReference


def predictions_of(path: Path, split: str) -> pd.DataFrame:
    """A folder's ``predictions_<split>.csv`` (or the CSV itself), refused with the reason when absent."""
    path = Path(path)
    csv = path / f"predictions_{split}.csv" if path.is_dir() else path
    frame = read_predictions(csv)
    if frame is None:
        raise ConfigError(f"{csv}: no such predictions file; pass a train or evaluate run folder, or the CSV")
    return frame


def paired_rows(reference: pd.DataFrame, others: dict[str, pd.DataFrame], metric: str) -> list[dict]:
    """OTHER minus REFERENCE for each of ``others`` (name -> predictions), on the reference's images."""
    pairing = PairedReference.of(reference)
    rows = []
    for name, other in others.items():
        difference = pairing.difference(other, metric, reference_first=False)
        if difference is None:
            raise ConfigError(f"{name}: not the reference's images and classes; compare runs on one split")
        rows.append({"run": name, **difference})
    return rows


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="python -m skinlesion.bench paired", description=__doc__)
    parser.add_argument("reference", type=Path)
    parser.add_argument("others", type=Path, nargs="+")
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument("--metric", default="balanced_acc", choices=BOOTSTRAP_METRICS)
    args, _ = parser.parse_known_args(argv)
    reference = predictions_of(args.reference, args.split)
    others = {str(path): predictions_of(path, args.split) for path in args.others}
    rows = paired_rows(reference, others, args.metric)
    print(f"| run | {args.metric} minus the reference's | 95% CI | P(better) |")
    print("|---|---:|---:|---:|")
    for row in rows:
        interval = f"[{row['low']:+.4f}, {row['high']:+.4f}]"
        print(f"| {row['run']} | {row['difference']:+.4f} | {interval} | {row['p_a_better']:.3f} |")
    return {"reference": str(args.reference), "metric": args.metric, "split": args.split, "rows": rows}
