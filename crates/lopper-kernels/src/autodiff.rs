//! A matrix product recorded on burn's autodiff graph whose forward and backward products both
//! run on the BLAS (burn-autodiff's own matmul calls the inner backend's portable product).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, binary};
use burn::tensor::ops::FloatTensorOps;
use burn_flex::{Flex, FlexTensor};

use crate::matmul::{AutodiffTensor, flex_product};

/// `lhs * rhs` (equal batch dimensions); the gradients are `grad * rhs^T` and `lhs^T * grad`.
#[derive(Debug)]
struct BlasMatmul;

impl Backward<Flex, 2> for BlasMatmul {
    /// The operand each gradient needs: `lhs` when `rhs` is tracked, `rhs` when `lhs` is.
    type State = (Option<FlexTensor>, Option<FlexTensor>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (lhs, rhs) = ops.state;
        binary::<Flex, _, _>(
            ops.parents,
            ops.node,
            grads,
            |grad| {
                let rhs = rhs.expect("kept when lhs is tracked");
                flex_product(grad, Flex::float_transpose(rhs))
            },
            |grad| {
                let lhs = lhs.expect("kept when rhs is tracked");
                flex_product(Flex::float_transpose(lhs), grad)
            },
        );
    }
}

pub(crate) fn blas_matmul(
    lhs: AutodiffTensor<Flex>,
    rhs: AutodiffTensor<Flex>,
) -> AutodiffTensor<Flex> {
    let (lhs_tracked, rhs_tracked) = (lhs.is_tracked(), rhs.is_tracked());
    match BlasMatmul
        .prepare::<NoCheckpointing>([lhs.node.clone(), rhs.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let state = (
                rhs_tracked.then(|| lhs.primitive.clone()),
                lhs_tracked.then(|| rhs.primitive.clone()),
            );
            prep.finish(state, flex_product(lhs.primitive, rhs.primitive))
        }
        OpsKind::UnTracked(prep) => prep.finish(flex_product(lhs.primitive, rhs.primitive)),
    }
}
