//! ai.onnx.ml `TreeEnsembleRegressor` (ML opsets 1 and 3).
//!
//! Semantics follow onnxruntime, the reference outpost checks parity
//! against: a branch goes to its true child when the comparison holds, or
//! when the feature is NaN and `nodes_missing_value_tracks_true` is set for
//! it; leaves add their weights per target; SUM and AVERAGE (sum over the
//! number of trees) and MIN and MAX (over the leaf weights reached, 0 when no
//! leaf voted for a target) then add `base_values`.

use std::collections::HashMap;

use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use super::attr_f32s;

/// How a node routes a sample: one of the six comparisons, or a leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    Leq,
    Lt,
    Gte,
    Gt,
    Eq,
    Neq,
    Leaf,
}

impl Mode {
    pub fn parse(s: &str) -> TractResult<Mode> {
        Ok(match s {
            "BRANCH_LEQ" => Mode::Leq,
            "BRANCH_LT" => Mode::Lt,
            "BRANCH_GTE" => Mode::Gte,
            "BRANCH_GT" => Mode::Gt,
            "BRANCH_EQ" => Mode::Eq,
            "BRANCH_NEQ" => Mode::Neq,
            "LEAF" => Mode::Leaf,
            other => bail!("unsupported node mode {other:?}"),
        })
    }
}

/// How the leaf weights reached in each tree are combined per target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Aggregate {
    Sum,
    Average,
    Min,
    Max,
}

impl Aggregate {
    pub fn parse(s: &str) -> TractResult<Aggregate> {
        Ok(match s {
            "SUM" => Aggregate::Sum,
            "AVERAGE" => Aggregate::Average,
            "MIN" => Aggregate::Min,
            "MAX" => Aggregate::Max,
            other => bail!("unsupported aggregate_function {other:?}"),
        })
    }
}

/// The node and leaf attributes of a TreeEnsembleRegressor, as the ONNX-ML
/// spec lays them out (one entry per node, one entry per leaf weight).
#[derive(Debug, Clone, Default)]
pub struct TreeAttrs {
    pub n_targets: usize,
    pub nodes_treeids: Vec<i64>,
    pub nodes_nodeids: Vec<i64>,
    pub nodes_featureids: Vec<i64>,
    pub nodes_values: Vec<f32>,
    pub nodes_modes: Vec<Mode>,
    pub nodes_truenodeids: Vec<i64>,
    pub nodes_falsenodeids: Vec<i64>,
    /// Empty means "false for every node".
    pub nodes_missing_value_tracks_true: Vec<i64>,
    pub target_treeids: Vec<i64>,
    pub target_nodeids: Vec<i64>,
    pub target_ids: Vec<i64>,
    pub target_weights: Vec<f32>,
    pub aggregate: Option<Aggregate>,
    /// Empty means zeros.
    pub base_values: Vec<f32>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Node {
    mode: Mode,
    missing_true: bool,
    feature: u32,
    value: f32,
    /// Branches: the children's indices into `Forest::nodes`.
    /// Leaves: the range of their weights in `Forest::weights`.
    a: u32,
    b: u32,
}

/// A checked, flattened tree ensemble ready to evaluate.
#[derive(Debug, Clone, PartialEq)]
pub struct Forest {
    roots: Vec<u32>,
    nodes: Vec<Node>,
    /// (target, weight) pairs, grouped by leaf.
    weights: Vec<(u32, f32)>,
    n_targets: usize,
    n_features: usize,
    aggregate: Aggregate,
    base_values: Vec<f32>,
}

fn to_u32(v: i64, what: &str) -> TractResult<u32> {
    u32::try_from(v).map_err(|_| format_err!("{what} {v} out of range"))
}

impl Forest {
    pub fn build(attrs: &TreeAttrs) -> TractResult<Forest> {
        let n = attrs.nodes_nodeids.len();
        ensure!(n > 0, "nodes_nodeids is empty: the ensemble has no node");
        ensure!(attrs.n_targets > 0, "n_targets must be at least 1");
        for (name, len) in [
            ("nodes_treeids", attrs.nodes_treeids.len()),
            ("nodes_featureids", attrs.nodes_featureids.len()),
            ("nodes_values", attrs.nodes_values.len()),
            ("nodes_modes", attrs.nodes_modes.len()),
            ("nodes_truenodeids", attrs.nodes_truenodeids.len()),
            ("nodes_falsenodeids", attrs.nodes_falsenodeids.len()),
        ] {
            ensure!(len == n, "{name} has {len} entries, nodes_nodeids has {n}");
        }
        let missing = &attrs.nodes_missing_value_tracks_true;
        ensure!(
            missing.is_empty() || missing.len() == n,
            "nodes_missing_value_tracks_true has {} entries, nodes_nodeids has {n}",
            missing.len()
        );
        let l = attrs.target_ids.len();
        for (name, len) in [
            ("target_treeids", attrs.target_treeids.len()),
            ("target_nodeids", attrs.target_nodeids.len()),
            ("target_weights", attrs.target_weights.len()),
        ] {
            ensure!(len == l, "{name} has {len} entries, target_ids has {l}");
        }
        ensure!(
            attrs.base_values.is_empty() || attrs.base_values.len() == attrs.n_targets,
            "base_values has {} entries, n_targets is {}",
            attrs.base_values.len(),
            attrs.n_targets
        );

        // Trees in order of first appearance of their id; nodes in the order given.
        let mut tree_order: Vec<i64> = vec![];
        let mut index: HashMap<(i64, i64), usize> = HashMap::new();
        for i in 0..n {
            let key = (attrs.nodes_treeids[i], attrs.nodes_nodeids[i]);
            ensure!(
                index.insert(key, i).is_none(),
                "node {key:?} (tree, node) is defined twice"
            );
            if !tree_order.contains(&key.0) {
                tree_order.push(key.0);
            }
        }
        // Leaf weights, grouped by node, in the order given.
        let mut leaf_weights: HashMap<usize, Vec<(u32, f32)>> = HashMap::new();
        for j in 0..l {
            let key = (attrs.target_treeids[j], attrs.target_nodeids[j]);
            let node = *index.get(&key).ok_or_else(|| {
                format_err!("target weight {j} names node {key:?} that does not exist")
            })?;
            ensure!(
                attrs.nodes_modes[node] == Mode::Leaf,
                "target weight {j} is attached to node {key:?}, which is not a LEAF"
            );
            let target = to_u32(attrs.target_ids[j], "target id")?;
            ensure!(
                (target as usize) < attrs.n_targets,
                "target id {target} is not below n_targets {}",
                attrs.n_targets
            );
            leaf_weights
                .entry(node)
                .or_default()
                .push((target, attrs.target_weights[j]));
        }

        let mut nodes = Vec::with_capacity(n);
        let mut weights = Vec::with_capacity(l);
        let mut n_features = 0usize;
        for i in 0..n {
            let tree = attrs.nodes_treeids[i];
            let mode = attrs.nodes_modes[i];
            let node = if mode == Mode::Leaf {
                let start = weights.len();
                weights.extend(leaf_weights.remove(&i).unwrap_or_default());
                Node {
                    mode,
                    missing_true: false,
                    feature: 0,
                    value: 0.0,
                    a: start as u32,
                    b: weights.len() as u32,
                }
            } else {
                let child = |id: i64, which: &str| -> TractResult<u32> {
                    let c = *index.get(&(tree, id)).ok_or_else(|| {
                        format_err!(
                            "node {:?} has {which} child {id}, which is not in tree {tree}",
                            (tree, attrs.nodes_nodeids[i])
                        )
                    })?;
                    Ok(c as u32)
                };
                let feature = to_u32(attrs.nodes_featureids[i], "feature id")?;
                n_features = n_features.max(feature as usize + 1);
                let missing_true = match missing.get(i) {
                    None | Some(0) => false,
                    Some(1) => true,
                    Some(v) => bail!("nodes_missing_value_tracks_true must be 0 or 1, got {v}"),
                };
                Node {
                    mode,
                    missing_true,
                    feature,
                    value: attrs.nodes_values[i],
                    a: child(attrs.nodes_truenodeids[i], "true")?,
                    b: child(attrs.nodes_falsenodeids[i], "false")?,
                }
            };
            nodes.push(node);
        }
        // A tree's root is its one node that no other node points to.
        let mut pointed = vec![false; n];
        for node in &nodes {
            if node.mode != Mode::Leaf {
                pointed[node.a as usize] = true;
                pointed[node.b as usize] = true;
            }
        }
        let mut roots = vec![];
        for tree in &tree_order {
            let candidates: Vec<usize> = (0..n)
                .filter(|&i| attrs.nodes_treeids[i] == *tree && !pointed[i])
                .collect();
            ensure!(
                candidates.len() == 1,
                "tree {tree} has {} root nodes (nodes no other node points to), expected 1",
                candidates.len()
            );
            roots.push(candidates[0] as u32);
        }
        let forest = Forest {
            roots,
            nodes,
            weights,
            n_targets: attrs.n_targets,
            n_features,
            aggregate: attrs.aggregate.unwrap_or(Aggregate::Sum),
            base_values: if attrs.base_values.is_empty() {
                vec![0.0; attrs.n_targets]
            } else {
                attrs.base_values.clone()
            },
        };
        forest.check_acyclic()?;
        Ok(forest)
    }

    /// Every walk from a root must reach a leaf: refuse cycles at load.
    fn check_acyclic(&self) -> TractResult<()> {
        let mut state = vec![0u8; self.nodes.len()]; // 0 new, 1 on the path, 2 done
        for &root in &self.roots {
            let mut stack = vec![(root as usize, false)];
            while let Some((i, leaving)) = stack.pop() {
                if leaving {
                    state[i] = 2;
                    continue;
                }
                match state[i] {
                    1 => bail!("the trees contain a cycle through node index {i}"),
                    2 => continue,
                    _ => {}
                }
                state[i] = 1;
                stack.push((i, true));
                let node = &self.nodes[i];
                if node.mode != Mode::Leaf {
                    for c in [node.a as usize, node.b as usize] {
                        if state[c] == 1 {
                            bail!("the trees contain a cycle through node index {c}");
                        }
                        stack.push((c, false));
                    }
                }
            }
        }
        Ok(())
    }

    pub fn n_targets(&self) -> usize {
        self.n_targets
    }

    pub fn n_features(&self) -> usize {
        self.n_features
    }

    #[inline]
    fn leaf(&self, root: u32, row: &[f32]) -> &Node {
        let mut node = &self.nodes[root as usize];
        loop {
            if node.mode == Mode::Leaf {
                return node;
            }
            let x = row[node.feature as usize];
            let cond = match node.mode {
                Mode::Leaf => true,
                Mode::Leq => x <= node.value,
                Mode::Lt => x < node.value,
                Mode::Gte => x >= node.value,
                Mode::Gt => x > node.value,
                Mode::Eq => x == node.value,
                Mode::Neq => x != node.value,
            } || (node.missing_true && x.is_nan());
            node = &self.nodes[if cond { node.a } else { node.b } as usize];
        }
    }

    /// Scores one row (`row.len() >= n_features`) into `out` (`n_targets` long).
    pub fn eval_row(&self, row: &[f32], out: &mut [f32], voted: &mut [bool]) {
        out.fill(0.0);
        voted.fill(false);
        for &root in &self.roots {
            let leaf = self.leaf(root, row);
            for &(t, w) in &self.weights[leaf.a as usize..leaf.b as usize] {
                let t = t as usize;
                match self.aggregate {
                    Aggregate::Sum | Aggregate::Average => out[t] += w,
                    Aggregate::Min => out[t] = if voted[t] { out[t].min(w) } else { w },
                    Aggregate::Max => out[t] = if voted[t] { out[t].max(w) } else { w },
                }
                voted[t] = true;
            }
        }
        let n_trees = self.roots.len() as f32;
        for ((o, base), voted) in out.iter_mut().zip(&self.base_values).zip(voted.iter()) {
            // A target no leaf voted for is 0, base value and all: what
            // onnxruntime outputs (the reference the parity tests hold
            // outpost to; the ONNX-ML spec leaves the case open).
            if !voted {
                *o = 0.0;
                continue;
            }
            if self.aggregate == Aggregate::Average {
                *o /= n_trees;
            }
            *o += base;
        }
    }

    /// Scores `rows` rows of `n_cols` features each.
    pub fn eval(&self, input: &[f32], rows: usize, n_cols: usize) -> TractResult<Vec<f32>> {
        ensure!(
            n_cols >= self.n_features,
            "input has {n_cols} features, the trees use feature #{}",
            self.n_features.saturating_sub(1)
        );
        ensure!(
            input.len() == rows * n_cols,
            "input holds {} values, not {rows}x{n_cols}",
            input.len()
        );
        let mut out = vec![0.0f32; rows * self.n_targets];
        let mut voted = vec![false; self.n_targets];
        for r in 0..rows {
            self.eval_row(
                &input[r * n_cols..(r + 1) * n_cols],
                &mut out[r * self.n_targets..(r + 1) * self.n_targets],
                &mut voted,
            );
        }
        Ok(out)
    }
}

/// Reads a float list given either as `NAME` (floats) or as `NAME_as_tensor`.
fn floats_or_tensor(
    ctx: &tract_onnx::model::ParsingContext,
    node: &NodeProto,
    name: &str,
) -> TractResult<Vec<f32>> {
    let tensor_name = format!("{name}_as_tensor");
    let plain = attr_f32s(node, name)?;
    let tensor: Option<&tract_onnx::pb::TensorProto> = node.get_attr_opt(&tensor_name)?;
    match (plain, tensor) {
        (Some(_), Some(_)) => bail!("both {name} and {tensor_name} are set"),
        (Some(v), None) => Ok(v),
        (None, Some(t)) => {
            let t = ctx.load_tensor(t)?;
            let t = t.cast_to::<f32>()?;
            Ok(t.try_as_plain_ram()?.as_slice::<f32>()?.to_vec())
        }
        (None, None) => Ok(vec![]),
    }
}

fn ints(node: &NodeProto, name: &str) -> TractResult<Vec<i64>> {
    Ok(node
        .get_attr_opt_slice::<i64>(name)?
        .map(|s| s.to_vec())
        .unwrap_or_default())
}

/// The ONNX op builder registered for `TreeEnsembleRegressor`.
pub fn tree_ensemble_regressor(
    ctx: &tract_onnx::model::ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let post_transform: Option<&str> = node.get_attr_opt("post_transform")?;
    match post_transform.unwrap_or("NONE") {
        "NONE" => {}
        other => {
            bail!("post_transform {other:?} is not supported for TreeEnsembleRegressor (only NONE)")
        }
    }
    let n_targets: i64 = node.get_attr_opt("n_targets")?.unwrap_or(1);
    ensure!(
        n_targets >= 1,
        "n_targets must be at least 1, got {n_targets}"
    );
    let modes = node
        .get_attr_opt_tvec::<&str>("nodes_modes")?
        .unwrap_or_default()
        .iter()
        .map(|s| Mode::parse(s))
        .collect::<TractResult<Vec<_>>>()?;
    let aggregate: Option<&str> = node.get_attr_opt("aggregate_function")?;
    let attrs = TreeAttrs {
        n_targets: n_targets as usize,
        nodes_treeids: ints(node, "nodes_treeids")?,
        nodes_nodeids: ints(node, "nodes_nodeids")?,
        nodes_featureids: ints(node, "nodes_featureids")?,
        nodes_values: floats_or_tensor(ctx, node, "nodes_values")?,
        nodes_modes: modes,
        nodes_truenodeids: ints(node, "nodes_truenodeids")?,
        nodes_falsenodeids: ints(node, "nodes_falsenodeids")?,
        nodes_missing_value_tracks_true: ints(node, "nodes_missing_value_tracks_true")?,
        target_treeids: ints(node, "target_treeids")?,
        target_nodeids: ints(node, "target_nodeids")?,
        target_ids: ints(node, "target_ids")?,
        target_weights: floats_or_tensor(ctx, node, "target_weights")?,
        aggregate: aggregate.map(Aggregate::parse).transpose()?,
        base_values: floats_or_tensor(ctx, node, "base_values")?,
    };
    let forest = Forest::build(&attrs)?;
    Ok((
        expand(TreeEnsembleRegressor {
            forest: Arc::new(forest),
        }),
        vec![],
    ))
}

/// The inference-time op: checks types, then wires [`TreeEnsembleRegressor`].
#[derive(Debug, Clone, PartialEq)]
pub struct TreeEnsembleRegressor {
    pub forest: Arc<Forest>,
}

impl Expansion for TreeEnsembleRegressor {
    fn name(&self) -> StaticName {
        "TreeEnsembleRegressor".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].datum_type, f32::datum_type())?;
        s.equals(&outputs[0].rank, 2)?;
        s.equals(&outputs[0].shape[1], self.forest.n_targets.to_dim())?;
        s.given(&inputs[0].rank, move |s, rank| {
            if rank == 2 {
                s.equals(&outputs[0].shape[0], &inputs[0].shape[0])?;
            } else if rank == 1 {
                s.equals(&outputs[0].shape[0], 1.to_dim())?;
            } else {
                bail!("TreeEnsembleRegressor takes a rank 1 or 2 input, got rank {rank}");
            }
            Ok(())
        })
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let mut x = inputs[0];
        if model.outlet_fact(x)?.rank() == 1 {
            x = model.wire_node(format!("{prefix}.as_row"), AxisOp::Add(0), &[x])?[0];
        }
        if model.outlet_fact(x)?.datum_type != f32::datum_type() {
            x = model.wire_node(
                format!("{prefix}.to_f32"),
                tract_onnx::tract_hir::tract_core::ops::cast::cast(f32::datum_type()),
                &[x],
            )?[0];
        }
        model.wire_node(
            prefix,
            TreeEnsembleRegressorOp {
                forest: self.forest.clone(),
            },
            &[x],
        )
    }
}

/// The typed op: f32 `[N, F]` in, f32 `[N, n_targets]` out.
#[derive(Debug, Clone, PartialEq)]
pub struct TreeEnsembleRegressorOp {
    pub forest: Arc<Forest>,
}

// tract compares ops through `DynEq` (blanket over `Eq`), as for its own
// float-carrying ops (`impl Eq for Lrn {}`).
impl Eq for TreeEnsembleRegressorOp {}

impl Op for TreeEnsembleRegressorOp {
    fn name(&self) -> StaticName {
        "TreeEnsembleRegressor".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{} trees, {} nodes, {} targets, {:?}",
            self.forest.roots.len(),
            self.forest.nodes.len(),
            self.forest.n_targets,
            self.forest.aggregate
        )])
    }

    fn as_typed(&self) -> Option<&dyn TypedOp> {
        Some(self)
    }
}

impl EvalOp for TreeEnsembleRegressorOp {
    fn eval_out_of_plan(&self, inputs: TVec<TValue>) -> TractResult<Option<TVec<TValue>>> {
        Ok(Some(EvalOp::eval(
            self,
            &EvalContext::out_of_plan(),
            inputs,
        )?))
    }

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == 1, "TreeEnsembleRegressor takes one input");
        let input = inputs[0].cast_to::<f32>()?;
        ensure!(
            input.rank() == 2,
            "TreeEnsembleRegressor expects a rank 2 input"
        );
        let (rows, cols) = (input.shape()[0], input.shape()[1]);
        let data = input.try_as_plain_ram()?;
        let out = self.forest.eval(data.as_slice::<f32>()?, rows, cols)?;
        Ok(tvec!(Tensor::from_shape(
            &[rows, self.forest.n_targets],
            &out
        )?
        .into_tvalue()))
    }
}

impl TypedOp for TreeEnsembleRegressorOp {
    fn as_op(&self) -> &dyn Op {
        self
    }

    fn as_op_mut(&mut self) -> &mut dyn Op {
        self
    }

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let input = inputs[0];
        ensure!(
            input.rank() == 2,
            "TreeEnsembleRegressor expects a rank 2 input"
        );
        if let Ok(cols) = input.shape[1].to_usize() {
            ensure!(
                cols >= self.forest.n_features,
                "input has {cols} features, the trees use feature #{}",
                self.forest.n_features.saturating_sub(1)
            );
        }
        Ok(tvec!(f32::fact([
            input.shape[0].clone(),
            self.forest.n_targets.to_dim()
        ])))
    }
}
