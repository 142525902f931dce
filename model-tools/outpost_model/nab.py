"""NAB scoring (Numenta Anomaly Benchmark), standard library only.

Implements the scoring NAB defines (Lavin and Ahmad, 2015; Ahmad et al.,
2017) as its current code computes it:

* Every data file listed in ``combined_windows.json`` and present under the
  data directory is scored; the detector's results file has the same relative
  path under the results directory and an ``anomaly_score`` column, one row
  per data row, in the same order.
* The first ``min(floor(0.15 * rows), 0.15 * 5000)`` rows of each file are a
  probationary period: they are neither true nor false positives, and a window
  that lies wholly inside it is not scored.
* A row inside a window ``[left, right]`` (``width = right - left + 1`` rows)
  scores as a true positive ``tp * S(-(right - i + 1) / width) / S(-1)``, where
  ``S(x) = 2 / (1 + exp(5x)) - 1`` is the scaled sigmoid (so a detection on
  the first row of a window is worth exactly ``tp``). Only the best (earliest)
  detection in a window counts; a window with none costs ``fn``.
* A row outside every window scores as a false positive ``fp * S(x)``, with
  ``x = |right_prev - i| / (width_prev - 1)`` measured from the end of the
  preceding window, or ``x = 3`` (``S = -1``) when no window precedes it;
  ``S(x) = -1`` for ``x >= 3``.
* One threshold (detection = ``anomaly_score >= threshold``) is chosen to
  maximise the summed score over the whole corpus: every distinct score value
  is tried, plus "detect nothing".
* The raw score is normalised: ``100 * (raw - null) / (perfect - null)``,
  where ``null`` is the score of detecting nothing (``-fn`` per scored
  window) and ``perfect`` is ``tp`` per labelled window.

Usage::

    python3 -m outpost_model.nab --data /work/shared/data/nab --results DIR \\
        [--profile standard|reward_low_FP|reward_low_FN|all] [--per-file] [--json]
"""

from __future__ import annotations

import argparse
import bisect
import csv
import json
import math
import os
import sys
from dataclasses import dataclass, field
from datetime import datetime

PROBATION_PERCENT = 0.15
#: NAB caps the probationary period at 15 % of 5000 rows (750).
PROBATION_CAP_ROWS = 5000

PROFILES = {
    "standard": {"tp": 1.0, "fn": 1.0, "fp": 0.11},
    "reward_low_FP": {"tp": 1.0, "fn": 1.0, "fp": 0.22},
    "reward_low_FN": {"tp": 1.0, "fn": 2.0, "fp": 0.11},
}

WINDOWS_FILE = "combined_windows.json"


class NabError(Exception):
    """Bad input: a missing or malformed data, label or results file."""


# --------------------------------------------------------------------------
# The scoring function


def scaled_sigmoid(x: float) -> float:
    """NAB's scaled sigmoid: 1 far before a window's end (x -> -inf), 0 at
    its end (x = 0), -1 from three window widths after it (x >= 3)."""
    if x >= 3.0:
        return -1.0
    return 2.0 / (1.0 + math.exp(5.0 * x)) - 1.0


MAX_TP = scaled_sigmoid(-1.0)


def probation_length(rows: int, percent: float = PROBATION_PERCENT) -> float:
    """Rows ``i < probation_length(rows)`` are probationary."""
    return min(math.floor(percent * rows), percent * PROBATION_CAP_ROWS)


@dataclass
class Row:
    """One scorable (post-probation) row of one file."""

    anomaly_score: float
    #: What a detection on this row is worth (positive inside a window).
    weight: float
    #: ``(file, window index)`` for a row inside a window, else None.
    window: tuple[str, int] | None


def window_spans(timestamps: list[datetime], windows) -> list[tuple[int, int]]:
    """Row index spans ``[left, right]`` of each window: the rows whose
    time stamps lie within it. Windows with no row are left out."""
    spans = []
    for start, end in windows:
        left = bisect.bisect_left(timestamps, start)
        right = bisect.bisect_right(timestamps, end) - 1
        if left <= right:
            spans.append((left, right))
    spans.sort()
    return spans


def sweep_file(name: str, timestamps, scores, windows, profile) -> list[Row]:
    """Weights every post-probation row of one file for the threshold sweep."""
    if len(timestamps) != len(scores):
        raise NabError(
            f"{name}: {len(scores)} result rows for {len(timestamps)} data rows"
        )
    spans = window_spans(timestamps, windows)
    probation = probation_length(len(timestamps))
    rows = []
    k = 0  # next window
    prev = None  # (right, width) of the last window passed
    for i, score in enumerate(scores):
        while k < len(spans) and spans[k][1] < i:
            left, right = spans[k]
            prev = (right, right - left + 1)
            k += 1
        in_window = k < len(spans) and spans[k][0] <= i <= spans[k][1]
        if in_window:
            left, right = spans[k]
            width = right - left + 1
            pos = -(right - i + 1) / width
            weight = scaled_sigmoid(pos) * profile["tp"] / MAX_TP
            window = (name, k)
        else:
            if prev is None or prev[1] <= 1:
                pos = 3.0
            else:
                pos = abs(prev[0] - i) / (prev[1] - 1)
            weight = scaled_sigmoid(pos) * profile["fp"]
            window = None
        if i >= probation:
            rows.append(Row(score, weight, window))
    return rows


@dataclass
class ThresholdScore:
    threshold: float
    score: float
    tp: int = 0  # detected windows
    fn: int = 0  # missed windows
    fp: int = 0  # detections outside every window
    detections: int = 0


def sweep_thresholds(rows: list[Row], profile) -> list[ThresholdScore]:
    """The corpus score at every threshold, from "detect nothing" (1.1) down
    to the lowest score emitted. Detection means ``score >= threshold``."""
    parts = {}
    for r in rows:
        if r.window is not None:
            parts[r.window] = -profile["fn"]
    total = sum(parts.values())
    detected = set()
    fp = 0
    out = [ThresholdScore(1.1, total, 0, len(parts), 0, 0)]
    ordered = sorted(rows, key=lambda r: r.anomaly_score, reverse=True)
    n = 0
    i = 0
    while i < len(ordered):
        threshold = ordered[i].anomaly_score
        while i < len(ordered) and ordered[i].anomaly_score == threshold:
            r = ordered[i]
            n += 1
            if r.window is None:
                total += r.weight
                fp += 1
            else:
                detected.add(r.window)
                if r.weight > parts[r.window]:
                    total += r.weight - parts[r.window]
                    parts[r.window] = r.weight
            i += 1
        out.append(
            ThresholdScore(
                threshold, total, len(detected), len(parts) - len(detected), fp, n
            )
        )
    return out


def best_threshold(sweep: list[ThresholdScore]) -> ThresholdScore:
    """Highest score; among equals the highest threshold (fewest detections)."""
    best = sweep[0]
    for s in sweep[1:]:
        if s.score > best.score:
            best = s
    return best


# --------------------------------------------------------------------------
# Files


def parse_timestamp(text: str, where: str) -> datetime:
    try:
        return datetime.fromisoformat(text.strip())
    except ValueError:
        raise NabError(f"{where}: not a timestamp: {text!r}") from None


def load_windows(data_dir: str) -> dict[str, list[tuple[datetime, datetime]]]:
    path = os.path.join(data_dir, WINDOWS_FILE)
    try:
        with open(path) as f:
            raw = json.load(f)
    except OSError as e:
        raise NabError(f"{path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise NabError(f"{path}:{e.lineno}: {e.msg}") from None
    out = {}
    for name, windows in raw.items():
        out[name] = [
            (parse_timestamp(a, f"{path}: {name}"), parse_timestamp(b, f"{path}: {name}"))
            for a, b in windows
        ]
    return out


def read_data_timestamps(path: str) -> list[datetime]:
    try:
        with open(path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if not header:
                raise NabError(f"{path}: empty file")
            out = []
            for line, row in enumerate(reader, start=2):
                if not row:
                    continue
                out.append(parse_timestamp(row[0], f"{path}:{line}"))
            return out
    except OSError as e:
        raise NabError(f"{path}: {e.strerror}") from None


def read_scores(path: str) -> list[float]:
    try:
        with open(path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if not header or "anomaly_score" not in header:
                raise NabError(f"{path}:1: no anomaly_score column")
            col = header.index("anomaly_score")
            out = []
            for line, row in enumerate(reader, start=2):
                if not row:
                    continue
                try:
                    v = float(row[col])
                except (IndexError, ValueError):
                    raise NabError(f"{path}:{line}: bad anomaly_score") from None
                if not math.isfinite(v):
                    raise NabError(f"{path}:{line}: anomaly_score is not finite")
                out.append(v)
            return out
    except OSError as e:
        raise NabError(f"{path}: {e.strerror}") from None


@dataclass
class Corpus:
    """The labelled data files found under a data directory."""

    windows: dict[str, list[tuple[datetime, datetime]]]
    timestamps: dict[str, list[datetime]] = field(default_factory=dict)

    @classmethod
    def load(cls, data_dir: str) -> "Corpus":
        windows = load_windows(data_dir)
        corpus = cls(windows={})
        for name in sorted(windows):
            path = os.path.join(data_dir, name)
            if os.path.isfile(path):
                corpus.windows[name] = windows[name]
                corpus.timestamps[name] = read_data_timestamps(path)
        if not corpus.windows:
            raise NabError(f"{data_dir}: no labelled data file found")
        return corpus

    def window_count(self) -> int:
        return sum(len(w) for w in self.windows.values())


@dataclass
class Result:
    profile: str
    score: float
    raw: float
    null: float
    perfect: float
    threshold: float
    tp: int
    fn: int
    fp: int
    per_file: dict[str, float] = field(default_factory=dict)


def score_corpus(corpus: Corpus, scores: dict[str, list[float]], profile_name: str) -> Result:
    """Scores a detector's per-row anomaly scores (one list per data file)."""
    profile = PROFILES[profile_name]
    rows_by_file = {}
    for name, ts in corpus.timestamps.items():
        if name not in scores:
            raise NabError(f"no results for {name}")
        rows_by_file[name] = sweep_file(name, ts, scores[name], corpus.windows[name], profile)
    rows = [r for rs in rows_by_file.values() for r in rs]
    sweep = sweep_thresholds(rows, profile)
    best = best_threshold(sweep)
    null = sweep[0].score
    perfect = profile["tp"] * corpus.window_count()
    per_file = {}
    for name, rs in rows_by_file.items():
        per_file[name] = _score_at(rs, profile, best.threshold)
    return Result(
        profile=profile_name,
        score=100.0 * (best.score - null) / (perfect - null),
        raw=best.score,
        null=null,
        perfect=perfect,
        threshold=best.threshold,
        tp=best.tp,
        fn=best.fn,
        fp=best.fp,
        per_file=per_file,
    )


def _score_at(rows: list[Row], profile, threshold: float) -> float:
    parts = {r.window: -profile["fn"] for r in rows if r.window is not None}
    fp = 0.0
    for r in rows:
        if r.anomaly_score >= threshold:
            if r.window is None:
                fp += r.weight
            else:
                parts[r.window] = max(parts[r.window], r.weight)
    return fp + sum(parts.values())


def load_results(corpus: Corpus, results_dir: str) -> dict[str, list[float]]:
    out = {}
    for name in corpus.timestamps:
        out[name] = read_scores(os.path.join(results_dir, name))
    return out


# --------------------------------------------------------------------------
# Command line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python3 -m outpost_model.nab",
        description="Score per-row anomaly scores with the NAB scoring.",
    )
    p.add_argument("--data", required=True, help="NAB data dir (holds combined_windows.json)")
    p.add_argument("--results", required=True, help="dir of results CSVs, same relative paths")
    p.add_argument(
        "--profile",
        default="standard",
        choices=sorted(PROFILES) + ["all"],
        help="scoring profile (default: standard)",
    )
    p.add_argument("--per-file", action="store_true", help="print each file's raw score")
    p.add_argument("--json", action="store_true", help="print JSON")
    args = p.parse_args(argv)
    try:
        corpus = Corpus.load(args.data)
        scores = load_results(corpus, args.results)
        names = sorted(PROFILES) if args.profile == "all" else [args.profile]
        results = [score_corpus(corpus, scores, n) for n in names]
    except NabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(
            json.dumps(
                [
                    {k: v for k, v in r.__dict__.items() if args.per_file or k != "per_file"}
                    for r in results
                ],
                indent=2,
            )
        )
        return 0
    for r in results:
        print(
            f"{r.profile}: {r.score:.2f} (threshold {r.threshold:.6g}, "
            f"{r.tp} of {r.tp + r.fn} windows detected, {r.fp} false positives, "
            f"raw {r.raw:.3f}, null {r.null:.3f}, perfect {r.perfect:.3f}, "
            f"{len(corpus.timestamps)} files)"
        )
        if args.per_file:
            for name, s in r.per_file.items():
                print(f"  {s:8.3f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
