"""Tests of the NAB scorer: on a tiny synthetic corpus whose scores can be
worked out by hand, and on the shared NAB data (null scores 0, perfect 100)."""

import csv
import json
import math
import os
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from outpost_model import nab  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SHARED_NAB = Path(os.environ.get("NAB_DATA", REPO.parent / "shared" / "data" / "nab"))

T0 = datetime(2014, 1, 1)


def ts(i):
    return T0 + timedelta(minutes=5 * i)


def write_corpus(root, files):
    """files: {relpath: (rows, [(first_row, last_row), ...])}."""
    windows = {}
    for name, (rows, spans) in files.items():
        path = root / "data" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["timestamp", "value"])
            for i in range(rows):
                w.writerow([ts(i).strftime("%Y-%m-%d %H:%M:%S"), i % 7])
        windows[name] = [
            [ts(a).strftime("%Y-%m-%d %H:%M:%S.%f"), ts(b).strftime("%Y-%m-%d %H:%M:%S.%f")]
            for a, b in spans
        ]
    (root / "data" / "combined_windows.json").write_text(json.dumps(windows))
    return root / "data"


def write_results(root, corpus, scores_by_file):
    out = root / "results"
    for name, scores in scores_by_file.items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["timestamp", "anomaly_score"])
            for t, s in zip(corpus.timestamps[name], scores):
                w.writerow([t.strftime("%Y-%m-%d %H:%M:%S"), s])
    return out


def perfect_scores(corpus):
    out = {}
    for name, stamps in corpus.timestamps.items():
        s = [0.0] * len(stamps)
        for left, _ in nab.window_spans(stamps, corpus.windows[name]):
            s[left] = 1.0
        out[name] = s
    return out


def test_scaled_sigmoid_and_probation():
    assert nab.scaled_sigmoid(0.0) == 0.0
    assert nab.scaled_sigmoid(-1.0) == pytest.approx(0.98661, abs=1e-5)
    assert nab.scaled_sigmoid(-0.5) == pytest.approx(0.84828, abs=1e-5)
    assert nab.scaled_sigmoid(1.0) == pytest.approx(-0.98661, abs=1e-5)
    assert nab.scaled_sigmoid(3.0) == -1.0
    assert nab.probation_length(4032) == 604
    assert nab.probation_length(1243) == 186
    assert nab.probation_length(10000) == 750
    assert nab.probation_length(22695) == 750


def test_hand_worked_corpus(tmp_path):
    # 100 rows: probation is rows 0..14. Window rows 40..59 (width 20).
    data = write_corpus(tmp_path, {"fam/a.csv": (100, [(40, 59)])})
    corpus = nab.Corpus.load(str(data))
    prof = nab.PROFILES["standard"]

    def raw(scores, threshold=0.5):
        rows = nab.sweep_file("fam/a.csv", corpus.timestamps["fam/a.csv"], scores,
                              corpus.windows["fam/a.csv"], prof)
        return nab._score_at(rows, prof, threshold)

    zero = [0.0] * 100
    assert raw(zero) == -1.0  # one missed window
    # Earliest row of the window: worth exactly tp.
    s = zero.copy(); s[40] = 1.0
    assert raw(s) == pytest.approx(1.0, abs=1e-12)
    # Half-way in: S(-0.5) / S(-1).
    s = zero.copy(); s[50] = 1.0
    assert raw(s) == pytest.approx(nab.scaled_sigmoid(-0.5) / nab.MAX_TP, abs=1e-12)
    # Only the earliest detection in a window counts.
    s = zero.copy(); s[40] = 1.0; s[50] = 1.0; s[59] = 1.0
    assert raw(s) == pytest.approx(1.0, abs=1e-12)
    # A false positive before any window costs fp; one in probation nothing.
    s = zero.copy(); s[20] = 1.0; s[3] = 1.0
    assert raw(s) == pytest.approx(-1.0 - 0.11, abs=1e-12)
    # A false positive after the window is weighted by its distance from the
    # window's end, in widths - 1.
    s = zero.copy(); s[40] = 1.0; s[69] = 1.0
    expect = 1.0 + 0.11 * nab.scaled_sigmoid(10 / 19)
    assert raw(s) == pytest.approx(expect, abs=1e-12)


def test_threshold_is_optimised_over_the_corpus(tmp_path):
    files = {"f/a.csv": (200, [(100, 119)]), "f/b.csv": (200, [(150, 169)])}
    data = write_corpus(tmp_path, files)
    corpus = nab.Corpus.load(str(data))
    a = [0.1] * 200
    b = [0.1] * 200
    a[100] = 0.9  # a: detected at 0.9
    b[155] = 0.7  # b: detected only at 0.7, but b has an FP at 0.8
    b[50] = 0.8
    results = write_results(tmp_path, corpus, {"f/a.csv": a, "f/b.csv": b})
    scores = nab.load_results(corpus, str(results))
    r = nab.score_corpus(corpus, scores, "standard")
    late = nab.scaled_sigmoid(-(169 - 155 + 1) / 20) / nab.MAX_TP
    # Threshold 0.7 catches both windows at the price of one FP.
    assert r.threshold == 0.7
    assert r.raw == pytest.approx(1.0 + late - 0.11, abs=1e-12)
    assert (r.tp, r.fn, r.fp) == (2, 0, 1)
    assert r.score == pytest.approx(100 * (r.raw + 2) / 4, abs=1e-9)


def test_null_and_perfect_on_synthetic(tmp_path):
    files = {"f/a.csv": (300, [(100, 129), (200, 229)]), "f/b.csv": (300, []),
             "g/c.csv": (300, [(250, 299)])}
    data = write_corpus(tmp_path, files)
    corpus = nab.Corpus.load(str(data))
    null = {n: [0.0] * len(t) for n, t in corpus.timestamps.items()}
    for profile in nab.PROFILES:
        assert nab.score_corpus(corpus, null, profile).score == 0.0
        assert nab.score_corpus(corpus, perfect_scores(corpus), profile).score == pytest.approx(
            100.0, abs=1e-9)


def test_bad_results_are_named(tmp_path):
    data = write_corpus(tmp_path, {"f/a.csv": (50, [(30, 39)])})
    corpus = nab.Corpus.load(str(data))
    out = tmp_path / "results" / "f"
    out.mkdir(parents=True)
    (out / "a.csv").write_text("timestamp,anomaly_score\n2014-01-01 00:00:00,x\n")
    with pytest.raises(nab.NabError, match=r"a\.csv:2: bad anomaly_score"):
        nab.load_results(corpus, str(tmp_path / "results"))
    (out / "a.csv").write_text("timestamp,anomaly_score\n2014-01-01 00:00:00,0.5\n")
    scores = nab.load_results(corpus, str(tmp_path / "results"))
    with pytest.raises(nab.NabError, match="1 result rows for 50 data rows"):
        nab.score_corpus(corpus, scores, "standard")
    assert nab.main(["--data", str(data), "--results", str(tmp_path / "nothing")]) == 2


def test_shared_nab_null_and_perfect(tmp_path, capsys):
    assert (SHARED_NAB / "combined_windows.json").is_file(), (
        f"shared NAB data not found at {SHARED_NAB} (set NAB_DATA)")
    corpus = nab.Corpus.load(str(SHARED_NAB))
    assert len(corpus.timestamps) >= 17
    null = {n: [0.0] * len(t) for n, t in corpus.timestamps.items()}
    perfect = perfect_scores(corpus)
    for profile in nab.PROFILES:
        assert nab.score_corpus(corpus, null, profile).score == 0.0
        r = nab.score_corpus(corpus, perfect, profile)
        assert r.score == pytest.approx(100.0, abs=1e-9), profile
        assert r.fp == 0 and r.fn == 0
    # The command line, end to end.
    results = write_results(tmp_path, corpus, perfect)
    assert nab.main(["--data", str(SHARED_NAB), "--results", str(results)]) == 0
    assert capsys.readouterr().out.startswith("standard: 100.00")
    assert not math.isnan(r.threshold)
