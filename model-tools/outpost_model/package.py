"""Model packages, format 1 (the contract in the repository's model spec):
a directory holding exactly ``model.onnx`` and ``model.toml``.

This module writes the manifest, computes the sha256 and the self-test
vectors with onnxruntime, and checks a package the way the agent will
(everything except loading the graph with tract).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tarfile
import tempfile
import time
from contextlib import contextmanager

import numpy as np
import onnx

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

FORMAT = 1
ONNX_FILE = "model.onnx"
MANIFEST_FILE = "model.toml"
KINDS = ("iforest", "autoencoder", "pca", "other")
NAME_RE = re.compile(r"^[a-z0-9._-]{1,64}$")
VERSION_RE = re.compile(r"^\S{1,64}$")
FEATURE_RE = re.compile(r"^\S+\.(mean|min|max|std|last|slope)_(\d+)s$")
DEFAULT_TOLERANCE = 1e-4
#: The self-test tolerance is absolute (spec), but f32 sums of large values
#: differ between runtimes by a few ulps of the largest value (an outlier
#: row's contributions can be 1e7, where one ulp is 1): the tolerance of a
#: self-test is raised to this share of its largest expected value.
REL_TOLERANCE = 1e-5


class PackageError(Exception):
    """A package or manifest that breaks the format, or bad arguments."""


# --------------------------------------------------------------------------
# TOML


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if not math.isfinite(v):
            raise PackageError(f"non-finite number {v} in manifest")
        text = repr(v)
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # JSON escapes are TOML basic-string escapes
    if isinstance(v, (list, tuple, np.ndarray)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise PackageError(f"cannot write {type(v).__name__} to TOML")


def dumps(manifest: dict) -> str:
    """The manifest as TOML, in the spec's order: top-level keys, [onnx],
    [window], [score], then [[feature]] and [[selftest]] arrays."""
    out = []
    tables, arrays = [], []
    for k, v in manifest.items():
        if isinstance(v, dict):
            tables.append((k, v))
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            arrays.append((k, v))
        else:
            out.append(f"{k} = {_value(v)}")
    for k, t in tables:
        out += ["", f"[{k}]"] + [f"{kk} = {_value(vv)}" for kk, vv in t.items()]
    for k, items in arrays:
        for t in items:
            out += ["", f"[[{k}]]"] + [f"{kk} = {_value(vv)}" for kk, vv in t.items()]
    return "\n".join(out) + "\n"


def load_toml(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise PackageError(f"{path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise PackageError(f"{path}: {e}") from None


# --------------------------------------------------------------------------
# Running a graph


def session(onnx_bytes: bytes):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])


def run(sess, manifest: dict, X: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Raw scores [rows] and contributions [rows, N] (or None), one row at a
    time with batch 1, as the agent runs the graph."""
    o = manifest["onnx"]
    names = [o["score"]] + ([o["contributions"]] if o.get("contributions") else [])
    X = np.asarray(X, dtype=np.float32)
    scores = np.empty(len(X), dtype=np.float64)
    contribs = np.empty(X.shape, dtype=np.float64) if len(names) == 2 else None
    for i in range(len(X)):
        res = sess.run(names, {o["input"]: X[i:i + 1]})
        scores[i] = float(np.asarray(res[0]).reshape(-1)[0])
        if contribs is not None:
            contribs[i] = np.asarray(res[1]).reshape(-1)
    return scores, contribs


def run_batch(sess, manifest: dict, X: np.ndarray) -> np.ndarray:
    """Raw scores of many rows at once (the graphs have a dynamic batch)."""
    o = manifest["onnx"]
    out = sess.run([o["score"]], {o["input"]: np.asarray(X, dtype=np.float32)})[0]
    return np.asarray(out, dtype=np.float64).reshape(len(X), -1)[:, 0]


def score01(raw: np.ndarray, manifest: dict) -> np.ndarray:
    """The agent's mapping of raw scores to [0, 1]."""
    lo, hi = manifest["score"]["low"], manifest["score"]["high"]
    return np.clip((np.asarray(raw, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)


def calibrate(healthy_raw: np.ndarray, false_alarm_rate: float, higher_is_anomalous: bool):
    """``score.low`` = median healthy raw score; the raw threshold is the
    healthy quantile at the false-alarm rate; ``score.high`` puts that
    threshold at score01 = 0.5. Returns (low, high, raw_threshold)."""
    if not 0 < false_alarm_rate < 0.5:
        raise PackageError("--false-alarm-rate must be in (0, 0.5)")
    raw = np.asarray(healthy_raw, dtype=np.float64)
    low = float(np.median(raw))
    q = 1.0 - false_alarm_rate if higher_is_anomalous else false_alarm_rate
    t = float(np.quantile(raw, q))
    high = low + 2.0 * (t - low)
    if not (high > low if higher_is_anomalous else high < low):
        raise PackageError("the healthy scores do not spread: cannot place a threshold "
                           "(more, or more varied, training data needed)")
    return low, high, t


# --------------------------------------------------------------------------
# Writing


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def f32(x) -> float:
    """x rounded to f32, as a Python float (its repr round-trips exactly)."""
    return float(np.float32(x))


def default_selftest_inputs(manifest: dict) -> np.ndarray:
    """From the feature ranges: median, 1st and 99th percentile rows, and one
    outlier row far above the healthy range (5 spans above the 99th
    percentile)."""
    feats = manifest["feature"]
    med = np.array([f["median"] for f in feats], dtype=np.float64)
    lo = np.array([f["low"] for f in feats], dtype=np.float64)
    hi = np.array([f["high"] for f in feats], dtype=np.float64)
    span = np.maximum(hi - lo, np.abs(med) * 0.1 + 1.0)
    return np.vstack([med, lo, hi, (med + hi) / 2, hi + 5.0 * span])


def prepare_out_dir(out: str) -> None:
    """Creates ``out``; refuses one holding anything but a package's files
    (a package holds exactly two files)."""
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise PackageError(f"{out}: exists and is not a directory")
        extra = sorted(set(os.listdir(out)) - {ONNX_FILE, MANIFEST_FILE})
        if extra:
            raise PackageError(f"{out}: not empty ({', '.join(extra[:5])}); a package "
                               "directory holds only model.onnx and model.toml")
    os.makedirs(out, exist_ok=True)


def write_package(out: str, model: onnx.ModelProto | bytes, manifest: dict,
                  selftest_inputs: np.ndarray | None = None,
                  tolerance: float = DEFAULT_TOLERANCE) -> dict:
    """Writes ``out/model.onnx`` and ``out/model.toml``: fills in
    ``[onnx].file``/``sha256`` and computes one ``[[selftest]]`` per input row
    with onnxruntime. ``manifest`` holds everything else. Returns the final
    manifest."""
    data = model if isinstance(model, bytes) else model.SerializeToString()
    manifest = dict(manifest)
    manifest["format"] = FORMAT
    manifest.setdefault("created_ms", int(time.time() * 1000))
    given = {k: v for k, v in manifest.get("onnx", {}).items() if k not in ("file", "sha256")}
    manifest["onnx"] = {"file": ONNX_FILE, "sha256": hashlib.sha256(data).hexdigest(), **given}
    manifest.pop("selftest", None)
    problems = check_manifest(manifest, data, check_selftests=False)
    if problems:
        raise PackageError("; ".join(problems))
    if selftest_inputs is None:
        selftest_inputs = default_selftest_inputs(manifest)
    X = np.array([[f32(v) for v in row] for row in np.asarray(selftest_inputs)])
    if X.ndim != 2 or X.shape[1] != len(manifest["feature"]) or len(X) == 0:
        raise PackageError(f"self-test inputs must be rows of {len(manifest['feature'])} values")
    if not np.isfinite(X).all():
        raise PackageError("self-test inputs must be finite")
    scores, contribs = run(session(data), manifest, X)
    tests = []
    for i, row in enumerate(X):
        if not math.isfinite(scores[i]) or (contribs is not None
                                            and not np.isfinite(contribs[i]).all()):
            raise PackageError(f"self-test row {i}: the model's output is not finite")
        t = {"input": [float(v) for v in row], "score": f32(scores[i])}
        if contribs is not None:
            t["contributions"] = [f32(v) for v in contribs[i]]
        magnitude = max([abs(t["score"])] + [abs(v) for v in t.get("contributions", [])])
        t["tolerance"] = max(float(tolerance), float(f"{REL_TOLERANCE * magnitude * 1.01:.2e}"))
        tests.append(t)
    manifest["selftest"] = tests
    prepare_out_dir(out)
    with open(os.path.join(out, ONNX_FILE), "wb") as f:
        f.write(data)
    text = dumps(manifest)
    tmp = os.path.join(out, MANIFEST_FILE + ".partial")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(out, MANIFEST_FILE))
    return manifest


# --------------------------------------------------------------------------
# Checking


def _io(model: onnx.ModelProto):
    def dims(vi):
        t = vi.type.tensor_type
        return (t.elem_type, [d.dim_value if d.HasField("dim_value") else None
                              for d in t.shape.dim])
    return ({i.name: dims(i) for i in model.graph.input},
            {o.name: dims(o) for o in model.graph.output})


def check_manifest(m: dict, onnx_bytes: bytes, check_selftests: bool = True) -> list[str]:
    """Every rule of format 1 that can be checked without tract; [] if ok."""
    p = []

    def need(table, key, types, where=None):
        where = where or key
        if not isinstance(table, dict) or key not in table:
            p.append(f"{where}: missing")
            return None
        v = table[key]
        if not isinstance(v, types) or isinstance(v, bool) and bool not in (
                types if isinstance(types, tuple) else (types,)):
            p.append(f"{where}: wrong type {type(v).__name__}")
            return None
        return v

    num = (int, float)
    if m.get("format") != FORMAT:
        p.append(f"format: {m.get('format')!r}, only {FORMAT} is understood")
    name = need(m, "name", str)
    if name is not None and not NAME_RE.match(name):
        p.append(f"name: {name!r} is not [a-z0-9._-]{{1,64}}")
    version = need(m, "version", str)
    if version is not None and not VERSION_RE.match(version):
        p.append(f"version: {version!r} must be 1..64 characters without whitespace")
    kind = need(m, "kind", str)
    if kind is not None and kind not in KINDS:
        p.append(f"kind: {kind!r} is not one of {', '.join(KINDS)}")
    need(m, "created_ms", int)
    if "description" in m and not isinstance(m["description"], str):
        p.append("description: must be text")
    o = need(m, "onnx", dict) or {}
    if o:
        if o.get("file") != ONNX_FILE:
            p.append(f"onnx.file: must be {ONNX_FILE!r}")
        sha = need(o, "sha256", str, "onnx.sha256")
        if sha is not None and sha != hashlib.sha256(onnx_bytes).hexdigest():
            p.append("onnx.sha256: does not match model.onnx")
        for k in ("input", "score"):
            need(o, k, str, f"onnx.{k}")
        if "contributions" in o and not isinstance(o["contributions"], str):
            p.append("onnx.contributions: must be text")
    w = need(m, "window", dict) or {}
    for k in ("window_s", "step_s"):
        v = need(w, k, int, f"window.{k}") if w else None
        if v is not None and v <= 0:
            p.append(f"window.{k}: must be positive")
    s = need(m, "score", dict) or {}
    if s:
        lo, hi = need(s, "low", num, "score.low"), need(s, "high", num, "score.high")
        th = need(s, "threshold", num, "score.threshold")
        if lo is not None and hi is not None and lo == hi:
            p.append("score: low == high")
        if th is not None and not 0 < th <= 1:
            p.append("score.threshold: must be in (0, 1]")
    feats = need(m, "feature", list) or []
    if not feats:
        p.append("feature: at least one [[feature]] is needed")
    for i, f in enumerate(feats):
        where = f"feature[{i}]"
        if not isinstance(f, dict):
            p.append(f"{where}: not a table")
            continue
        fname = need(f, "name", str, f"{where}.name")
        if fname is not None:
            mm = FEATURE_RE.match(fname)
            if not mm:
                p.append(f"{where}.name: {fname!r} is not an outpost feature name "
                         "(SIGNAL.STAT_Ns)")
            elif w.get("window_s") is not None and int(mm.group(2)) != w.get("window_s"):
                p.append(f"{where}.name: {fname!r} is not over window.window_s")
        vals = [need(f, k, num, f"{where}.{k}") for k in ("median", "low", "high")]
        if all(v is not None for v in vals):
            if not all(math.isfinite(v) for v in vals):
                p.append(f"{where}: median/low/high must be finite")
    names = [f.get("name") for f in feats if isinstance(f, dict)]
    if len(set(names)) != len(names):
        p.append("feature: duplicate names")
    n = len(feats)
    # The graph.
    try:
        model = onnx.load_from_string(onnx_bytes)
        onnx.checker.check_model(model)
    except Exception as e:  # noqa: BLE001 - any parse failure is the package's
        p.append(f"model.onnx: not a valid ONNX model: {e}")
        return p
    ins, outs = _io(model)
    if len(ins) != 1:
        p.append(f"model.onnx: {len(ins)} inputs, format 1 takes exactly one")
    if o.get("input") in ins:
        et, d = ins[o["input"]]
        if et != onnx.TensorProto.FLOAT or len(d) != 2 or d[0] not in (None, 1) or d[1] != n:
            p.append(f"model.onnx: input {o['input']!r} is not float32 [1, {n}]")
    elif o.get("input"):
        p.append(f"model.onnx: no input named {o['input']!r}")
    if o.get("score") in outs:
        et, d = outs[o["score"]]
        if et != onnx.TensorProto.FLOAT or d not in ([None, 1], [1, 1], [None], [1]):
            p.append(f"model.onnx: output {o['score']!r} is not float32 [1, 1] or [1]")
    elif o.get("score"):
        p.append(f"model.onnx: no output named {o['score']!r}")
    c = o.get("contributions")
    if c:
        if c in outs:
            et, d = outs[c]
            if et != onnx.TensorProto.FLOAT or len(d) != 2 or d[0] not in (None, 1) or d[1] != n:
                p.append(f"model.onnx: output {c!r} is not float32 [1, {n}]")
        else:
            p.append(f"model.onnx: no output named {c!r}")
    if not check_selftests or p:
        return p
    tests = m.get("selftest")
    if not isinstance(tests, list) or not tests:
        p.append("selftest: at least one [[selftest]] is needed")
        return p
    try:
        sess = session(onnx_bytes)
    except Exception as e:  # noqa: BLE001
        p.append(f"model.onnx: onnxruntime cannot load it: {e}")
        return p
    for i, t in enumerate(tests):
        where = f"selftest[{i}]"
        x = t.get("input") if isinstance(t, dict) else None
        if not isinstance(x, list) or len(x) != n:
            p.append(f"{where}.input: must be {n} numbers")
            continue
        tol = t.get("tolerance", DEFAULT_TOLERANCE)
        exp = t.get("score")
        if not isinstance(exp, num) or not isinstance(tol, num) or tol < 0:
            p.append(f"{where}: score and tolerance must be numbers")
            continue
        score, contribs = run(sess, m, np.array([x]))
        if not abs(score[0] - exp) <= tol:
            p.append(f"{where}: score {score[0]:.9g}, expected {exp:.9g} (tolerance {tol:g})")
        if c:
            ec = t.get("contributions")
            if not isinstance(ec, list) or len(ec) != n:
                p.append(f"{where}.contributions: must be {n} numbers")
            else:
                diff = np.abs(contribs[0] - np.array(ec, dtype=np.float64))
                if not (diff <= tol).all():
                    j = int(np.argmax(diff))
                    p.append(f"{where}.contributions[{j}]: {contribs[0][j]:.9g}, expected "
                             f"{ec[j]:.9g} (tolerance {tol:g})")
        elif "contributions" in t:
            p.append(f"{where}.contributions: set but the manifest names no contributions output")
    return p


@contextmanager
def opened(path: str):
    """A package directory, or a ``.tar`` of one unpacked to a temporary
    directory. Yields the directory."""
    if os.path.isdir(path):
        yield path
        return
    if not os.path.exists(path):
        raise PackageError(f"{path}: no such file or directory")
    if not tarfile.is_tarfile(path):
        raise PackageError(f"{path}: neither a package directory nor a .tar of one")
    tmp = tempfile.mkdtemp(prefix="outpost-model-")
    try:
        with tarfile.open(path) as tf:
            members = [mm for mm in tf.getmembers() if mm.name not in (".", "./")]
            files = [mm for mm in members if mm.isfile()]
            bad = [mm.name for mm in members if not (mm.isfile() or mm.isdir())]
            if bad:
                raise PackageError(f"{path}: not plain files: {', '.join(bad[:5])}")
            dirs = {os.path.dirname(os.path.normpath(mm.name)) for mm in files}
            if len(dirs) != 1:
                raise PackageError(f"{path}: files must share one directory")
            for mm in files:
                target = os.path.join(tmp, os.path.basename(mm.name))
                with tf.extractfile(mm) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load(path: str) -> tuple[dict, bytes]:
    """The manifest and the graph bytes of a package directory."""
    present = set(os.listdir(path))
    if present != {ONNX_FILE, MANIFEST_FILE}:
        missing = {ONNX_FILE, MANIFEST_FILE} - present
        extra = present - {ONNX_FILE, MANIFEST_FILE}
        parts = []
        if missing:
            parts.append("missing " + ", ".join(sorted(missing)))
        if extra:
            parts.append("extra " + ", ".join(sorted(extra)))
        raise PackageError(f"{path}: a package holds exactly model.onnx and model.toml: "
                           + "; ".join(parts))
    m = load_toml(os.path.join(path, MANIFEST_FILE))
    with open(os.path.join(path, ONNX_FILE), "rb") as f:
        return m, f.read()


def verify(path: str) -> list[str]:
    """All problems of a package (directory or .tar); [] if it is good."""
    with opened(path) as d:
        m, data = load(d)
        return check_manifest(m, data)
