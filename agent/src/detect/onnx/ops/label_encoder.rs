//! ai.onnx.ml `LabelEncoder` (ML opsets 2 to 4): maps each input element
//! through a key → value table, or to the default when the key is absent.
//! Keys and values may be int64, float or string.

use std::collections::HashMap;

use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use super::attr_f32s;

/// A lookup key; floats compare by value, with every NaN equal to every
/// other NaN and -0.0 equal to 0.0.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    I64(i64),
    F32(u32),
    Str(String),
}

fn float_key(f: f32) -> Key {
    if f.is_nan() {
        Key::F32(f32::NAN.to_bits())
    } else if f == 0.0 {
        Key::F32(0)
    } else {
        Key::F32(f.to_bits())
    }
}

fn keys_of(t: &Tensor) -> TractResult<Vec<Key>> {
    let plain = t.try_as_plain_ram()?;
    Ok(match t.datum_type() {
        DatumType::I64 => plain
            .as_slice::<i64>()?
            .iter()
            .map(|&k| Key::I64(k))
            .collect(),
        DatumType::F32 => plain
            .as_slice::<f32>()?
            .iter()
            .map(|&k| float_key(k))
            .collect(),
        DatumType::String => plain
            .as_slice::<String>()?
            .iter()
            .map(|k| Key::Str(k.clone()))
            .collect(),
        dt => bail!("LabelEncoder does not support {dt:?} keys"),
    })
}

/// The typed op.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelEncoder {
    key_type: DatumType,
    table: HashMap<Key, usize>,
    /// One-dimensional, one value per key.
    values: Arc<Tensor>,
    /// A scalar of the values' type.
    default: Arc<Tensor>,
}

impl LabelEncoder {
    pub fn new(keys: Tensor, values: Tensor, default: Tensor) -> TractResult<LabelEncoder> {
        ensure!(
            keys.rank() == 1 && values.rank() == 1,
            "LabelEncoder keys and values are lists"
        );
        ensure!(
            keys.len() == values.len(),
            "LabelEncoder has {} keys and {} values",
            keys.len(),
            values.len()
        );
        ensure!(
            default.datum_type() == values.datum_type() && default.len() == 1,
            "LabelEncoder default must be one value of the values' type"
        );
        let key_type = keys.datum_type();
        let mut table = HashMap::new();
        for (i, k) in keys_of(&keys)?.into_iter().enumerate() {
            // The first occurrence of a duplicated key wins.
            table.entry(k).or_insert(i);
        }
        match values.datum_type() {
            DatumType::I64 | DatumType::F32 | DatumType::String => {}
            dt => bail!("LabelEncoder does not support {dt:?} values"),
        }
        let default = default.into_shape(&[])?;
        Ok(LabelEncoder {
            key_type,
            table,
            values: values.into_arc_tensor(),
            default: default.into_arc_tensor(),
        })
    }

    fn lookup<T: Datum + Clone>(
        &self,
        indices: &[Option<usize>],
        shape: &[usize],
    ) -> TractResult<Tensor> {
        let values = self.values.try_as_plain_ram()?;
        let values = values.as_slice::<T>()?;
        let default = self.default.try_as_plain_ram()?;
        let default = &default.as_slice::<T>()?[0];
        let out: Vec<T> = indices
            .iter()
            .map(|i| match i {
                Some(i) => values[*i].clone(),
                None => default.clone(),
            })
            .collect();
        Ok(tract_onnx::tract_hir::tract_ndarray::ArrayD::from_shape_vec(shape, out)?.into_tensor())
    }
}

/// The list attribute `name` in any of the three ML opset 2 types, as a tensor.
fn typed_list(node: &NodeProto, prefix: &str) -> TractResult<Option<Tensor>> {
    let ints = node.get_attr_opt_slice::<i64>(&format!("{prefix}_int64s"))?;
    let floats = attr_f32s(node, &format!("{prefix}_floats"))?;
    let strings = node.get_attr_opt_tvec::<String>(&format!("{prefix}_strings"))?;
    Ok(match (ints, floats, strings) {
        (Some(i), None, None) => Some(tensor1(i)),
        (None, Some(f), None) => Some(tensor1(&f)),
        (None, None, Some(s)) => Some(tensor1(&s)),
        (None, None, None) => None,
        _ => bail!(
            "LabelEncoder sets more than one of {prefix}_int64s, {prefix}_floats, {prefix}_strings"
        ),
    })
}

fn tensor_attr(
    ctx: &tract_onnx::model::ParsingContext,
    node: &NodeProto,
    name: &str,
) -> TractResult<Option<Tensor>> {
    let t: Option<&tract_onnx::pb::TensorProto> = node.get_attr_opt(name)?;
    t.map(|t| ctx.load_tensor(t)).transpose()
}

/// The ONNX op builder registered for `LabelEncoder`.
pub fn label_encoder(
    ctx: &tract_onnx::model::ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    if node
        .get_attr_opt_tvec::<String>("classes_strings")?
        .is_some()
    {
        bail!("LabelEncoder from ML opset 1 (classes_strings) is not supported; export with ML opset 2 or later");
    }
    let keys = match (
        typed_list(node, "keys")?,
        tensor_attr(ctx, node, "keys_tensor")?,
    ) {
        (Some(k), None) | (None, Some(k)) => k,
        (None, None) => bail!("LabelEncoder has no keys"),
        (Some(_), Some(_)) => bail!("LabelEncoder sets both keys_* and keys_tensor"),
    };
    let values = match (
        typed_list(node, "values")?,
        tensor_attr(ctx, node, "values_tensor")?,
    ) {
        (Some(v), None) | (None, Some(v)) => v,
        (None, None) => bail!("LabelEncoder has no values"),
        (Some(_), Some(_)) => bail!("LabelEncoder sets both values_* and values_tensor"),
    };
    let default = match tensor_attr(ctx, node, "default_tensor")? {
        Some(t) => t,
        None => match values.datum_type() {
            DatumType::I64 => tensor0(node.get_attr_opt::<i64>("default_int64")?.unwrap_or(-1)),
            DatumType::F32 => tensor0(node.get_attr_opt::<f32>("default_float")?.unwrap_or(-0.0)),
            DatumType::String => tensor0(
                node.get_attr_opt::<String>("default_string")?
                    .unwrap_or_else(|| "_Unused".to_string()),
            ),
            dt => bail!("LabelEncoder does not support {dt:?} values"),
        },
    };
    Ok((
        expand(InferLabelEncoder(LabelEncoder::new(keys, values, default)?)),
        vec![],
    ))
}

/// The inference-time op: types and shapes, then wires [`LabelEncoder`].
#[derive(Debug, Clone, PartialEq)]
pub struct InferLabelEncoder(pub LabelEncoder);

impl Expansion for InferLabelEncoder {
    fn name(&self) -> StaticName {
        "LabelEncoder".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        // Integer keys may arrive as tract's TDim (an integer it can also
        // use symbolically): accepted, and cast to I64 when wired.
        let key = self.0.key_type;
        s.given(&inputs[0].datum_type, move |_, dt| {
            if dt == key || (key == DatumType::I64 && dt == DatumType::TDim) {
                Ok(())
            } else {
                bail!("LabelEncoder keys are {key:?}, its input is {dt:?}")
            }
        })?;
        s.equals(&outputs[0].datum_type, self.0.values.datum_type())?;
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
        if model.outlet_fact(x)?.datum_type != self.0.key_type {
            x = model.wire_node(
                format!("{prefix}.keys"),
                tract_onnx::tract_hir::tract_core::ops::cast::cast(self.0.key_type),
                &[x],
            )?[0];
        }
        model.wire_node(prefix, self.0.clone(), &[x])
    }
}

// tract compares ops through `DynEq` (blanket over `Eq`); the float
// tables compare bitwise-equal in practice, as tract's own float ops assume.
impl Eq for LabelEncoder {}

impl Op for LabelEncoder {
    fn name(&self) -> StaticName {
        "LabelEncoder".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{} {:?} keys to {:?}",
            self.table.len(),
            self.key_type,
            self.values.datum_type()
        )])
    }

    fn as_typed(&self) -> Option<&dyn TypedOp> {
        Some(self)
    }
}

impl EvalOp for LabelEncoder {
    fn eval_out_of_plan(&self, inputs: TVec<TValue>) -> TractResult<Option<TVec<TValue>>> {
        Ok(Some(EvalOp::eval(
            self,
            &EvalContext::out_of_plan(),
            inputs,
        )?))
    }

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == 1, "LabelEncoder takes one input");
        let input = &inputs[0];
        ensure!(
            input.datum_type() == self.key_type,
            "LabelEncoder keys are {:?}, the input is {:?}",
            self.key_type,
            input.datum_type()
        );
        let indices: Vec<Option<usize>> = keys_of(input)?
            .iter()
            .map(|k| self.table.get(k).copied())
            .collect();
        let shape = input.shape();
        let out = match self.values.datum_type() {
            DatumType::I64 => self.lookup::<i64>(&indices, shape)?,
            DatumType::F32 => self.lookup::<f32>(&indices, shape)?,
            _ => self.lookup::<String>(&indices, shape)?,
        };
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for LabelEncoder {
    fn as_op(&self) -> &dyn Op {
        self
    }

    fn as_op_mut(&mut self) -> &mut dyn Op {
        self
    }

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(
            inputs[0].datum_type == self.key_type,
            "LabelEncoder keys are {:?}, the input is {:?}",
            self.key_type,
            inputs[0].datum_type
        );
        Ok(tvec!(self
            .values
            .datum_type()
            .fact(inputs[0].shape.clone())))
    }

    fn axes_mapping(
        &self,
        inputs: &[&TypedFact],
        outputs: &[&TypedFact],
    ) -> TractResult<AxesMapping> {
        AxesMapping::natural(inputs, outputs)
    }
}
