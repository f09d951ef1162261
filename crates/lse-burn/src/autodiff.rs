//! The autodiff backend: each forward operation recorded with its backward pass, which runs the
//! inner backend's [`LseBackend`] methods (never a composition of generic tensor ops).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, TensorMetadata};
use burn::tensor::{FloatDType, Shape};

use crate::options::{CrossEntropyOptions, LinearCrossEntropyOptions, Reduction};
use crate::LseBackend;

/// `grad` times the incoming gradient `dy` (one value, or one per row of `grad`), in `grad`'s
/// dtype. A single `dy` is read (one value): when it is 1, the usual case of `loss.backward()`,
/// `grad` is handed over as it is, without another pass over it.
fn scale_rows<B: Backend>(grad: FloatTensor<B>, dy: FloatTensor<B>) -> FloatTensor<B> {
    let dims = grad.shape().num_dims();
    if dy.shape().num_elements() == 1 {
        let value = crate::host::values::<B, f64>(dy)[0];
        if value == 1.0 {
            return grad;
        }
        return B::float_mul_scalar(grad, value.into());
    }
    let mut dy_shape = vec![1; dims];
    dy_shape[0] = dy.shape().num_elements();
    let dy = B::float_cast(dy, FloatDType::from(grad.dtype()));
    let dy = B::float_reshape(dy, Shape::from(dy_shape));
    B::float_mul(grad, dy)
}

/// An untracked autodiff tensor (the explicit-gradient methods return plain values).
fn constant<B: Backend, C: CheckpointStrategy>(
    tensor: FloatTensor<B>,
) -> FloatTensor<Autodiff<B, C>> {
    #[derive(Debug)]
    struct Constant;
    impl<B: Backend> Backward<B, 0> for Constant {
        type State = ();
        fn backward(self, _: Ops<(), 0>, _: &mut Gradients, _: &mut Checkpointer) {}
    }
    Constant.prepare::<C>([]).compute_bound().stateless(tensor)
}

impl<B: LseBackend, C: CheckpointStrategy> LseBackend for Autodiff<B, C> {
    fn lse_logsumexp(x: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct Logsumexp;

        impl<B: LseBackend> Backward<B, 1> for Logsumexp {
            type State = FloatTensor<B>;

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let dy = grads.consume::<B>(&ops.node);
                if let [Some(parent)] = ops.parents {
                    // ∂lse/∂x = softmax(x).
                    let p = B::lse_softmax(ops.state, false);
                    grads.register::<B>(parent.id, scale_rows::<B>(p, dy));
                }
            }
        }

        match Logsumexp
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let input = x.primitive().clone();
                prep.finish(input, B::lse_logsumexp(x.into_primitive()))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::lse_logsumexp(x.into_primitive())),
        }
    }

    fn lse_softmax(x: FloatTensor<Self>, log: bool) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct Softmax {
            log: bool,
        }

        impl<B: LseBackend> Backward<B, 1> for Softmax {
            type State = FloatTensor<B>;

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let dy = grads.consume::<B>(&ops.node);
                if let [Some(parent)] = ops.parents {
                    let dx = B::lse_softmax_backward(ops.state, dy, self.log);
                    grads.register::<B>(parent.id, dx);
                }
            }
        }

        match (Softmax { log })
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = B::lse_softmax(x.into_primitive(), log);
                prep.finish(y.clone(), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::lse_softmax(x.into_primitive(), log)),
        }
    }

    fn lse_softmax_backward(
        y: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        log: bool,
    ) -> FloatTensor<Self> {
        constant::<B, C>(B::lse_softmax_backward(
            y.into_primitive(),
            dy.into_primitive(),
            log,
        ))
    }

    fn lse_cross_entropy(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        options: CrossEntropyOptions,
    ) -> FloatTensor<Self> {
        /// The gradient is computed in the forward pass (one read and one write of the logits)
        /// and only scaled here.
        #[derive(Debug)]
        struct CrossEntropy;

        impl<B: LseBackend> Backward<B, 1> for CrossEntropy {
            type State = FloatTensor<B>;

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let dy = grads.consume::<B>(&ops.node);
                if let [Some(parent)] = ops.parents {
                    grads.register::<B>(parent.id, scale_rows::<B>(ops.state, dy));
                }
            }
        }

        match CrossEntropy
            .prepare::<C>([logits.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (loss, grad) =
                    B::lse_cross_entropy_with_grad(logits.into_primitive(), targets, options);
                prep.finish(grad, loss)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::lse_cross_entropy(
                logits.into_primitive(),
                targets,
                options,
            )),
        }
    }

    fn lse_cross_entropy_with_grad(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        options: CrossEntropyOptions,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (loss, grad) =
            B::lse_cross_entropy_with_grad(logits.into_primitive(), targets, options);
        (constant::<B, C>(loss), constant::<B, C>(grad))
    }

    fn lse_linear_cross_entropy(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        has_bias: bool,
        targets: IntTensor<Self>,
        options: LinearCrossEntropyOptions,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct LinearCrossEntropy;

        /// A scalar loss's gradients are those for an incoming 1, computed in the forward pass
        /// and scaled here; per-row losses need the incoming rows, so their backward pass runs
        /// the fused kernel again.
        #[derive(Clone, Debug)]
        enum State<B: LseBackend> {
            Cached([FloatTensor<B>; 3]),
            Recompute {
                inputs: [FloatTensor<B>; 3],
                has_bias: bool,
                targets: IntTensor<B>,
                options: LinearCrossEntropyOptions,
            },
        }

        impl<B: LseBackend> Backward<B, 3> for LinearCrossEntropy {
            type State = State<B>;

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let dy = grads.consume::<B>(&ops.node);
                let gradients = match ops.state {
                    State::Cached(cached) => cached.map(|g| scale_rows::<B>(g, dy.clone())),
                    State::Recompute {
                        inputs: [h, w, b],
                        has_bias,
                        targets,
                        options,
                    } => {
                        let (_, dh, dw, db) = B::lse_linear_cross_entropy_with_grad(
                            h, w, b, has_bias, targets, options, dy,
                        );
                        [dh, dw, db]
                    }
                };
                for (parent, grad) in ops.parents.into_iter().zip(gradients) {
                    if let Some(parent) = parent {
                        grads.register::<B>(parent.id, grad);
                    }
                }
            }
        }

        let nodes = [hidden.node(), weight.node(), bias.node()];
        match LinearCrossEntropy
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let inputs = [
                    hidden.into_primitive(),
                    weight.into_primitive(),
                    bias.into_primitive(),
                ];
                if options.cross_entropy.reduction == Reduction::None {
                    let [h, w, b] = inputs.clone();
                    let loss = B::lse_linear_cross_entropy(
                        h,
                        w,
                        b,
                        has_bias,
                        targets.clone(),
                        options.clone(),
                    );
                    let state = State::Recompute {
                        inputs,
                        has_bias,
                        targets,
                        options,
                    };
                    prep.finish(state, loss)
                } else {
                    let [h, w, b] = inputs;
                    let one = crate::host::upload::<B, f32>(vec![1.0], [1], &h.device());
                    let (loss, dh, dw, db) = B::lse_linear_cross_entropy_with_grad(
                        h, w, b, has_bias, targets, options, one,
                    );
                    prep.finish(State::Cached([dh, dw, db]), loss)
                }
            }
            OpsKind::UnTracked(prep) => prep.finish(B::lse_linear_cross_entropy(
                hidden.into_primitive(),
                weight.into_primitive(),
                bias.into_primitive(),
                has_bias,
                targets,
                options,
            )),
        }
    }

    fn lse_linear_cross_entropy_with_grad(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        has_bias: bool,
        targets: IntTensor<Self>,
        options: LinearCrossEntropyOptions,
        grad_output: FloatTensor<Self>,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    ) {
        let (loss, dh, dw, db) = B::lse_linear_cross_entropy_with_grad(
            hidden.into_primitive(),
            weight.into_primitive(),
            bias.into_primitive(),
            has_bias,
            targets,
            options,
            grad_output.into_primitive(),
        );
        (
            constant::<B, C>(loss),
            constant::<B, C>(dh),
            constant::<B, C>(dw),
            constant::<B, C>(db),
        )
    }
}
