"""The baseline detector's NAB score on the shared data, through the real
`outpost replay` binary: a regression guard on detection quality.

OUTPOST_BIN names the binary (scripts/test sets it); the test fails, not
skips, when it is missing."""

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from outpost_model import nab  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SHARED_NAB = Path(os.environ.get("NAB_DATA", REPO.parent / "shared" / "data" / "nab"))
OUTPOST = Path(os.environ.get("OUTPOST_BIN", REPO / "target" / "debug" / "outpost"))

# Measured 73.1 (standard profile) when the detector's defaults were set;
# the guard leaves room for float noise, not for a worse detector.
MIN_STANDARD_SCORE = 72.0


def test_baseline_scores_on_shared_nab(tmp_path):
    assert OUTPOST.is_file(), f"outpost binary not found at {OUTPOST} (set OUTPOST_BIN)"
    corpus = nab.Corpus.load(str(SHARED_NAB))
    results = tmp_path / "results"
    for name in corpus.timestamps:
        out = results / name
        subprocess.run(
            [str(OUTPOST), "replay", "--input", str(SHARED_NAB / name),
             "--output", str(out), "--detector", "baseline"],
            check=True, capture_output=True)
    scores = nab.load_results(corpus, str(results))
    for name, s in scores.items():
        assert len(s) == len(corpus.timestamps[name])
        assert all(0.0 <= x <= 1.0 for x in s), name
    standard = nab.score_corpus(corpus, scores, "standard")
    assert standard.score >= MIN_STANDARD_SCORE, standard
