"""The ``outpost-model`` command line. Exit codes as the agent's: 0 ok,
1 runtime failure, 2 bad input (arguments, data, package)."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys

EXIT_OK, EXIT_RUNTIME, EXIT_BAD_INPUT = 0, 1, 2

DESCRIPTION = """\
Train, package, evaluate and verify ONNX anomaly detectors for the outpost
agent. A package is a directory holding exactly model.onnx and model.toml
(format 1); see model-tools/README.md.

  outpost-model train --data export.csv --kind iforest --out pkg/web-iforest
  outpost-model package --onnx model.onnx --manifest-template t.toml --out pkg/x
  outpost-model evaluate --model pkg/web-iforest --data labelled.csv [--json]
  outpost-model verify pkg/web-iforest
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own exit code is already 2
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = _Parser(prog="outpost-model", description=DESCRIPTION, formatter_class=fmt)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser(
        "train", formatter_class=fmt, help="train a detector on an `outpost export` CSV",
        description="""\
Train a detector on healthy history (an `outpost export` CSV: ts_ms, then one
column per feature) and write a complete package to --out.

Columns that are empty everywhere, missing in more than 20% of the rows, or
constant are dropped (and listed); then rows with any missing value. The
oldest 80% of the rows (by ts_ms) fit the model; the raw threshold is the
quantile of the raw scores of ALL the healthy rows at the false-alarm rate,
and the false-alarm rate on the held-out newest 20% is reported. score.low is
the median healthy raw score; score.high puts the raw threshold at
score01 = 0.5, and threshold = 0.5.

Kinds: iforest (IsolationForest, 100 trees; raw = decision_function, lower is
more anomalous; no contributions output), autoencoder (StandardScaler + MLP
N-N/2-N/4-N/2-N; raw = mean squared reconstruction error in scaled space,
contributions = per-feature squared error), pca (StandardScaler + PCA at 95%
of the variance; raw = mean squared residual, contributions = per-feature
squared residual).""")
    t.add_argument("--data", required=True, help="`outpost export` CSV of healthy history")
    t.add_argument("--kind", required=True, help="iforest | autoencoder | pca")
    t.add_argument("--out", required=True, help="package directory to write")
    t.add_argument("--features", help="keep only the columns this regex matches (re.search)")
    t.add_argument("--false-alarm-rate", type=float, default=0.001,
                   help="target share of healthy steps that alert (default 0.001)")
    t.add_argument("--name", help="package name, [a-z0-9._-]{1,64} (default: from --out)")
    t.add_argument("--version", help="package version (default: UTC date-time)")
    t.add_argument("--window-s", type=int, help="feature window (default: from column names)")
    t.add_argument("--step-s", type=int, help="step between vectors (default: from ts_ms)")
    t.add_argument("--seed", type=int, default=0, help="random seed (default 0)")

    k = sub.add_parser(
        "package", formatter_class=fmt, help="package an ONNX graph with a manifest template",
        description="""\
Package an existing ONNX graph: copies it to OUT/model.onnx, fills in
[onnx].file and [onnx].sha256, computes every [[selftest]]'s expected score
(and contributions) with onnxruntime and writes OUT/model.toml.

The template is a model.toml without sha256 and expected values: format,
name, version, kind, [onnx] input/score/contributions, [window], [score],
[[feature]] (name, median, low, high). Self-test inputs come from the
template's [[selftest]] input lists when it has any, else five rows are made
from the feature ranges: median, low, high, midway, and one outlier.""")
    k.add_argument("--onnx", required=True, help="the ONNX graph")
    k.add_argument("--manifest-template", required=True, help="model.toml template")
    k.add_argument("--out", required=True, help="package directory to write")
    k.add_argument("--tolerance", type=float, default=1e-4,
                   help="self-test tolerance per value (default 1e-4)")

    e = sub.add_parser(
        "evaluate", formatter_class=fmt, help="precision/recall/F1 and NAB score on labelled data",
        description="""\
Run a package with onnxruntime over a labelled CSV (an export with an extra
0/1 label column), map raw scores to score01 as the agent does, and alert
where score01 >= the packaged threshold. Reports pointwise precision, recall,
F1 and the false-alarm rate, and the NAB standard-profile score: rows are
taken in ts_ms order as one NAB file, each maximal run of label = 1 rows is
one anomaly window [first row, last row], NAB's probationary first 15% of
rows is neither rewarded nor penalised. NAB picks its own best threshold; the
score at the packaged threshold is reported too. Rows missing one of the
model's features are skipped.""")
    e.add_argument("--model", required=True, help="package directory or .tar")
    e.add_argument("--data", required=True, help="labelled CSV")
    e.add_argument("--label-column", default="label", help="0/1 column (default: label)")
    e.add_argument("--json", action="store_true", help="print JSON")

    v = sub.add_parser(
        "verify", formatter_class=fmt, help="check a package (onnxruntime, then the agent)",
        description="""\
Check a package with onnxruntime (files, manifest rules, sha256, self-tests),
then run `outpost model verify DIR` (the binary in $OUTPOST_BIN, else
`outpost` on PATH), which loads it with tract as the agent will. Exits 2 if
the onnxruntime check fails, else with the agent's exit code. With
--no-agent, or with OUTPOST_BIN unset and no `outpost` on PATH, only the
onnxruntime check is made; an OUTPOST_BIN naming no file is an error.""")
    v.add_argument("dir", help="package directory or .tar")
    v.add_argument("--no-agent", action="store_true", help="skip `outpost model verify`")
    return p


def _err(msg: str) -> None:
    print(f"outpost-model: {msg}", file=sys.stderr)


def cmd_train(a) -> int:
    from . import train

    r = train.train(a.data, a.kind, a.out, features=a.features,
                    false_alarm_rate=a.false_alarm_rate, name=a.name, version=a.version,
                    window_s=a.window_s, step_s=a.step_s, seed=a.seed)
    m = r.manifest
    print(r.selection.report())
    held = r.holdout_alarms / r.holdout_rows if r.holdout_rows else float("nan")
    print(f"{m['kind']} {m['name']} {m['version']}: raw threshold {r.raw_threshold:.6g} "
          f"(score.low {m['score']['low']:.6g}, score.high {m['score']['high']:.6g}); "
          f"held-out false alarms {r.holdout_alarms} of {r.holdout_rows} ({held:.4f})")
    print(f"wrote {os.path.join(a.out, 'model.onnx')} and model.toml "
          f"({len(m['selftest'])} self-tests)")
    return EXIT_OK


def cmd_package(a) -> int:
    import numpy as np

    from . import package

    tmpl = package.load_toml(a.manifest_template)
    try:
        with open(a.onnx, "rb") as f:
            data = f.read()
    except OSError as e:
        raise package.PackageError(f"{a.onnx}: {e.strerror}") from None
    inputs = None
    if tmpl.get("selftest"):
        try:
            inputs = np.array([t["input"] for t in tmpl["selftest"]], dtype=np.float64)
        except (KeyError, TypeError, ValueError):
            raise package.PackageError(
                f"{a.manifest_template}: every [[selftest]] needs an input list of numbers, "
                "all of the same length") from None
    if not (a.tolerance > 0 and math.isfinite(a.tolerance)):
        raise package.PackageError("--tolerance must be positive")
    m = package.write_package(a.out, data, tmpl, inputs, a.tolerance)
    print(f"wrote {a.out}: {m['name']} {m['version']}, sha256 {m['onnx']['sha256']}, "
          f"{len(m['selftest'])} self-tests")
    return EXIT_OK


def cmd_evaluate(a) -> int:
    from . import evaluate

    r = evaluate.evaluate(a.model, a.data, a.label_column)
    if a.json:
        d = {k: (None if isinstance(v, float) and math.isnan(v) else v)
             for k, v in r.as_dict().items()}
        print(json.dumps(d, indent=2))
    else:
        print(r.text())
    return EXIT_OK


def agent_binary() -> str | None:
    env = os.environ.get("OUTPOST_BIN")
    if env:
        return env if os.path.isfile(env) else None
    return shutil.which("outpost")


def cmd_verify(a) -> int:
    from . import package

    problems = package.verify(a.dir)
    if problems:
        for pr in problems:
            print(f"{a.dir}: {pr}", file=sys.stderr)
        print(f"{a.dir}: refused by the onnxruntime check", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"{a.dir}: ok under onnxruntime (sha256, manifest, self-tests)")
    if a.no_agent:
        return EXIT_OK
    env = os.environ.get("OUTPOST_BIN")
    if env and not os.path.isfile(env):
        _err(f"OUTPOST_BIN={env}: no such file")
        return EXIT_BAD_INPUT
    exe = agent_binary()
    if exe is None:
        where = os.environ.get("OUTPOST_BIN") or "`outpost` on PATH"
        _err(f"agent binary not found ({where}); tract check skipped")
        return EXIT_OK
    try:
        rc = subprocess.run([exe, "model", "verify", a.dir]).returncode
    except OSError as e:
        _err(f"{exe}: {e.strerror}")
        return EXIT_RUNTIME
    return rc


def main(argv=None) -> int:
    from . import data, package

    a = _parser().parse_args(argv)
    cmd = {"train": cmd_train, "package": cmd_package, "evaluate": cmd_evaluate,
           "verify": cmd_verify}[a.command]
    try:
        return cmd(a)
    except (data.DataError, package.PackageError) as e:
        _err(str(e))
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
