"""Synthetic `outpost export`-shaped data for the model-tools tests."""

import csv

import numpy as np

N_SIGNALS = 8
NAMES = [f"host.sig{i}.mean_60s" for i in range(N_SIGNALS)]
T0_MS = 1_764_662_400_000
STEP_MS = 10_000


def healthy(rows, seed):
    """Correlated healthy features: two latent factors mixed into 8 signals
    plus noise, on different scales (as real host signals are)."""
    rs = np.random.RandomState(seed)
    mix = np.random.RandomState(1234).randn(2, N_SIGNALS)  # same mixing for every call
    latent = rs.randn(rows, 2)
    scale = np.array([1, 10, 100, 0.1, 5, 50, 2, 1000.0])
    return (latent @ mix + 0.2 * rs.randn(rows, N_SIGNALS)) * scale + 3 * scale


def inject(X, seed, windows=5, width=20):
    """Shifts six of the eight features by 6 sigma (random signs) in
    ``windows`` windows, as a fault moves most statistics of the signals it
    touches; returns (X, labels). (An IsolationForest hardly tells a point
    just outside the healthy range on two or three axes from a healthy
    edge point, so a narrower fault would test the forest's limits, not the
    tooling.)"""
    rs = np.random.RandomState(seed)
    X = X.copy()
    labels = np.zeros(len(X), dtype=int)
    sd = X.std(axis=0)
    starts = np.linspace(len(X) * 0.25, len(X) - width - 1, windows).astype(int)
    for s in starts:
        cols = rs.choice(N_SIGNALS, 6, replace=False)
        X[s:s + width, cols] += 6 * sd[cols] * rs.choice([-1, 1], 6)
        labels[s:s + width] = 1
    return X, labels


def write_export(path, X, names=NAMES, extra=None, t0=T0_MS):
    """Writes X like `outpost export` does: ts_ms, then the feature columns;
    ``extra`` maps further column names to per-row values (None = empty)."""
    extra = extra or {}
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ts_ms"] + list(names) + list(extra))
        for i, row in enumerate(X):
            cells = [repr(float(np.float32(v))) for v in row]
            for col in extra.values():
                v = col[i]
                cells.append("" if v is None else str(v))
            w.writerow([t0 + i * STEP_MS] + cells)
    return path
