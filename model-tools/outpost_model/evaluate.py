"""Evaluating a package on labelled data: pointwise precision/recall/F1 at
the packaged threshold, and the NAB score (nab.py) with windows made from
the runs of the 0/1 label column."""

from __future__ import annotations

from dataclasses import dataclass, asdict
from datetime import datetime, timedelta

import numpy as np

from . import data, nab, package

NAB_FILE = "data.csv"
T0 = datetime(2000, 1, 1)


def label_runs(labels: np.ndarray) -> list[tuple[int, int]]:
    """``[first, last]`` row index of every maximal run of non-zero labels."""
    spans, start = [], None
    for i, v in enumerate(labels):
        if v and start is None:
            start = i
        elif not v and start is not None:
            spans.append((start, i - 1))
            start = None
    if start is not None:
        spans.append((start, len(labels) - 1))
    return spans


@dataclass
class Metrics:
    rows: int
    rows_skipped: int
    anomalous_rows: int
    alerts: int
    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float
    false_alarm_rate: float
    threshold: float
    windows: int
    nab_standard: float  # NAB's normalised score, at NAB's own best threshold
    nab_threshold: float
    nab_at_threshold: float  # normalised, at the packaged threshold

    def text(self) -> str:
        return (
            f"{self.rows} rows ({self.rows_skipped} skipped: missing values), "
            f"{self.anomalous_rows} labelled anomalous in {self.windows} window(s)\n"
            f"at threshold {self.threshold:g}: {self.alerts} alerts, tp {self.tp}, "
            f"fp {self.fp}, fn {self.fn}\n"
            f"precision {self.precision:.4f}  recall {self.recall:.4f}  f1 {self.f1:.4f}  "
            f"false-alarm rate {self.false_alarm_rate:.4f}\n"
            f"NAB standard {self.nab_standard:.2f} (best threshold {self.nab_threshold:.6g}); "
            f"{self.nab_at_threshold:.2f} at the packaged threshold")

    def as_dict(self) -> dict:
        return asdict(self)


def metrics(scores01: np.ndarray, labels: np.ndarray, threshold: float,
            skipped: int = 0) -> Metrics:
    scores01 = np.asarray(scores01, dtype=np.float64)
    truth = np.asarray(labels) != 0
    alert = scores01 >= threshold
    tp = int((alert & truth).sum())
    fp = int((alert & ~truth).sum())
    fn = int((~alert & truth).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    negatives = int((~truth).sum())
    # NAB: one file, one row per second from T0, windows = label runs.
    stamps = [T0 + timedelta(seconds=i) for i in range(len(scores01))]
    spans = label_runs(truth)
    corpus = nab.Corpus(windows={NAB_FILE: [(stamps[a], stamps[b]) for a, b in spans]},
                        timestamps={NAB_FILE: stamps})
    if spans:
        r = nab.score_corpus(corpus, {NAB_FILE: list(scores01)}, "standard")
        prof = nab.PROFILES["standard"]
        rows = nab.sweep_file(NAB_FILE, stamps, list(scores01), corpus.windows[NAB_FILE], prof)
        at = nab._score_at(rows, prof, threshold)
        if r.perfect != r.null:
            nab_score, nab_th = r.score, r.threshold
            nab_at = 100.0 * (at - r.null) / (r.perfect - r.null)
        else:  # every window inside NAB's probation period
            nab_score, nab_th, nab_at = float("nan"), float("nan"), float("nan")
    else:
        nab_score, nab_th, nab_at = float("nan"), float("nan"), float("nan")
    return Metrics(len(scores01), skipped, int(truth.sum()), int(alert.sum()), tp, fp, fn,
                   precision, recall, f1, fp / negatives if negatives else 0.0, threshold,
                   len(spans), nab_score, nab_th, nab_at)


def evaluate(model_dir: str, data_path: str, label_column: str = "label") -> Metrics:
    with package.opened(model_dir) as d:
        manifest, onnx_bytes = package.load(d)
    problems = package.check_manifest(manifest, onnx_bytes, check_selftests=False)
    if problems:
        raise package.PackageError(f"{model_dir}: " + "; ".join(problems))
    table = data.read_table(data_path)
    if label_column not in table.columns:
        raise data.DataError(f"{data_path}: no label column {label_column!r}")
    labels = table.values[:, table.columns.index(label_column)]
    if np.isnan(labels).any() or not np.isin(labels, (0, 1)).all():
        raise data.DataError(f"{data_path}: column {label_column!r} must hold 0 or 1 in every row")
    X = data.columns(table, [f["name"] for f in manifest["feature"]])
    order = np.argsort(table.ts, kind="stable")
    X, labels = X[order], labels[order]
    ok = ~np.isnan(X).any(axis=1)
    if not ok.any():
        raise data.DataError(f"{data_path}: no row has all the model's features")
    raw = package.run_batch(package.session(onnx_bytes), manifest, X[ok])
    s01 = package.score01(raw, manifest)
    return metrics(s01, labels[ok], float(manifest["score"]["threshold"]), int((~ok).sum()))
