//! ai.onnx.ml `Scaler`: `Y = (X - offset) * scale`, per feature (last axis),
//! or one value for every feature.

use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;
use tract_onnx::tract_hir::tract_core::ops::{cast::cast, math};

use super::attr_f32s;

/// The inference-time op; it wires tract's own cast, sub and mul, so the
/// optimizer sees through it.
#[derive(Debug, Clone, PartialEq)]
pub struct Scaler {
    pub offset: Vec<f32>,
    pub scale: Vec<f32>,
}

impl Scaler {
    pub fn new(offset: Vec<f32>, scale: Vec<f32>) -> TractResult<Scaler> {
        ensure!(
            !offset.is_empty(),
            "Scaler needs a non-empty offset attribute"
        );
        ensure!(
            !scale.is_empty(),
            "Scaler needs a non-empty scale attribute"
        );
        ensure!(
            offset.len() == 1 || scale.len() == 1 || offset.len() == scale.len(),
            "Scaler offset has {} values and scale {}: they must match or be single values",
            offset.len(),
            scale.len()
        );
        Ok(Scaler { offset, scale })
    }

    fn width(&self) -> usize {
        self.offset.len().max(self.scale.len())
    }
}

/// The ONNX op builder registered for `Scaler`.
pub fn scaler(
    _ctx: &tract_onnx::model::ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let offset = attr_f32s(node, "offset")?.unwrap_or_default();
    let scale = attr_f32s(node, "scale")?.unwrap_or_default();
    Ok((expand(Scaler::new(offset, scale)?), vec![]))
}

impl Expansion for Scaler {
    fn name(&self) -> StaticName {
        "Scaler".into()
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
        s.equals(&inputs[0].shape, &outputs[0].shape)?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let mut x = inputs[0];
        let fact = model.outlet_fact(x)?.clone();
        ensure!(fact.rank() >= 1, "Scaler takes an input of rank 1 or more");
        if let Ok(c) = fact.shape[fact.rank() - 1].to_usize() {
            let w = self.width();
            ensure!(
                w == 1 || w == c,
                "Scaler has {w} offset/scale values but the input has {c} features"
            );
        }
        if fact.datum_type != f32::datum_type() {
            x = model.wire_node(format!("{prefix}.to_f32"), cast(f32::datum_type()), &[x])?[0];
        }
        let offset = tensor1(&self.offset).broadcast_into_rank(fact.rank())?;
        let scale = tensor1(&self.scale).broadcast_into_rank(fact.rank())?;
        let offset = model.add_const(format!("{prefix}.offset"), offset)?;
        let scale = model.add_const(format!("{prefix}.scale"), scale)?;
        let centered = model.wire_node(format!("{prefix}.sub"), math::sub(), &[x, offset])?[0];
        model.wire_node(format!("{prefix}.mul"), math::mul(), &[centered, scale])
    }
}
