"""Training the three detector kinds on healthy history."""

from __future__ import annotations

import os
import re
import time
import warnings
from dataclasses import dataclass

import numpy as np

from . import data, graphs, package

KINDS = ("iforest", "autoencoder", "pca")
#: The chronological tail held out of fitting; its false-alarm rate at the
#: chosen threshold is reported as an honest estimate.
HOLDOUT = 0.2
SEED = 0


@dataclass
class Fitted:
    kind: str
    onnx: object  # onnx.ModelProto
    higher_is_anomalous: bool
    contributions: bool


def fit(kind: str, X: np.ndarray, seed: int = SEED) -> Fitted:
    """Fits a detector of ``kind`` on rows ``X`` (float64, no NaN) and builds
    its ONNX graph."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.preprocessing import StandardScaler

    n = X.shape[1]
    X32 = X.astype(np.float32)
    if kind == "iforest":
        from sklearn.ensemble import IsolationForest

        model = IsolationForest(n_estimators=100, max_samples=min(256, len(X)),
                                random_state=seed).fit(X32)
        return Fitted(kind, graphs.iforest_onnx(model, n), False, False)
    scaler = StandardScaler().fit(X32)
    Z = scaler.transform(X32)
    if kind == "autoencoder":
        from sklearn.neural_network import MLPRegressor

        h1, h2 = max(2, n // 2), max(1, n // 4)
        mlp = MLPRegressor(hidden_layer_sizes=(h1, h2, h1), activation="tanh", alpha=1e-4,
                           learning_rate_init=1e-3, max_iter=300, tol=1e-5,
                           n_iter_no_change=20, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            mlp.fit(Z, Z)
        return Fitted(kind, graphs.autoencoder_onnx(scaler, mlp, n), True, True)
    if kind == "pca":
        from sklearn.decomposition import PCA

        if n < 2:
            raise data.DataError("pca needs at least 2 features")
        full = PCA(svd_solver="full").fit(Z)
        k = int(np.searchsorted(np.cumsum(full.explained_variance_ratio_), 0.95) + 1)
        k = max(1, min(k, n - 1, len(Z) - 1))  # keep a residual to score
        pca = PCA(n_components=k, svd_solver="full").fit(Z)
        return Fitted(kind, graphs.pca_onnx(scaler, pca, n), True, True)
    raise data.DataError(f"unknown kind {kind!r} (one of {', '.join(KINDS)})")


def default_name(out: str, kind: str) -> str:
    base = re.sub(r"[^a-z0-9._-]+", "-", os.path.basename(os.path.normpath(out)).lower())
    base = base.strip("-")[:64]
    return base or kind


def default_version() -> str:
    return time.strftime("%Y.%m.%d-%H%M%S", time.gmtime())


@dataclass
class Trained:
    manifest: dict
    selection: data.Selection
    raw_threshold: float
    holdout_rows: int
    holdout_alarms: int


def train(data_path: str, kind: str, out: str, features: str | None = None,
          false_alarm_rate: float = 0.001, name: str | None = None,
          version: str | None = None, window_s: int | None = None,
          step_s: int | None = None, seed: int = SEED) -> Trained:
    if kind not in KINDS:
        raise data.DataError(f"unknown kind {kind!r} (one of {', '.join(KINDS)})")
    if not 0 < false_alarm_rate < 0.5:
        raise data.DataError("--false-alarm-rate must be in (0, 0.5)")
    table = data.read_table(data_path)
    sel = data.select_features(table, features)
    order = np.argsort(sel.ts, kind="stable")
    X, ts = sel.X[order], sel.ts[order]
    if len(X) < 20:
        raise data.DataError(f"{data_path}: {len(X)} complete rows; at least 20 are needed")
    window_s = window_s or data.window_of(sel.names)
    if window_s is None:
        raise data.DataError("cannot tell the feature window from the column names "
                             "(SIGNAL.STAT_Ns); give --window-s")
    step_s = step_s or data.step_of(ts)
    if step_s is None:
        raise data.DataError("cannot tell the step from the time stamps; give --step-s")
    n_fit = len(X) - max(1, int(len(X) * HOLDOUT))
    fitted = fit(kind, X[:n_fit], seed)
    sess = package.session(fitted.onnx.SerializeToString())
    m = {"onnx": {"input": graphs.INPUT, "score": graphs.SCORE}}
    if fitted.contributions:
        m["onnx"]["contributions"] = graphs.CONTRIBUTIONS
    raw = package.run_batch(sess, m, X)
    low, high, t = package.calibrate(raw, false_alarm_rate, fitted.higher_is_anomalous)
    held = raw[n_fit:]
    alarms = int((held >= t).sum() if fitted.higher_is_anomalous else (held <= t).sum())
    manifest = {
        "format": package.FORMAT,
        "name": name or default_name(out, kind),
        "version": version or default_version(),
        "kind": kind,
        "created_ms": int(time.time() * 1000),
        "description": (f"{kind} on {len(sel.names)} features, {len(X)} healthy rows of "
                        f"{os.path.basename(data_path)}, false-alarm rate {false_alarm_rate:g}"),
        "onnx": m["onnx"],
        "window": {"window_s": int(window_s), "step_s": int(step_s)},
        "score": {"low": package.f32(low), "high": package.f32(high), "threshold": 0.5},
        "feature": [
            {"name": nm, "median": float(np.median(X[:, j])),
             "low": float(np.percentile(X[:, j], 1)), "high": float(np.percentile(X[:, j], 99))}
            for j, nm in enumerate(sel.names)
        ],
    }
    # Self-tests: five healthy rows spread over the history, and one outlier.
    picks = X[np.linspace(0, len(X) - 1, 5).round().astype(int)]
    outlier = package.default_selftest_inputs(manifest)[-1:]
    final = package.write_package(out, fitted.onnx, manifest, np.vstack([picks, outlier]))
    return Trained(final, sel, t, len(held), alarms)
