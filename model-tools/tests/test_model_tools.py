"""outpost-model: training, packaging, evaluation and verification, on
synthetic data with injected anomalies (seeded, so deterministic)."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import onnx
import pytest

import synth
from outpost_model import cli, data, evaluate, graphs, package, train

FAR = 0.005


@pytest.fixture(scope="module")
def healthy_csv(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    X = synth.healthy(1500, seed=1)
    rows = len(X)
    extra = {
        "host.cpu.count.last_60s": [4] * rows,            # constant: dropped
        "host.gone.mean_60s": [None] * rows,               # never present: dropped
        "host.new.mean_60s": [None] * (rows // 2) + [1.5] * (rows - rows // 2),  # mostly missing
    }
    path = synth.write_export(d / "healthy.csv", X, extra=extra)
    # One row with a missing value in a kept column (empty cell): dropped.
    lines = path.read_text().splitlines()
    cells = lines[10].split(",")
    cells[3] = ""
    lines[10] = ",".join(cells)
    cells = lines[11].split(",")
    cells[4] = "NaN"
    lines[11] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def labelled_csv(tmp_path_factory):
    d = tmp_path_factory.mktemp("labelled")
    X, labels = synth.inject(synth.healthy(1500, seed=2), seed=3)
    return synth.write_export(d / "labelled.csv", X, extra={"label": list(labels)}), labels


@pytest.fixture(scope="module")
def packages(tmp_path_factory, healthy_csv):
    out = {}
    root = tmp_path_factory.mktemp("pkg")
    for kind in train.KINDS:
        r = train.train(str(healthy_csv), kind, str(root / kind), false_alarm_rate=FAR,
                        name=f"synth-{kind}", version="1")
        out[kind] = (root / kind, r)
    return out


# --------------------------------------------------------------------------
# Reading exports


def test_read_export_cells(tmp_path):
    p = tmp_path / "e.csv"
    p.write_text('ts_ms,a.x.mean_5s,"odd,name",c\n'
                 "1000,1.5,,NaN\n"
                 "2000,inf,-2,3\n")
    t = data.read_table(str(p))
    assert t.columns == ["a.x.mean_5s", "odd,name", "c"]
    assert t.ts.tolist() == [1000, 2000]
    assert t.values[0, 0] == 1.5 and np.isnan(t.values[0, 1]) and np.isnan(t.values[0, 2])
    assert np.isnan(t.values[1, 0]) and t.values[1, 1] == -2


def test_training_drops_and_reports_columns(packages):
    _, r = packages["iforest"]
    sel = r.selection
    assert sel.names == synth.NAMES
    assert sel.dropped["that are constant"] == ["host.cpu.count.last_60s"]
    assert sel.dropped["with no value"] == ["host.gone.mean_60s"]
    assert sel.dropped["missing in more than 20% of rows"] == ["host.new.mean_60s"]
    assert sel.rows_dropped == 2
    assert "dropped 1 column(s) that are constant: host.cpu.count.last_60s" in sel.report()


# --------------------------------------------------------------------------
# Graphs against the scikit-learn models they come from


def test_iforest_graph_is_decision_function():
    from sklearn.ensemble import IsolationForest

    X = synth.healthy(600, seed=5).astype(np.float32)
    forest = IsolationForest(n_estimators=30, max_features=0.6, random_state=0).fit(X)
    model = graphs.iforest_onnx(forest, X.shape[1])
    ops = {(n.domain, n.op_type) for n in model.graph.node}
    # One tree op (the agent's own TreeEnsembleRegressor), no LabelEncoder
    # and not tract's TreeEnsembleClassifier (2.5 ms a step).
    assert [op for _, op in ops if op.startswith("Tree")] == ["TreeEnsembleRegressor"]
    assert not any(op in ("TreeEnsembleClassifier", "LabelEncoder") for _, op in ops)
    assert [o.name for o in model.graph.output] == ["score"]
    sess = package.session(model.SerializeToString())
    test = np.vstack([synth.healthy(50, seed=6), synth.healthy(5, seed=7) * 5]).astype(np.float32)
    got = sess.run(["score"], {"input": test})[0]
    assert got.shape == (55, 1)
    np.testing.assert_allclose(got[:, 0], forest.decision_function(test), atol=1e-5)


@pytest.mark.parametrize("kind", ["autoencoder", "pca"])
def test_residual_graphs(kind):
    X = synth.healthy(400, seed=8)
    fitted = train.fit(kind, X)
    model = fitted.onnx
    assert [o.name for o in model.graph.output] == ["score", "contributions"]
    assert {i.opset_import[0].version for i in [model]} == {17}
    sess = package.session(model.SerializeToString())
    row = X[:1].astype(np.float32)
    score, contribs = sess.run(["score", "contributions"], {"input": row})
    assert score.shape == (1, 1) and contribs.shape == (1, X.shape[1])
    assert (contribs >= 0).all()
    np.testing.assert_allclose(score[0, 0], contribs.mean(), rtol=1e-5)
    # An outlier scores far higher than a healthy row.
    far = row + 20 * X.std(axis=0).astype(np.float32)
    assert sess.run(["score"], {"input": far})[0][0, 0] > 10 * score[0, 0]


# --------------------------------------------------------------------------
# Packages


@pytest.mark.parametrize("kind", train.KINDS)
def test_package_is_valid(packages, healthy_csv, kind):
    path, r = packages[kind]
    assert sorted(os.listdir(path)) == ["model.onnx", "model.toml"]
    assert package.verify(str(path)) == []
    m = package.load_toml(str(path / "model.toml"))
    assert m["format"] == 1 and m["kind"] == kind and m["name"] == f"synth-{kind}"
    assert m["onnx"]["sha256"] == hashlib.sha256((path / "model.onnx").read_bytes()).hexdigest()
    assert m["onnx"]["input"] == "input" and m["onnx"]["score"] == "score"
    assert ("contributions" in m["onnx"]) == (kind != "iforest")
    assert m["window"] == {"window_s": 60, "step_s": 10}
    assert [f["name"] for f in m["feature"]] == synth.NAMES
    model = onnx.load(str(path / "model.onnx"))
    assert {o.domain or "": o.version for o in model.opset_import}.get("") == 17
    # Feature ranges are the healthy median / 1st / 99th percentiles.
    X = r.selection.X
    for j, f in enumerate(m["feature"]):
        assert f["median"] == pytest.approx(np.median(X[:, j]))
        assert f["low"] == pytest.approx(np.percentile(X[:, j], 1))
        assert f["high"] == pytest.approx(np.percentile(X[:, j], 99))
    # Calibration: lower raw is worse for iforest only; the raw threshold
    # sits at score01 = 0.5.
    s = m["score"]
    assert (s["high"] < s["low"]) == (kind == "iforest")
    assert s["threshold"] == 0.5
    assert package.score01(np.array([r.raw_threshold]), m)[0] == pytest.approx(0.5, abs=1e-4)
    # Self-tests: 5 healthy rows and 1 outlier; they reproduce, and the
    # outlier is the most anomalous.
    assert len(m["selftest"]) == 6
    s01 = package.score01(np.array([t["score"] for t in m["selftest"]]), m)
    assert s01[-1] > 0.5 and s01[-1] == s01.max() and (s01[:-1] < 0.5).all()
    for t in m["selftest"][:5]:
        assert t["tolerance"] == 1e-4
    for t in m["selftest"]:
        magnitude = max([abs(t["score"])] + [abs(v) for v in t.get("contributions", [])])
        assert t["tolerance"] >= max(1e-4, 1e-5 * magnitude)
        assert ("contributions" in t) == (kind != "iforest")


@pytest.mark.parametrize("kind", train.KINDS)
def test_finds_injected_anomalies(packages, labelled_csv, kind):
    path, _ = packages[kind]
    csv_path, labels = labelled_csv
    r = evaluate.evaluate(str(path), str(csv_path))
    assert r.rows == len(labels) and r.windows == 5 and r.anomalous_rows == 100
    assert r.recall >= 0.8, r
    # Near the target false-alarm rate on healthy rows it never saw.
    assert r.false_alarm_rate <= 4 * FAR, r
    assert r.precision >= 0.8, r
    assert r.nab_standard >= 50, r


def test_refusals(packages, tmp_path):
    src, _ = packages["pca"]

    def copy(name):
        d = tmp_path / name
        shutil.copytree(src, d)
        return d

    d = copy("sha")
    b = bytearray((d / "model.onnx").read_bytes())
    b[-1] ^= 1
    (d / "model.onnx").write_bytes(bytes(b))
    assert any("sha256" in p for p in package.verify(str(d)))

    d = copy("selftest")
    text = (d / "model.toml").read_text()
    m = package.load_toml(str(d / "model.toml"))
    m["selftest"][0]["score"] += 0.01
    (d / "model.toml").write_text(package.dumps(m))
    assert any(p.startswith("selftest[0]: score") for p in package.verify(str(d)))

    for key, value, msg in [("threshold", 0.0, "threshold"), ("threshold", 1.5, "threshold"),
                            ("high", None, "low == high")]:
        d = copy(f"score-{key}-{value}")
        m = package.load_toml(str(d / "model.toml"))
        m["score"][key] = m["score"]["low"] if value is None else value
        (d / "model.toml").write_text(package.dumps(m))
        assert any(msg in p for p in package.verify(str(d))), (key, value)

    d = copy("format")
    (d / "model.toml").write_text(text.replace("format = 1", "format = 2"))
    assert any(p.startswith("format") for p in package.verify(str(d)))

    d = copy("extra")
    (d / "README").write_text("x")
    with pytest.raises(package.PackageError, match="extra README"):
        package.verify(str(d))

    d = copy("nfeat")
    m = package.load_toml(str(d / "model.toml"))
    m["feature"] = m["feature"][:-1]
    (d / "model.toml").write_text(package.dumps(m))
    assert any("is not float32 [1, 7]" in p for p in package.verify(str(d)))


def test_tar_package(packages, tmp_path):
    src, _ = packages["iforest"]
    tar = tmp_path / "pkg.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(src, arcname="synth-iforest")
    assert package.verify(str(tar)) == []


# --------------------------------------------------------------------------
# Evaluation with a known answer


def test_metrics_hand_worked():
    scores = np.zeros(100)
    labels = np.zeros(100, dtype=int)
    labels[40:60] = 1
    scores[40] = 0.9   # first row of the window: worth exactly tp = 1
    scores[45] = 0.7   # later in the same window: does not add for NAB
    scores[20] = 0.6   # false positive before any window: costs 0.11
    scores[70] = 0.3   # below the threshold
    r = evaluate.metrics(scores, labels, threshold=0.5)
    assert (r.alerts, r.tp, r.fp, r.fn) == (3, 2, 1, 18)
    assert r.precision == pytest.approx(2 / 3)
    assert r.recall == pytest.approx(0.1)
    assert r.f1 == pytest.approx(2 * (2 / 3) * 0.1 / (2 / 3 + 0.1))
    assert r.false_alarm_rate == pytest.approx(1 / 80)
    # NAB: null = -1 (one window missed), perfect = 1; at 0.5: 1 - 0.11.
    assert r.nab_at_threshold == pytest.approx(100 * (1 - 0.11 + 1) / 2)
    # NAB's best threshold detects only row 40 (0.9): raw 1.
    assert r.nab_threshold == 0.9 and r.nab_standard == pytest.approx(100.0)
    assert evaluate.label_runs(np.array([1, 1, 0, 1, 0, 0, 1])) == [(0, 1), (3, 3), (6, 6)]


def _identity_package(tmp_path):
    """A hand-made graph: score = the single feature; score01 = clamp(x)."""
    from onnx import TensorProto, helper

    node = helper.make_node("ReduceMean", ["input"], ["score"], axes=[1], keepdims=1)
    g = helper.make_graph(
        [node], "identity",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", 1])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx_path = tmp_path / "identity.onnx"
    onnx_path.write_bytes(model.SerializeToString())
    tmpl = tmp_path / "t.toml"
    tmpl.write_text("""format = 1
name = "identity"
version = "t-1"
kind = "other"
created_ms = 1764662400000

[onnx]
input = "input"
score = "score"

[window]
window_s = 60
step_s = 10

[score]
low = 0.0
high = 1.0
threshold = 0.5

[[feature]]
name = "host.x.mean_60s"
median = 0.1
low = 0.0
high = 0.3

[[selftest]]
input = [0.25]

[[selftest]]
input = [2.0]
""")
    return onnx_path, tmpl


def test_package_and_evaluate_cli_known_answer(tmp_path, capsys):
    onnx_path, tmpl = _identity_package(tmp_path)
    out = tmp_path / "pkg"
    assert cli.main(["package", "--onnx", str(onnx_path), "--manifest-template", str(tmpl),
                     "--out", str(out)]) == 0
    m = package.load_toml(str(out / "model.toml"))
    assert [t["input"] for t in m["selftest"]] == [[0.25], [2.0]]
    assert [t["score"] for t in m["selftest"]] == [0.25, 2.0]
    assert m["onnx"]["sha256"] == hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    assert cli.main(["verify", "--no-agent", str(out)]) == 0
    # 100 rows, window rows 40..59; x is the score01 itself.
    x = np.zeros(100)
    lab = np.zeros(100, dtype=int)
    lab[40:60] = 1
    x[40] = 0.9
    x[45] = 3.0   # clamps to 1
    x[20] = 0.6
    x[70] = 0.3
    csv_path = synth.write_export(tmp_path / "lab.csv", x.reshape(-1, 1),
                                  names=["host.x.mean_60s"], extra={"label": list(lab)})
    capsys.readouterr()
    assert cli.main(["evaluate", "--model", str(out), "--data", str(csv_path), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["tp"], r["fp"], r["fn"]) == (2, 1, 18)
    assert r["precision"] == pytest.approx(2 / 3) and r["recall"] == pytest.approx(0.1)
    assert r["nab_at_threshold"] == pytest.approx(94.5)
    assert cli.main(["evaluate", "--model", str(out), "--data", str(csv_path)]) == 0
    assert "precision 0.6667  recall 0.1000" in capsys.readouterr().out


# --------------------------------------------------------------------------
# Command line


def test_train_cli(healthy_csv, tmp_path, capsys):
    out = tmp_path / "web-pca"
    assert cli.main(["train", "--data", str(healthy_csv), "--kind", "pca", "--out", str(out),
                     "--features", r"sig[0-5]\."]) == 0
    text = capsys.readouterr().out
    assert "6 features" in text and "not matching --features" in text
    m = package.load_toml(str(out / "model.toml"))
    assert m["name"] == "web-pca" and len(m["feature"]) == 6
    assert package.verify(str(out)) == []


def test_bad_input_exits_2(healthy_csv, tmp_path, capsys):
    const = synth.write_export(tmp_path / "const.csv", np.ones((50, 2)),
                               names=["a.b.mean_5s", "a.c.mean_5s"])
    cases = [
        (["train", "--data", str(tmp_path / "nope.csv"), "--kind", "pca", "--out",
          str(tmp_path / "o1")], "nope.csv: No such file"),
        (["train", "--data", str(const), "--kind", "pca", "--out", str(tmp_path / "o2")],
         "no usable feature column"),
        (["train", "--data", str(healthy_csv), "--kind", "svm", "--out", str(tmp_path / "o3")],
         "unknown kind 'svm'"),
        (["train", "--data", str(healthy_csv), "--kind", "pca", "--out", str(tmp_path / "o4"),
          "--features", "("], "bad regular expression"),
        (["train", "--data", str(healthy_csv), "--kind", "pca", "--out", str(tmp_path / "o5"),
          "--name", "Bad Name"], "name:"),
        (["evaluate", "--model", str(tmp_path / "nothing"), "--data", str(healthy_csv)],
         "no such file"),
        (["verify", str(tmp_path / "nothing")], "no such file"),
        (["frobnicate"], "invalid choice"),
    ]
    for argv, msg in cases:
        with pytest.raises(SystemExit) if argv == ["frobnicate"] else _no_raise() as exc:
            rc = cli.main(argv)
        if argv == ["frobnicate"]:
            rc = exc.value.code
        err = capsys.readouterr().err
        assert rc == 2, (argv, err)
        assert msg in err, (argv, err)
    assert not (tmp_path / "o3").exists()


class _no_raise:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_verify_passes_the_agents_exit_code_through(packages, tmp_path, monkeypatch):
    src, _ = packages["iforest"]
    log = tmp_path / "argv"
    fake = tmp_path / "outpost"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {log}\nexit 3\n')
    fake.chmod(0o755)
    monkeypatch.setenv("OUTPOST_BIN", str(fake))
    assert cli.main(["verify", str(src)]) == 3
    assert log.read_text().splitlines() == ["model", "verify", str(src)]
    # A package onnxruntime refuses never reaches the agent.
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    (bad / "model.toml").write_text((bad / "model.toml").read_text().replace(
        "threshold = 0.5", "threshold = 2.0"))
    log.unlink()
    assert cli.main(["verify", str(bad)]) == 2
    assert not log.exists()
    # A wrong OUTPOST_BIN is an error, not a silently skipped check.
    monkeypatch.setenv("OUTPOST_BIN", str(tmp_path / "missing"))
    assert cli.main(["verify", str(src)]) == 2


def test_console_script_runs():
    exe = shutil.which("outpost-model", path=os.path.dirname(sys.executable))
    argv = [exe] if exe else [sys.executable, "-m", "outpost_model.cli"]
    r = subprocess.run(argv + ["--help"], capture_output=True, text=True, check=True)
    assert "train" in r.stdout and "evaluate" in r.stdout and "verify" in r.stdout
    for sub in ("train", "package", "evaluate", "verify"):
        r = subprocess.run(argv + [sub, "--help"], capture_output=True, text=True, check=True)
        assert "usage: outpost-model " + sub in r.stdout
