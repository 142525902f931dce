#!/usr/bin/env python3
"""Regenerate the ONNX operator parity fixtures in agent/tests/fixtures/onnx/.

Each fixture is NAME.onnx plus NAME.json: the input name, a list of f32 input
rows (edge values included; non-finite numbers are written as the strings
"nan", "inf", "-inf") and, for every row, onnxruntime's value of every model
output. agent/tests/onnx_parity.rs loads each model under tract with outpost's
extra operators and checks it reproduces those outputs.

Models: skl2onnx exports of scikit-learn's IsolationForest, StandardScaler +
MLPRegressor, RobustScaler + MLPRegressor, PCA and a bare MLPRegressor, all
fitted on seeded random data; plus hand-built TreeEnsembleRegressor and
LabelEncoder graphs that exercise what skl2onnx does not emit (every branch
mode, missing-value tracks, several targets, each aggregate function, base
values).

Usage (in a venv with scikit-learn, skl2onnx, onnxruntime, onnx and numpy):
    python model-tools/scripts/make_op_fixtures.py [OUT_DIR]
"""

import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from skl2onnx import to_onnx
from sklearn.decomposition import PCA
from sklearn.ensemble import IsolationForest
from sklearn.neural_network import MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import RobustScaler, StandardScaler

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "agent" / "tests" / "fixtures" / "onnx"
N_FEATURES = 5
OPSET = {"": 17, "ai.onnx.ml": 3}


def encode(v):
    v = float(v)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return v


def edge_rows(rng, x_train, thresholds=()):
    """Typical rows, far outliers, zeros, signed zero, tiny values and, when
    given, rows sitting exactly on split thresholds."""
    rows = [x_train[i] for i in range(0, 8)]
    rows += list(rng.normal(size=(4, N_FEATURES)) * 4.0)
    rows.append(np.zeros(N_FEATURES))
    rows.append(np.full(N_FEATURES, -0.0))
    rows.append(np.full(N_FEATURES, 1e-30))
    rows.append(np.full(N_FEATURES, 1e6))
    rows.append(np.full(N_FEATURES, -1e6))
    rows.append(np.array([1e3, -1e3, 3.5, -7.25, 0.5])[:N_FEATURES])
    th = list(thresholds)
    for k in range(min(4, len(th) // N_FEATURES)):
        rows.append(np.array(th[k * N_FEATURES:(k + 1) * N_FEATURES]))
    return np.array(rows, dtype=np.float32)


def tree_thresholds(model_proto):
    """Split values of the first TreeEnsembleRegressor, by feature, so edge rows
    can sit exactly on a split."""
    for node in model_proto.graph.node:
        if node.op_type == "TreeEnsembleRegressor":
            attrs = {a.name: a for a in node.attribute}
            feats = list(attrs["nodes_featureids"].ints)
            vals = list(attrs["nodes_values"].floats)
            modes = [m.decode() for m in attrs["nodes_modes"].strings]
            per_feature = {f: [] for f in range(N_FEATURES)}
            for f, v, m in zip(feats, vals, modes):
                if m != "LEAF":
                    per_feature[f].append(v)
            out = []
            for k in range(4):
                for f in range(N_FEATURES):
                    vs = per_feature[f]
                    out.append(vs[k % len(vs)] if vs else 0.0)
            return out
    return []


def write_fixture(out_dir, name, model_proto, rows, note):
    onnx.checker.check_model(model_proto)
    data = model_proto.SerializeToString()
    (out_dir / f"{name}.onnx").write_bytes(data)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    input_name = sess.get_inputs()[0].name
    output_names = [o.name for o in sess.get_outputs()]
    cases = []
    for row in rows:
        feed = {input_name: row.reshape(1, -1).astype(np.float32)}
        results = sess.run(output_names, feed)
        cases.append(
            {
                "input": [encode(v) for v in row],
                "outputs": {
                    n: [encode(v) for v in np.asarray(r).ravel()]
                    for n, r in zip(output_names, results)
                },
            }
        )
    doc = {
        "model": f"{name}.onnx",
        "note": note,
        "input": input_name,
        "features": int(rows.shape[1]),
        "outputs": output_names,
        "onnxruntime": ort.__version__,
        "cases": cases,
    }
    (out_dir / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{name}: {len(data)} bytes, {len(cases)} cases, outputs {output_names}")


def hand_tree(aggregate, n_targets=2, base_values=(0.5, -1.0)):
    """Two trees over three features using every branch mode, missing-value
    tracks in both directions, several weights per leaf and two targets."""
    modes = [
        # tree 0
        "BRANCH_LEQ", "BRANCH_LT", "BRANCH_GTE", "LEAF", "LEAF", "LEAF", "LEAF",
        # tree 1
        "BRANCH_GT", "BRANCH_EQ", "BRANCH_NEQ", "LEAF", "LEAF", "LEAF", "LEAF",
    ]
    tree_ids = [0] * 7 + [1] * 7
    node_ids = list(range(7)) + list(range(7))
    feature_ids = [0, 1, 2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 0]
    values = [0.5, -1.0, 2.0, 0, 0, 0, 0, 1.5, 3.0, -2.0, 0, 0, 0, 0]
    true_ids = [1, 3, 5, 0, 0, 0, 0, 1, 3, 5, 0, 0, 0, 0]
    false_ids = [2, 4, 6, 0, 0, 0, 0, 2, 4, 6, 0, 0, 0, 0]
    missing = [1, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0]
    t_tree, t_node, t_id, t_w = [], [], [], []
    weights = {
        (0, 3): [(0, 1.0), (1, -0.5)],
        (0, 4): [(0, 2.0)],
        (0, 5): [(0, -3.0), (1, 4.0), (1, 0.25)],
        (0, 6): [(1, 1.5)],
        (1, 3): [(0, 0.75), (1, 0.125)],
        (1, 4): [(0, -1.25)],
        (1, 5): [(1, 2.5)],
        (1, 6): [(0, 5.0), (1, -2.0)],
    }
    for (tree, node), ws in weights.items():
        for target, w in ws:
            if target < n_targets:
                t_tree.append(tree)
                t_node.append(node)
                t_id.append(target)
                t_w.append(w)
    attrs = dict(
        n_targets=n_targets,
        nodes_treeids=tree_ids,
        nodes_nodeids=node_ids,
        nodes_featureids=feature_ids,
        nodes_values=values,
        nodes_modes=modes,
        nodes_truenodeids=true_ids,
        nodes_falsenodeids=false_ids,
        nodes_missing_value_tracks_true=missing,
        target_treeids=t_tree,
        target_nodeids=t_node,
        target_ids=t_id,
        target_weights=t_w,
        aggregate_function=aggregate,
        post_transform="NONE",
    )
    if base_values is not None:
        attrs["base_values"] = list(base_values)[:n_targets]
    node = helper.make_node(
        "TreeEnsembleRegressor", ["X"], ["Y"], domain="ai.onnx.ml", **attrs
    )
    graph = helper.make_graph(
        [node],
        f"tree_{aggregate.lower()}",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", n_targets])],
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)],
    )


def hand_tree_rows():
    v = [0.5, -1.0, 2.0, 1.5, 3.0, -2.0]
    rows = [
        [0.0, 0.0, 0.0],
        [0.5, -1.0, 2.0],  # on the tree 0 thresholds
        [0.6, -1.0, 2.0],
        [0.4, -1.1, 1.9],
        [1.0, 1.5, 3.0],  # on the tree 1 thresholds
        [-2.0, 1.6, 3.0],
        [-2.0, 1.5, 2.9],
        [nan := float("nan"), 0.0, 0.0],  # missing: tracks true
        [0.0, nan, 0.0],  # missing on LT (false) and GT (false)
        [1.0, 0.0, nan],  # missing on GTE (true) and EQ (true)
        [nan, nan, nan],
        [float("inf"), float("-inf"), 1e6],
        [-0.0, -0.0, -0.0],
    ]
    rng = np.random.default_rng(7)
    for _ in range(6):
        rows.append([float(rng.choice(v) + rng.choice([-0.25, 0.0, 0.25])) for _ in range(3)])
    return np.array(rows, dtype=np.float32)


def label_encoder_model():
    """int64 -> float LabelEncoder as skl2onnx's IsolationForest uses it,
    with a default for unknown keys, behind a Cast from the float input."""
    cast = helper.make_node("Cast", ["X"], ["Xi"], to=TensorProto.INT64)
    enc = helper.make_node(
        "LabelEncoder",
        ["Xi"],
        ["Y"],
        domain="ai.onnx.ml",
        keys_int64s=[0, 1, 2, 5, -3],
        values_floats=[10.0, 11.5, -2.25, 1e3, 0.0],
        default_float=-7.0,
    )
    graph = helper.make_graph(
        [cast, enc],
        "label_encoder",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 4])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 2)],
    )
    rows = np.array(
        [[0, 1, 2, 5], [-3, 4, 6, 0], [1.7, 2.2, -3.0, 100.0], [-1, -2, 5, 5]],
        dtype=np.float32,
    )
    return model, rows


def main():
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    out_dir.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore")
    rng = np.random.default_rng(20261202)
    # Correlated features, like host metrics (cpu, load, memory, io, latency).
    mix = rng.normal(size=(N_FEATURES, N_FEATURES)) * 0.5 + np.eye(N_FEATURES)
    x = (rng.normal(size=(400, N_FEATURES)) @ mix + np.array([40, 1.5, 60, 5, 20])).astype(
        np.float32
    )
    y = (x[:, 0] * 0.3 - x[:, 2] * 0.1 + np.sin(x[:, 1])).astype(np.float32)
    sample = x[:1]

    iforest = IsolationForest(n_estimators=16, max_samples=64, random_state=3).fit(x)
    proto = to_onnx(iforest, sample, target_opset=OPSET)
    rows = edge_rows(rng, x, tree_thresholds(proto))
    rows = np.concatenate([rows, np.array([[np.nan, 40, 60, 5, 20]], dtype=np.float32)])
    write_fixture(out_dir, "iforest", proto, rows, "IsolationForest, 16 trees, max_samples 64")

    def mlp(hidden):
        return MLPRegressor(hidden_layer_sizes=hidden, max_iter=300, random_state=5)

    pipe = make_pipeline(StandardScaler(), mlp((16, 8))).fit(x, y)
    rows = edge_rows(rng, x)
    write_fixture(
        out_dir,
        "standard_mlp",
        to_onnx(pipe, sample, target_opset=OPSET),
        rows,
        "StandardScaler + MLPRegressor (16, 8)",
    )
    pipe = make_pipeline(RobustScaler(), mlp((8,))).fit(x, y)
    write_fixture(
        out_dir,
        "robust_mlp",
        to_onnx(pipe, sample, target_opset=OPSET),
        rows,
        "RobustScaler + MLPRegressor (8,)",
    )
    pca = PCA(n_components=3, random_state=0).fit(x)
    write_fixture(out_dir, "pca", to_onnx(pca, sample, target_opset=OPSET), rows, "PCA, 3 components")
    bare = mlp((12,)).fit((x - x.mean(0)) / x.std(0), y)
    write_fixture(
        out_dir,
        "mlp",
        to_onnx(bare, sample, target_opset=OPSET),
        (rows - x.mean(0)) / x.std(0),
        "bare MLPRegressor (12,)",
    )

    trows = hand_tree_rows()
    for agg in ["SUM", "AVERAGE", "MIN", "MAX"]:
        write_fixture(
            out_dir,
            f"tree_{agg.lower()}",
            hand_tree(agg),
            trows,
            f"hand-built TreeEnsembleRegressor: every mode, missing tracks, 2 targets, {agg}, base values",
        )
    write_fixture(
        out_dir,
        "tree_one_target",
        hand_tree("SUM", n_targets=1, base_values=None),
        trows,
        "hand-built TreeEnsembleRegressor: 1 target, no base values",
    )
    model, rows = label_encoder_model()
    write_fixture(out_dir, "label_encoder", model, rows, "LabelEncoder int64 -> float with default")


if __name__ == "__main__":
    main()
