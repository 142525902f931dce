//! The ai.onnx.ml operators tract-onnx lacks, registered through its public
//! op register so skl2onnx exports load.
//!
//! - `TreeEnsembleRegressor` (ML opsets 1 and 3): every node mode, missing
//!   value tracks, multiple targets, SUM/AVERAGE/MIN/MAX, base values;
//!   `post_transform` NONE only (anything else is refused at load).
//! - `Scaler`: `(X - offset) * scale`, per feature or one value for all.
//! - `LabelEncoder` (ML opsets 2 to 4): int64, float and string keys and
//!   values, with the spec's defaults.
//!
//! Each one loads to tract typed ops, so `into_optimized()` and
//! `into_runnable()` work on the models that use them.

mod label_encoder;
mod scaler;
mod tree_ensemble;

pub use label_encoder::LabelEncoder;
pub use scaler::Scaler;
pub use tree_ensemble::{Aggregate, Forest, Mode, TreeAttrs, TreeEnsembleRegressorOp};

use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

/// Registers outpost's extra operators on a tract-onnx framework
/// (`tract_onnx::onnx()`), before any model is loaded with it.
pub fn register(onnx: &mut tract_onnx::Onnx) {
    let reg = &mut onnx.op_register;
    reg.insert(
        "TreeEnsembleRegressor",
        tree_ensemble::tree_ensemble_regressor,
    );
    reg.insert("Scaler", scaler::scaler);
    reg.insert("LabelEncoder", label_encoder::label_encoder);
}

/// A float list attribute, if present.
fn attr_f32s(node: &NodeProto, name: &str) -> TractResult<Option<Vec<f32>>> {
    Ok(node.get_attr_opt_slice::<f32>(name)?.map(|s| s.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::tree_ensemble::TreeEnsembleRegressorOp;
    use super::*;
    use tract_onnx::tract_hir::prelude::tract_ndarray::arr2;

    /// One split on feature 0 at `value`: true leaf votes 1, false leaf votes 2.
    fn one_split(mode: Mode, value: f32, missing_true: bool) -> TreeAttrs {
        TreeAttrs {
            n_targets: 1,
            nodes_treeids: vec![0, 0, 0],
            nodes_nodeids: vec![0, 1, 2],
            nodes_featureids: vec![0, 0, 0],
            nodes_values: vec![value, 0.0, 0.0],
            nodes_modes: vec![mode, Mode::Leaf, Mode::Leaf],
            nodes_truenodeids: vec![1, 0, 0],
            nodes_falsenodeids: vec![2, 0, 0],
            nodes_missing_value_tracks_true: vec![missing_true as i64, 0, 0],
            target_treeids: vec![0, 0],
            target_nodeids: vec![1, 2],
            target_ids: vec![0, 0],
            target_weights: vec![1.0, 2.0],
            aggregate: None,
            base_values: vec![],
        }
    }

    fn score(forest: &Forest, row: &[f32]) -> Vec<f32> {
        forest.eval(row, 1, row.len()).unwrap()
    }

    const T: f32 = 1.0;
    const F: f32 = 2.0;

    #[test]
    fn every_mode_compares_as_the_spec_says() {
        // (mode, [below, equal, above] expected leaves)
        let table = [
            (Mode::Leq, [T, T, F]),
            (Mode::Lt, [T, F, F]),
            (Mode::Gte, [F, T, T]),
            (Mode::Gt, [F, F, T]),
            (Mode::Eq, [F, T, F]),
            (Mode::Neq, [T, F, T]),
        ];
        for (mode, expected) in table {
            let forest = Forest::build(&one_split(mode, 0.5, false)).unwrap();
            for (x, want) in [0.25f32, 0.5, 0.75].into_iter().zip(expected) {
                assert_eq!(score(&forest, &[x]), vec![want], "{mode:?} at {x}");
            }
        }
    }

    #[test]
    fn missing_values_follow_the_track_flag() {
        for mode in [Mode::Leq, Mode::Lt, Mode::Gte, Mode::Gt, Mode::Eq] {
            let to_true = Forest::build(&one_split(mode, 0.5, true)).unwrap();
            let to_false = Forest::build(&one_split(mode, 0.5, false)).unwrap();
            assert_eq!(score(&to_true, &[f32::NAN]), vec![T], "{mode:?}");
            assert_eq!(score(&to_false, &[f32::NAN]), vec![F], "{mode:?}");
        }
        // NaN != v holds, so NEQ goes true either way (as onnxruntime does).
        let neq = Forest::build(&one_split(Mode::Neq, 0.5, false)).unwrap();
        assert_eq!(score(&neq, &[f32::NAN]), vec![T]);
    }

    /// Two trees, two targets: tree 0 splits feature 0 at 0, tree 1 feature 1 at 0.
    /// Tree 0: true leaf (0: 1.0, 1: 10.0), false leaf (0: 3.0).
    /// Tree 1: true leaf (0: 5.0, 0: 0.5), false leaf (1: -4.0).
    fn two_trees(aggregate: Aggregate, base_values: Vec<f32>) -> Forest {
        Forest::build(&TreeAttrs {
            n_targets: 2,
            nodes_treeids: vec![0, 0, 0, 1, 1, 1],
            nodes_nodeids: vec![0, 1, 2, 0, 1, 2],
            nodes_featureids: vec![0, 0, 0, 1, 0, 0],
            nodes_values: vec![0.0; 6],
            nodes_modes: vec![
                Mode::Leq,
                Mode::Leaf,
                Mode::Leaf,
                Mode::Leq,
                Mode::Leaf,
                Mode::Leaf,
            ],
            nodes_truenodeids: vec![1, 0, 0, 1, 0, 0],
            nodes_falsenodeids: vec![2, 0, 0, 2, 0, 0],
            nodes_missing_value_tracks_true: vec![],
            target_treeids: vec![0, 0, 0, 1, 1, 1],
            target_nodeids: vec![1, 1, 2, 1, 1, 2],
            target_ids: vec![0, 1, 0, 0, 0, 1],
            target_weights: vec![1.0, 10.0, 3.0, 5.0, 0.5, -4.0],
            aggregate: Some(aggregate),
            base_values,
        })
        .unwrap()
    }

    #[test]
    fn aggregate_functions_and_base_values() {
        let base = vec![100.0, 200.0];
        // Row (-1, -1): tree 0 true (0: 1, 1: 10), tree 1 true (0: 5, 0: 0.5).
        // Row (1, 1): tree 0 false (0: 3), tree 1 false (1: -4).
        let rows = [[-1.0f32, -1.0], [1.0, 1.0]];
        let table = [
            (Aggregate::Sum, [[106.5, 210.0], [103.0, 196.0]]),
            (Aggregate::Average, [[103.25, 205.0], [101.5, 198.0]]),
            (Aggregate::Min, [[100.5, 210.0], [103.0, 196.0]]),
            (Aggregate::Max, [[105.0, 210.0], [103.0, 196.0]]),
        ];
        for (agg, expected) in table {
            let forest = two_trees(agg, base.clone());
            for (row, want) in rows.iter().zip(expected) {
                assert_eq!(score(&forest, row), want.to_vec(), "{agg:?} {row:?}");
            }
        }
    }

    #[test]
    fn a_target_no_leaf_votes_for_scores_zero_as_onnxruntime_does() {
        // Row (1, -1): tree 0 false (0: 3), tree 1 true (0: 5, 0: 0.5): target 1 gets no vote.
        // onnxruntime outputs 0 for it, base value or not (the tree_sum
        // parity fixture has such rows); outpost follows it.
        for agg in [
            Aggregate::Min,
            Aggregate::Max,
            Aggregate::Sum,
            Aggregate::Average,
        ] {
            let forest = two_trees(agg, vec![0.0, 7.0]);
            assert_eq!(score(&forest, &[1.0, -1.0])[1], 0.0, "{agg:?}");
        }
        let min = two_trees(Aggregate::Min, vec![]);
        assert_eq!(score(&min, &[1.0, -1.0]), vec![0.5, 0.0]);
    }

    #[test]
    fn malformed_trees_are_refused() {
        let mut attrs = one_split(Mode::Leq, 0.5, false);
        attrs.nodes_truenodeids[0] = 9;
        let err = Forest::build(&attrs).unwrap_err();
        assert!(err.to_string().contains("true child 9"), "{err}");

        let mut attrs = one_split(Mode::Leq, 0.5, false);
        attrs.target_nodeids[0] = 0;
        let err = Forest::build(&attrs).unwrap_err();
        assert!(err.to_string().contains("not a LEAF"), "{err}");

        let mut attrs = one_split(Mode::Leq, 0.5, false);
        attrs.nodes_nodeids[2] = 1;
        let err = Forest::build(&attrs).unwrap_err();
        assert!(err.to_string().contains("defined twice"), "{err}");

        let mut attrs = one_split(Mode::Leq, 0.5, false);
        attrs.nodes_values.pop();
        let err = Forest::build(&attrs).unwrap_err();
        assert!(
            err.to_string().contains("nodes_values has 2 entries"),
            "{err}"
        );

        let mut attrs = one_split(Mode::Leq, 0.5, false);
        attrs.base_values = vec![1.0, 2.0];
        assert!(Forest::build(&attrs).is_err());

        // A node pointing back to the root: no root and a cycle.
        let mut attrs = one_split(Mode::Leq, 0.5, false);
        attrs.nodes_modes[1] = Mode::Leq;
        attrs.nodes_truenodeids[1] = 0;
        attrs.nodes_falsenodeids[1] = 2;
        attrs.target_nodeids = vec![2];
        attrs.target_treeids = vec![0];
        attrs.target_ids = vec![0];
        attrs.target_weights = vec![1.0];
        assert!(Forest::build(&attrs).is_err());

        assert!(Mode::parse("BRANCH_SOMETIMES").is_err());
        assert!(Aggregate::parse("MEDIAN").is_err());

        let forest = Forest::build(&one_split(Mode::Leq, 0.5, false)).unwrap();
        let err = forest.eval(&[], 1, 0).unwrap_err();
        assert!(err.to_string().contains("input has 0 features"), "{err}");
    }

    fn optimized(model: TypedModel) -> std::sync::Arc<TypedRunnableModel> {
        model.into_optimized().unwrap().into_runnable().unwrap()
    }

    #[test]
    fn the_tree_op_optimizes_and_runs_at_any_batch() {
        let forest = Arc::new(two_trees(Aggregate::Sum, vec![0.5, -0.5]));
        let mut model = TypedModel::default();
        let n = model.symbols.sym("N");
        let x = model
            .add_source("x", f32::fact(&[n.to_dim(), 2.to_dim()]))
            .unwrap();
        let y = model
            .wire_node(
                "trees",
                TreeEnsembleRegressorOp {
                    forest: forest.clone(),
                },
                &[x],
            )
            .unwrap();
        model.select_output_outlets(&y).unwrap();
        let plan = optimized(model);
        let rows = arr2(&[[-1.0f32, -1.0], [1.0, 1.0], [1.0, -1.0]]);
        let out = plan.run(tvec!(rows.clone().into_tensor().into())).unwrap();
        let flat: Vec<f32> = rows.iter().copied().collect();
        let want = forest.eval(&flat, 3, 2).unwrap();
        assert_eq!(out[0].shape(), &[3, 2]);
        assert_eq!(
            out[0]
                .try_as_plain_ram()
                .unwrap()
                .as_slice::<f32>()
                .unwrap(),
            &want[..]
        );
        assert_eq!(&want[..2], &[7.0, 9.5]);
    }

    fn run_expansion(
        op: &dyn Expansion,
        input: Tensor,
        shape: &[usize],
    ) -> TractResult<TVec<TValue>> {
        let mut model = TypedModel::default();
        let x = model.add_source("x", input.datum_type().fact(shape))?;
        let y = op.wire("op", &mut model, &[x])?;
        model.select_output_outlets(&y)?;
        optimized(model).run(tvec!(input.into()))
    }

    #[test]
    fn scaler_per_feature_and_broadcast() {
        let x = arr2(&[[1.0f32, 2.0, 3.0], [-1.0, 0.0, 10.0]]).into_tensor();
        let per_feature = Scaler::new(vec![1.0, 2.0, 3.0], vec![2.0, 0.5, -1.0]).unwrap();
        let out = run_expansion(&per_feature, x.clone(), &[2, 3]).unwrap();
        assert_eq!(
            out[0]
                .try_as_plain_ram()
                .unwrap()
                .as_slice::<f32>()
                .unwrap(),
            &[0.0, 0.0, 0.0, -4.0, -1.0, -7.0]
        );
        let single = Scaler::new(vec![1.0], vec![3.0]).unwrap();
        let out = run_expansion(&single, x.clone(), &[2, 3]).unwrap();
        assert_eq!(
            out[0]
                .try_as_plain_ram()
                .unwrap()
                .as_slice::<f32>()
                .unwrap(),
            &[0.0, 3.0, 6.0, -6.0, -3.0, 27.0]
        );
        // int64 inputs are scaled as floats.
        let xi = arr2(&[[2i64, 4]]).into_tensor();
        let out = run_expansion(&single, xi, &[1, 2]).unwrap();
        assert_eq!(
            out[0]
                .try_as_plain_ram()
                .unwrap()
                .as_slice::<f32>()
                .unwrap(),
            &[3.0, 9.0]
        );

        let wrong = Scaler::new(vec![1.0, 2.0], vec![1.0, 1.0]).unwrap();
        let err = run_expansion(&wrong, x, &[2, 3]).unwrap_err();
        assert!(err.to_string().contains("input has 3 features"), "{err}");
        assert!(Scaler::new(vec![], vec![1.0]).is_err());
        assert!(Scaler::new(vec![1.0, 2.0], vec![1.0, 2.0, 3.0]).is_err());
    }

    fn run_typed(op: LabelEncoder, input: Tensor) -> Tensor {
        let mut model = TypedModel::default();
        let x = model
            .add_source("x", input.datum_type().fact(input.shape()))
            .unwrap();
        let y = model.wire_node("enc", op, &[x]).unwrap();
        model.select_output_outlets(&y).unwrap();
        let out = optimized(model).run(tvec!(input.into())).unwrap();
        out[0].clone().into_tensor()
    }

    #[test]
    fn label_encoder_maps_keys_and_falls_back_to_the_default() {
        let enc = LabelEncoder::new(
            tensor1(&[3i64, 7, 3]),
            tensor1(&[0.5f32, 1.5, 9.0]),
            tensor0(-1.0f32),
        )
        .unwrap();
        let out = run_typed(enc, arr2(&[[3i64, 7], [8, 3]]).into_tensor());
        assert_eq!(out.shape(), &[2, 2]);
        // Duplicated keys: the first wins.
        assert_eq!(
            out.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap(),
            &[0.5, 1.5, -1.0, 0.5]
        );

        let enc = LabelEncoder::new(
            tensor1(&["a".to_string(), "b".to_string()]),
            tensor1(&[1i64, 2]),
            tensor0(-1i64),
        )
        .unwrap();
        let out = run_typed(enc, tensor1(&["b".to_string(), "z".to_string()]));
        assert_eq!(
            out.try_as_plain_ram().unwrap().as_slice::<i64>().unwrap(),
            &[2, -1]
        );

        let enc = LabelEncoder::new(
            tensor1(&[f32::NAN, 0.0, 2.5]),
            tensor1(&["nan".to_string(), "zero".to_string(), "x".to_string()]),
            tensor0("_Unused".to_string()),
        )
        .unwrap();
        let out = run_typed(enc, tensor1(&[-0.0f32, f32::NAN, 2.5, 1.0]));
        assert_eq!(
            out.try_as_plain_ram()
                .unwrap()
                .as_slice::<String>()
                .unwrap(),
            &["zero", "nan", "x", "_Unused"]
        );

        assert!(
            LabelEncoder::new(tensor1(&[1i64]), tensor1(&[1.0f32, 2.0]), tensor0(0.0f32)).is_err()
        );
        assert!(LabelEncoder::new(tensor1(&[1i64]), tensor1(&[1.0f32]), tensor0(0i64)).is_err());
    }
}
