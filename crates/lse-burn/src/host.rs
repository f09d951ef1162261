//! The operations on host memory: `lse`'s kernels on a tensor's values, borrowed where the
//! backend keeps them on the host in row-major order (Flex, NdArray), read back otherwise.
//!
//! Every function here runs with [`NonFinite::Propagate`](lse::NonFinite::Propagate) and inputs
//! the public functions have already checked, so `lse` cannot fail on them; the error policy is
//! applied by the public functions (`crate::ops`) on the small outputs.

use std::borrow::Cow;
use std::future::Future;

use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, TensorMetadata};
use burn::tensor::{bf16, f16, try_read_sync, DType, Shape, TensorData};
use lse::{GradOutput, LinearGradients, LinearHead, NonFinite, Targets};

use crate::options::{CrossEntropyOptions, LinearCrossEntropyOptions};

/// A float tensor's values in row-major order, borrowed or read back.
#[doc(hidden)]
pub enum Floats<'a> {
    /// `f64` values.
    F64(Cow<'a, [f64]>),
    /// `f32` values.
    F32(Cow<'a, [f32]>),
    /// `f16` values.
    F16(Cow<'a, [f16]>),
    /// `bf16` values.
    BF16(Cow<'a, [bf16]>),
}

/// What runs on one dtype's values: a generic closure.
pub(crate) trait OnFloats {
    type Out;
    fn run<E: HostElement>(self, x: &[E]) -> Self::Out;
}

/// The dtypes both `lse` and burn know, and how each travels.
pub(crate) trait HostElement:
    lse::Element<Stat: burn::tensor::Element> + burn::tensor::Element
{
    fn slice<'a>(floats: &'a Floats<'_>) -> Option<&'a [Self]>;
    /// `lse`'s linear loss where it has one (`f32`, `f16`, `bf16`: logits formed in `f32`);
    /// `None` for `f64`, which the public function turns away first.
    fn linear(call: LinearCall<'_, Self>) -> Option<LinearHostOut>;
}

macro_rules! host_element {
    ($($t:ty => $v:ident, $linear:ident);*) => {$(
        impl HostElement for $t {
            fn slice<'a>(floats: &'a Floats<'_>) -> Option<&'a [Self]> {
                match floats {
                    Floats::$v(v) => Some(v),
                    _ => None,
                }
            }
            fn linear(call: LinearCall<'_, Self>) -> Option<LinearHostOut> {
                host_element!(@linear $linear call)
            }
        }
    )*};
    (@linear yes $call:ident) => { Some($call.run()) };
    (@linear no $call:ident) => {{ let _ = $call; None }};
}
host_element!(f64 => F64, no; f32 => F32, yes; f16 => F16, yes; bf16 => BF16, yes);

impl Floats<'_> {
    /// Runs `op` on the values at their own dtype.
    pub(crate) fn run<O: OnFloats>(&self, op: O) -> O::Out {
        match self {
            Floats::F64(x) => op.run::<f64>(x),
            Floats::F32(x) => op.run::<f32>(x),
            Floats::F16(x) => op.run::<f16>(x),
            Floats::BF16(x) => op.run::<bf16>(x),
        }
    }

    /// Owned values of a tensor read back (any float dtype burn has that `lse` lacks is
    /// converted to `f32`).
    pub(crate) fn from_data(data: TensorData) -> Floats<'static> {
        match data.dtype() {
            DType::F64 => Floats::F64(Cow::Owned(data.into_vec().expect("f64 data"))),
            DType::F16 => Floats::F16(Cow::Owned(data.into_vec().expect("f16 data"))),
            DType::BF16 => Floats::BF16(Cow::Owned(data.into_vec().expect("bf16 data"))),
            DType::F32 => Floats::F32(Cow::Owned(data.into_vec().expect("f32 data"))),
            _ => Floats::F32(Cow::Owned(
                data.convert::<f32>().into_vec().expect("f32 data"),
            )),
        }
    }
}

/// How a backend's tensors reach the host.
#[doc(hidden)]
pub trait HostRead<B: Backend> {
    /// The values of `tensor` in row-major order.
    fn floats(tensor: &FloatTensor<B>) -> Floats<'_>;
}

/// Any backend: the values are read back to the host (a copy, and a synchronisation on a
/// device); what a backend of your own names as its [`HostBacked::Read`](crate::HostBacked::Read).
pub struct ReadBack;

impl<B: Backend> HostRead<B> for ReadBack {
    fn floats(tensor: &FloatTensor<B>) -> Floats<'_> {
        Floats::from_data(read(B::float_into_data(tensor.clone())))
    }
}

fn read<E: std::fmt::Debug>(
    data: impl Future<Output = Result<TensorData, E>> + Send,
) -> TensorData {
    try_read_sync(data)
        .expect("this platform reads tensors synchronously")
        .expect("the device returns the tensor's data")
}

/// Class targets as `i64`, read back (they are one integer per row).
pub(crate) fn targets<B: Backend>(targets: IntTensor<B>) -> Vec<i64> {
    read(B::int_into_data(targets))
        .convert::<i64>()
        .into_vec()
        .expect("i64 data")
}

/// A float tensor of `shape` on `device` from host values, at their own dtype.
pub(crate) fn upload<B: Backend, E: burn::tensor::Element>(
    values: Vec<E>,
    shape: impl Into<Shape>,
    device: &burn::backend::tensor::Device<B>,
) -> FloatTensor<B> {
    B::float_from_data(TensorData::new(values, shape), device)
}

/// The last dimension of a 2-D tensor's shape, and its rows.
fn rows_classes(shape: &Shape) -> (usize, usize) {
    let dims = shape.as_slice();
    (dims[0], dims[1])
}

/// `logsumexp` of each row (`rows` values, the stat dtype: `f64` for `f64`, else `f32`).
pub(crate) fn logsumexp<B: Backend, R: HostRead<B>>(x: FloatTensor<B>) -> FloatTensor<B> {
    struct Op(usize);
    impl OnFloats for Op {
        type Out = TensorData;
        fn run<E: HostElement>(self, x: &[E]) -> TensorData {
            let mut out = vec![<E::Stat as lse::Element>::from_f64(0.0); x.len() / self.0.max(1)];
            lse::logsumexp_with(x, self.0, &mut out, NonFinite::Propagate).expect("checked input");
            flat(out)
        }
    }
    let (rows, classes) = rows_classes(&x.shape());
    let out = R::floats(&x).run(Op(classes));
    upload_as::<B>(out, [rows], &x.device())
}

/// `softmax` (or `log_softmax`) of each row, in the input's dtype.
pub(crate) fn softmax<B: Backend, R: HostRead<B>>(x: FloatTensor<B>, log: bool) -> FloatTensor<B> {
    struct Op {
        classes: usize,
        log: bool,
    }
    impl OnFloats for Op {
        type Out = TensorData;
        fn run<E: HostElement>(self, x: &[E]) -> TensorData {
            let mut out = vec![E::from_f64(0.0); x.len()];
            let pass = if self.log {
                lse::log_softmax_with::<E>
            } else {
                lse::softmax_with::<E>
            };
            pass(x, self.classes, &mut out, NonFinite::Propagate).expect("checked input");
            flat(out)
        }
    }
    let shape = x.shape();
    let (_, classes) = rows_classes(&shape);
    let out = R::floats(&x).run(Op { classes, log });
    upload_as::<B>(out, shape, &x.device())
}

/// The backward pass of `softmax` (or `log_softmax`) from its output `y` and the incoming
/// gradient `dy`.
pub(crate) fn softmax_backward<B: Backend, R: HostRead<B>>(
    y: FloatTensor<B>,
    dy: FloatTensor<B>,
    log: bool,
) -> FloatTensor<B> {
    struct Op<'a> {
        dy: &'a Floats<'a>,
        classes: usize,
        log: bool,
    }
    impl OnFloats for Op<'_> {
        type Out = TensorData;
        fn run<E: HostElement>(self, y: &[E]) -> TensorData {
            let dy = E::slice(self.dy).expect("y and dy share a dtype");
            let mut dx = vec![E::from_f64(0.0); y.len()];
            let pass = if self.log {
                lse::log_softmax_backward::<E>
            } else {
                lse::softmax_backward::<E>
            };
            pass(y, dy, self.classes, &mut dx).expect("checked shapes");
            flat(dx)
        }
    }
    let shape = y.shape();
    let (_, classes) = rows_classes(&shape);
    let dy_values = R::floats(&dy);
    let out = R::floats(&y).run(Op {
        dy: &dy_values,
        classes,
        log,
    });
    upload_as::<B>(out, shape, &y.device())
}

/// The cross-entropy of `logits` (`rows × classes`) against class `targets`: the loss (one
/// value, or one per row with [`Reduction::None`](lse::Reduction::None)) in the stat dtype and,
/// when `with_grad`, `∂loss/∂logits` in the logits' dtype.
pub(crate) fn cross_entropy<B: Backend, R: HostRead<B>>(
    logits: FloatTensor<B>,
    targets: IntTensor<B>,
    options: &CrossEntropyOptions,
    with_grad: bool,
) -> (FloatTensor<B>, Option<FloatTensor<B>>) {
    struct Op<'a> {
        classes: usize,
        targets: &'a [i64],
        options: lse::CrossEntropyOptions<'a>,
        with_grad: bool,
    }
    impl OnFloats for Op<'_> {
        type Out = (TensorData, Option<TensorData>);
        fn run<E: HostElement>(self, x: &[E]) -> Self::Out {
            let targets = Targets::Classes(self.targets);
            let (out, grad) = if self.with_grad {
                let mut grad = vec![E::from_f64(0.0); x.len()];
                let out = lse::cross_entropy_with_grad(
                    x,
                    self.classes,
                    targets,
                    &self.options,
                    GradOutput::default(),
                    &mut grad,
                );
                (out, Some(flat(grad)))
            } else {
                (
                    lse::cross_entropy(x, self.classes, targets, &self.options),
                    None,
                )
            };
            let out = out.expect("checked input");
            let loss = match out.row_loss {
                Some(rows) if self.options.reduction == lse::Reduction::None => rows,
                _ => vec![out.loss],
            };
            (flat(loss), grad)
        }
    }
    let shape = logits.shape();
    let device = logits.device();
    let (_, classes) = rows_classes(&shape);
    let targets = self::targets::<B>(targets);
    let mut core = options.as_lse();
    core.non_finite = NonFinite::Propagate;
    let (loss, grad) = R::floats(&logits).run(Op {
        classes,
        targets: &targets,
        options: core,
        with_grad,
    });
    let loss_len = loss.num_elements();
    (
        upload_as::<B>(loss, [loss_len], &device),
        grad.map(|g| upload_as::<B>(g, shape, &device)),
    )
}

/// What the linear cross-entropy returns: the loss and, when asked for, the gradients of the
/// hidden states, the weight and the bias.
pub(crate) struct LinearOut<B: Backend> {
    pub(crate) loss: FloatTensor<B>,
    pub(crate) grads: Option<[FloatTensor<B>; 3]>,
}

/// One linear cross-entropy call on host values of one dtype.
pub(crate) struct LinearCall<'a, E> {
    hidden: &'a [E],
    weight: &'a [E],
    bias: Option<&'a [E]>,
    classes: usize,
    targets: &'a [i64],
    options: lse::LinearCrossEntropyOptions<'a>,
    grad_output: Option<&'a [f32]>,
}

/// [`LinearCall`]'s loss (one value, or one per row) and gradients.
pub(crate) type LinearHostOut = (Vec<f32>, Option<[TensorData; 3]>);

impl<E: HostElement + lse::Element<Stat = f32>> LinearCall<'_, E> {
    fn run(self) -> LinearHostOut {
        let head = LinearHead {
            weight: self.weight,
            bias: self.bias,
            classes: self.classes,
        };
        let (out, grads) = match self.grad_output {
            None => (
                lse::linear_cross_entropy(
                    self.hidden,
                    head,
                    lse::Targets::Classes(self.targets),
                    &self.options,
                ),
                None,
            ),
            Some(g) => {
                let zero = E::from_f64(0.0);
                let mut dh = vec![zero; self.hidden.len()];
                let mut dw = vec![zero; self.weight.len()];
                let mut db = vec![zero; self.classes];
                let grad_output = match g {
                    [one] if self.options.cross_entropy.reduction != lse::Reduction::None => {
                        GradOutput::Scalar(*one)
                    }
                    rows => GradOutput::PerRow(rows),
                };
                let grads = LinearGradients {
                    hidden: &mut dh,
                    weight: &mut dw,
                    bias: Some(&mut db),
                };
                let out = lse::linear_cross_entropy_with_grad(
                    self.hidden,
                    head,
                    lse::Targets::Classes(self.targets),
                    &self.options,
                    grad_output,
                    grads,
                );
                (out, Some([flat(dh), flat(dw), flat(db)]))
            }
        };
        let out = out.expect("checked input");
        let loss = match out.row_loss {
            Some(rows) if self.options.cross_entropy.reduction == lse::Reduction::None => rows,
            _ => vec![out.loss],
        };
        (loss, grads)
    }
}

/// The cross-entropy of `hidden · weightᵀ + bias` against `targets`, a chunk of rows at a
/// time (`lse::linear_cross_entropy`), with the gradients for the incoming gradient
/// `grad_output` (one value, or one per row with `Reduction::None`) when given. `bias` is
/// used only when `has_bias`.
pub(crate) fn linear_cross_entropy<B: Backend, R: HostRead<B>>(
    hidden: FloatTensor<B>,
    weight: FloatTensor<B>,
    bias: FloatTensor<B>,
    has_bias: bool,
    targets: IntTensor<B>,
    options: &LinearCrossEntropyOptions,
    grad_output: Option<Vec<f32>>,
) -> LinearOut<B> {
    struct Op<'a> {
        weight: &'a Floats<'a>,
        bias: Option<&'a Floats<'a>>,
        classes: usize,
        targets: &'a [i64],
        options: lse::LinearCrossEntropyOptions<'a>,
        grad_output: Option<&'a [f32]>,
    }
    impl OnFloats for Op<'_> {
        type Out = Option<LinearHostOut>;
        fn run<E: HostElement>(self, hidden: &[E]) -> Self::Out {
            E::linear(LinearCall {
                hidden,
                weight: E::slice(self.weight).expect("one dtype"),
                bias: self.bias.map(|b| E::slice(b).expect("one dtype")),
                classes: self.classes,
                targets: self.targets,
                options: self.options,
                grad_output: self.grad_output,
            })
        }
    }
    let device = hidden.device();
    let (h_shape, w_shape) = (hidden.shape(), weight.shape());
    let classes = w_shape.as_slice()[0];
    let targets = self::targets::<B>(targets);
    let mut core = options.cross_entropy.as_lse();
    core.non_finite = NonFinite::Propagate;
    let core = lse::LinearCrossEntropyOptions {
        cross_entropy: core,
        budget_bytes: options.budget_bytes,
    };
    let weight_values = R::floats(&weight);
    let bias_values = has_bias.then(|| R::floats(&bias));
    let (loss, grads) = R::floats(&hidden)
        .run(Op {
            weight: &weight_values,
            bias: bias_values.as_ref(),
            classes,
            targets: &targets,
            options: core,
            grad_output: grad_output.as_deref(),
        })
        .expect("f64 is turned away before");
    let loss_len = loss.len();
    LinearOut {
        loss: upload::<B, f32>(loss, [loss_len], &device),
        grads: grads.map(|[dh, dw, db]| {
            [
                upload_as::<B>(dh, h_shape, &device),
                upload_as::<B>(dw, w_shape, &device),
                upload_as::<B>(db, [classes], &device),
            ]
        }),
    }
}

/// Host values as flat tensor data of their own dtype.
fn flat<T: burn::tensor::Element>(values: Vec<T>) -> TensorData {
    let len = values.len();
    TensorData::new(values, [len])
}

/// `data` (flat) as a tensor of `shape` on `device`, without a copy of its bytes.
fn upload_as<B: Backend>(
    data: TensorData,
    shape: impl Into<Shape>,
    device: &burn::backend::tensor::Device<B>,
) -> FloatTensor<B> {
    let (bytes, _, dtype) = data.into_parts();
    B::float_from_data(TensorData::from_bytes(bytes, shape, dtype), device)
}

/// A small float tensor's values as `T` (an incoming gradient: one value or one per row).
pub(crate) fn values<B: Backend, T: burn::tensor::Element>(tensor: FloatTensor<B>) -> Vec<T> {
    read(B::float_into_data(tensor))
        .convert::<T>()
        .into_vec()
        .expect("converted data")
}
