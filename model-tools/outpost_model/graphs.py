"""ONNX graphs of the three detector kinds, built from fitted scikit-learn
models with plain ONNX operators (opset 17; ``ai.onnx.ml`` 3 only for the
IsolationForest's trees).

Every graph has one input ``input`` float32 ``[batch, N]`` (batch dynamic)
and a raw ``score`` output float32 ``[batch, 1]``; the autoencoder and PCA
graphs also have ``contributions`` float32 ``[batch, N]``.

Why not skl2onnx's IsolationForest converter: it computes leaf indices with
``TreeEnsembleRegressor``, maps them to path lengths with ``LabelEncoder``
and then does the arithmetic per tree, a long graph for what is one sum.
So the forest is written here as ONE ``TreeEnsembleRegressor`` (aggregate
SUM, one target) whose leaf weights are each leaf's normalised path length,
followed by the arithmetic of sklearn's ``decision_function``. The agent
runs ``TreeEnsembleRegressor`` with its own op (tract has none), a flat
walk per tree: about 1 µs for 100 trees. (tract's own
``TreeEnsembleClassifier`` was used before and cost 2.5 ms a step: it skips
to each leaf's weights through an iterator over all the forest's leaves.)
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
ML_OPSET = 3
#: IR version 8 goes with opset 17 and is read by every runtime in use.
IR_VERSION = 8

INPUT = "input"
SCORE = "score"
CONTRIBUTIONS = "contributions"

EULER_GAMMA = 0.5772156649015329


def average_path_length(n) -> np.ndarray:
    """sklearn's c(n): the average path length of an unsuccessful BST search."""
    n = np.asarray(n, dtype=np.float64)
    out = np.zeros_like(n)
    out[n == 2] = 1.0
    big = n > 2
    out[big] = 2.0 * (np.log(n[big] - 1.0) + EULER_GAMMA) - 2.0 * (n[big] - 1.0) / n[big]
    return out


def _const(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def _model(nodes, inits, n_features: int, outputs, doc: str, ml: bool = False) -> onnx.ModelProto:
    inp = helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", n_features])
    outs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", dim])
            for name, dim in outputs]
    graph = helper.make_graph(nodes, "outpost_detector", [inp], outs, initializer=inits)
    opsets = [helper.make_opsetid("", OPSET)]
    if ml:
        opsets.append(helper.make_opsetid("ai.onnx.ml", ML_OPSET))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="outpost-model",
                              doc_string=doc)
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def _scaler_nodes(mean, scale, out: str):
    """``out = (input - mean) / scale`` as Sub and Div."""
    inits = [_const("scaler_mean", np.asarray(mean).reshape(1, -1)),
             _const("scaler_scale", np.asarray(scale).reshape(1, -1))]
    nodes = [helper.make_node("Sub", [INPUT, "scaler_mean"], ["centred"]),
             helper.make_node("Div", ["centred", "scaler_scale"], [out])]
    return nodes, inits


def _residual_outputs(scaled: str, recon: str):
    """contributions = (scaled - recon)^2, score = their mean over features."""
    return [
        helper.make_node("Sub", [scaled, recon], ["residual"]),
        helper.make_node("Mul", ["residual", "residual"], [CONTRIBUTIONS]),
        helper.make_node("ReduceMean", [CONTRIBUTIONS], [SCORE], axes=[1], keepdims=1),
    ]


def iforest_onnx(forest, n_features: int) -> onnx.ModelProto:
    """A fitted ``sklearn.ensemble.IsolationForest`` as ONNX; ``score`` equals
    its ``decision_function`` (lower = more anomalous)."""
    n_trees = len(forest.estimators_)
    denom = n_trees * float(average_path_length([forest.max_samples_])[0])
    attrs = {k: [] for k in ("nodes_treeids", "nodes_nodeids", "nodes_featureids",
                             "nodes_values", "nodes_modes", "nodes_truenodeids",
                             "nodes_falsenodeids", "target_treeids", "target_nodeids",
                             "target_ids", "target_weights")}
    for t, (est, feats) in enumerate(zip(forest.estimators_, forest.estimators_features_)):
        tree = est.tree_
        left, right = tree.children_left, tree.children_right
        depth = np.zeros(tree.node_count, dtype=np.int64)
        for i in range(tree.node_count):  # parents come before children
            if left[i] != -1:
                depth[left[i]] = depth[i] + 1
                depth[right[i]] = depth[i] + 1
        for i in range(tree.node_count):
            attrs["nodes_treeids"].append(t)
            attrs["nodes_nodeids"].append(i)
            if left[i] == -1:
                attrs["nodes_featureids"].append(0)
                attrs["nodes_values"].append(0.0)
                attrs["nodes_modes"].append("LEAF")
                attrs["nodes_truenodeids"].append(0)
                attrs["nodes_falsenodeids"].append(0)
                path = depth[i] + average_path_length([tree.n_node_samples[i]])[0]
                attrs["target_treeids"].append(t)
                attrs["target_nodeids"].append(i)
                attrs["target_ids"].append(0)
                attrs["target_weights"].append(float(path / denom))
            else:
                attrs["nodes_featureids"].append(int(feats[tree.feature[i]]))
                attrs["nodes_values"].append(float(np.float32(tree.threshold[i])))
                # sklearn sends x <= threshold to the left child.
                attrs["nodes_modes"].append("BRANCH_LEQ")
                attrs["nodes_truenodeids"].append(int(left[i]))
                attrs["nodes_falsenodeids"].append(int(right[i]))
    # One target: the sum over trees of the leaf weights, i.e. the mean
    # normalised path length.
    trees = helper.make_node(
        "TreeEnsembleRegressor", [INPUT], ["mean_path"], domain="ai.onnx.ml",
        n_targets=1, aggregate_function="SUM", post_transform="NONE", **attrs)
    inits = [
        _const("minus_ln2", [[-math.log(2.0)]]),
        _const("offset", [[float(forest.offset_)]]),
    ]
    nodes = [
        trees,
        # score_samples = -2^(-mean_path), decision_function = that - offset_
        helper.make_node("Mul", ["mean_path", "minus_ln2"], ["log_anomaly"]),
        helper.make_node("Exp", ["log_anomaly"], ["anomaly"]),
        helper.make_node("Neg", ["anomaly"], ["score_samples"]),
        helper.make_node("Sub", ["score_samples", "offset"], [SCORE]),
    ]
    return _model(nodes, inits, n_features, [(SCORE, 1)],
                  "IsolationForest decision_function: lower is more anomalous", ml=True)


def autoencoder_onnx(scaler, mlp, n_features: int) -> onnx.ModelProto:
    """StandardScaler + an MLPRegressor trained to reproduce its input."""
    nodes, inits = _scaler_nodes(scaler.mean_, scaler.scale_, "scaled")
    act = {"relu": "Relu", "tanh": "Tanh", "logistic": "Sigmoid", "identity": None}
    if mlp.activation not in act:
        raise ValueError(f"unsupported MLP activation {mlp.activation}")
    h = "scaled"
    layers = len(mlp.coefs_)
    for i, (w, b) in enumerate(zip(mlp.coefs_, mlp.intercepts_)):
        inits += [_const(f"w{i}", w), _const(f"b{i}", np.asarray(b).reshape(1, -1))]
        nodes += [helper.make_node("MatMul", [h, f"w{i}"], [f"mm{i}"]),
                  helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"z{i}"])]
        h = f"z{i}"
        if i < layers - 1 and act[mlp.activation]:
            nodes.append(helper.make_node(act[mlp.activation], [h], [f"a{i}"]))
            h = f"a{i}"
    nodes += _residual_outputs("scaled", h)
    return _model(nodes, inits, n_features, [(SCORE, 1), (CONTRIBUTIONS, n_features)],
                  "autoencoder: mean squared reconstruction error in scaled space")


def pca_onnx(scaler, pca, n_features: int) -> onnx.ModelProto:
    """StandardScaler + PCA; the residual is ``(z - mean) @ (I - C^T C)``."""
    nodes, inits = _scaler_nodes(scaler.mean_, scaler.scale_, "scaled")
    comp = np.asarray(pca.components_, dtype=np.float64)
    residual_map = np.eye(n_features) - comp.T @ comp
    inits += [_const("pca_mean", np.asarray(pca.mean_).reshape(1, -1)),
              _const("residual_map", residual_map)]
    nodes += [
        helper.make_node("Sub", ["scaled", "pca_mean"], ["pca_centred"]),
        helper.make_node("MatMul", ["pca_centred", "residual_map"], ["residual"]),
        helper.make_node("Mul", ["residual", "residual"], [CONTRIBUTIONS]),
        helper.make_node("ReduceMean", [CONTRIBUTIONS], [SCORE], axes=[1], keepdims=1),
    ]
    return _model(nodes, inits, n_features, [(SCORE, 1), (CONTRIBUTIONS, n_features)],
                  "PCA: mean squared residual in scaled space")
