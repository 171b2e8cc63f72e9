//! Fused ops recorded on burn's autodiff graph (`Autodiff<Flex>`), each with its own backward:
//! the matrix product, whose forward and backward products both run on the BLAS
//! (burn-autodiff's own matmul calls the inner backend's portable product); the causal
//! attention, whose backward recomputes the probabilities block by block on the BLAS instead of
//! differentiating a dozen recorded reshapes, repeats and softmax steps; and the next-token NLL
//! of a block of logits, whose backward writes `softmax - onehot` in one pass instead of
//! differentiating a log-softmax over the vocabulary (and likewise the distillation KL);
//! SwiGLU's gate and RMSNorm, one pass each way.

use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, binary};
use burn::tensor::ops::FloatTensorOps;
use burn::tensor::{Tensor, TensorData, TensorMetadata, backend::Backend};
use burn_flex::{Flex, FlexTensor};

use crate::attention::{AttentionShape, Inputs, RopeTables, attention_flex, attention_grads};
use crate::blas::blas;
use crate::loss::{kl_flex, kl_grad, nll_flex, nll_grad};
use crate::matmul::{AutodiffTensor, downcast, flex_product, upcast};
use crate::norm::{rms_norm_flex, rms_norm_grads};
use crate::swiglu::{swiglu_flex, swiglu_grads};

/// Records `op` on the graph with the given parents and returns its output `out` (computed by
/// the caller on the inner tensors). `state` is built only when some parent is tracked.
fn record<const N: usize, O: Backward<Flex, N>>(
    op: O,
    parents: [&AutodiffTensor<Flex>; N],
    out: FlexTensor,
    state: impl FnOnce() -> O::State,
) -> AutodiffTensor<Flex> {
    let prep = op
        .prepare::<NoCheckpointing>(parents.map(|p| p.node.clone()))
        .compute_bound()
        .stateful();
    match prep {
        OpsKind::Tracked(prep) => prep.finish(state(), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

/// Adds `data` (of shape `dims`) to the gradient of `node`, when there is one to track.
fn register(grads: &mut Gradients, node: Option<NodeId>, data: Vec<f32>, dims: &[usize]) {
    if let Some(id) = node {
        grads.register::<Flex>(
            id,
            FlexTensor::from_data(TensorData::new(data, dims.to_vec())),
        );
    }
}

/// The inner tensor of an autodiff tensor, contiguous (shared, not copied, when it already is).
fn contiguous(t: &AutodiffTensor<Flex>) -> FlexTensor {
    t.primitive.clone().to_contiguous()
}

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
    let out = flex_product(lhs.primitive.clone(), rhs.primitive.clone());
    record(BlasMatmul, [&lhs, &rhs], out, || {
        (
            rhs_tracked.then(|| lhs.primitive.clone()),
            lhs_tracked.then(|| rhs.primitive.clone()),
        )
    })
}

/// [`crate::causal_attention`] recorded on the graph; its parents are the unrotated q, k, v.
#[derive(Debug)]
struct Attention;

/// What the backward reads: the inputs (contiguous, shared with the graph) and the tables.
#[derive(Debug, Clone)]
struct AttentionState {
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    shape: AttentionShape,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Backward<Flex, 3> for Attention {
    type State = AttentionState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        let s = ops.state;
        let blas = blas().expect("the op is recorded only where the BLAS is loaded");
        let inputs = Inputs {
            q: s.q.storage::<f32>(),
            k: s.k.storage::<f32>(),
            v: s.v.storage::<f32>(),
            shape: s.shape,
            rope: RopeTables {
                cos: &s.cos,
                sin: &s.sin,
            },
        };
        let (dq, dk, dv) = match attention_grads(blas, &inputs, grad.storage::<f32>()) {
            Ok(g) => g,
            Err(e) => unreachable!("operands described from their own buffers: {e}"),
        };
        let AttentionShape {
            batch,
            seq,
            heads,
            kv_heads,
            head_dim,
            ..
        } = s.shape;
        let (rows, qw, kw) = (batch * seq, heads * head_dim, kv_heads * head_dim);
        let [pq, pk, pv] = ops.parents;
        for (parent, g, width) in [(pq, dq, qw), (pk, dk, kw), (pv, dv, kw)] {
            register(grads, parent.map(|n| n.id), g, &[rows, width]);
        }
    }
}

/// The causal attention on `Autodiff<Flex>` (the caller checked dtypes, shapes and the BLAS).
pub(crate) fn attention<B: Backend>(
    q: Tensor<B, 2>,
    k: Tensor<B, 2>,
    v: Tensor<B, 2>,
    shape: AttentionShape,
    rope: RopeTables<'_>,
) -> Tensor<B, 2> {
    let blas = blas().expect("checked by the caller");
    let [q, k, v] = [q, k, v].map(downcast::<B, AutodiffTensor<Flex>, 2>);
    let [fq, fk, fv] = [&q, &k, &v].map(contiguous);
    let out = attention_flex(blas, &fq, &fk, &fv, shape, rope);
    let n = shape.seq * shape.head_dim;
    upcast(record(Attention, [&q, &k, &v], out, || AttentionState {
        q: fq,
        k: fk,
        v: fv,
        shape,
        cos: rope.cos[..n].to_vec(),
        sin: rope.sin[..n].to_vec(),
    }))
}

/// [`crate::nll`] recorded on the graph; its parent is the block of logits.
#[derive(Debug)]
struct Nll;

/// The logits (shared with the graph), the targets and each row's log-sum-exp.
#[derive(Debug, Clone)]
struct NllState {
    logits: FlexTensor,
    ids: Vec<usize>,
    lse: Vec<f32>,
}

impl Backward<Flex, 1> for Nll {
    type State = NllState;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        let s = ops.state;
        let [parent] = ops.parents;
        if let Some(node) = parent {
            let g = nll_grad(
                s.logits.storage::<f32>(),
                &s.ids,
                &s.lse,
                grad.storage::<f32>(),
            );
            register(grads, Some(node.id), g, &s.logits.shape());
        }
    }
}

/// The NLL of every row on `Autodiff<Flex>` (the caller checked the dtype and the targets).
pub(crate) fn nll<B: Backend>(logits: Tensor<B, 2>, ids: Vec<usize>) -> Tensor<B, 1> {
    let logits = downcast::<B, AutodiffTensor<Flex>, 2>(logits);
    let flat = contiguous(&logits);
    let (out, lse) = nll_flex(&flat, &ids);
    upcast(record(Nll, [&logits], out, || NllState {
        logits: flat,
        ids,
        lse,
    }))
}

/// [`crate::swiglu`] recorded on the graph; its parents are the gate and the up projection.
#[derive(Debug)]
struct Swiglu;

impl Backward<Flex, 2> for Swiglu {
    /// The two inputs, contiguous.
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        let (g, u) = ops.state;
        let dims = g.shape().to_vec();
        let (dg, du) = swiglu_grads(
            g.storage::<f32>(),
            u.storage::<f32>(),
            grad.storage::<f32>(),
        );
        let [pg, pu] = ops.parents;
        for (parent, d) in [(pg, dg), (pu, du)] {
            register(grads, parent.map(|n| n.id), d, &dims);
        }
    }
}

/// SwiGLU's gate on `Autodiff<Flex>` (the caller checked dtypes and shapes).
pub(crate) fn swiglu<B: Backend>(gate: Tensor<B, 2>, up: Tensor<B, 2>) -> Tensor<B, 2> {
    let [g, u] = [gate, up].map(downcast::<B, AutodiffTensor<Flex>, 2>);
    let [fg, fu] = [&g, &u].map(contiguous);
    let out = swiglu_flex(&fg, &fu);
    upcast(record(Swiglu, [&g, &u], out, || (fg, fu)))
}

/// [`crate::rms_norm`] recorded on the graph; its parents are the input and the weight.
#[derive(Debug)]
struct RmsNorm;

/// The input and weight (contiguous) and every row's `1 / sqrt(mean(x^2) + eps)`.
#[derive(Debug, Clone)]
struct RmsNormState {
    x: FlexTensor,
    w: FlexTensor,
    r: Vec<f32>,
}

impl Backward<Flex, 2> for RmsNorm {
    type State = RmsNormState;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        let s = ops.state;
        let dims = s.x.shape().to_vec();
        let (dx, dw) = rms_norm_grads(
            s.x.storage::<f32>(),
            s.w.storage::<f32>(),
            &s.r,
            grad.storage::<f32>(),
        );
        let [px, pw] = ops.parents;
        let n = dw.len();
        register(grads, px.map(|n| n.id), dx, &dims);
        register(grads, pw.map(|n| n.id), dw, &[n]);
    }
}

/// RMSNorm on `Autodiff<Flex>` (the caller checked dtypes and shapes).
pub(crate) fn rms_norm<B: Backend>(
    x: Tensor<B, 2>,
    weight: Tensor<B, 1>,
    eps: f32,
) -> Tensor<B, 2> {
    let x = downcast::<B, AutodiffTensor<Flex>, 2>(x);
    let w = downcast::<B, AutodiffTensor<Flex>, 1>(weight);
    let (fx, fw) = (contiguous(&x), contiguous(&w));
    let (out, r) = rms_norm_flex(&fx, &fw, eps);
    upcast(record(RmsNorm, [&x, &w], out, || RmsNormState {
        x: fx,
        w: fw,
        r,
    }))
}

/// [`crate::kl_div`] recorded on the graph; its parent is the student's logits (the teacher's
/// are a constant).
#[derive(Debug)]
struct KlDiv;

/// Both blocks of logits, each row's two log-sum-exps and the temperature.
#[derive(Debug, Clone)]
struct KlState {
    student: FlexTensor,
    teacher: FlexTensor,
    lse: Vec<[f32; 2]>,
    temperature: f32,
}

impl Backward<Flex, 1> for KlDiv {
    type State = KlState;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        let s = ops.state;
        let [parent] = ops.parents;
        if let Some(node) = parent {
            let g = kl_grad(
                s.student.storage::<f32>(),
                s.teacher.storage::<f32>(),
                &s.lse,
                s.temperature,
                grad.storage::<f32>(),
            );
            register(grads, Some(node.id), g, &s.student.shape());
        }
    }
}

/// The rows' distillation KL on `Autodiff<Flex>` (the caller checked dtypes and shapes).
pub(crate) fn kl_div<B: Backend>(
    student: Tensor<B, 2>,
    teacher: Tensor<B, 2>,
    temperature: f32,
) -> Tensor<B, 1> {
    let [s, t] = [student, teacher].map(downcast::<B, AutodiffTensor<Flex>, 2>);
    let [fs, ft] = [&s, &t].map(contiguous);
    let (out, lse) = kl_flex(&fs, &ft, temperature);
    upcast(record(KlDiv, [&s], out, || KlState {
        student: fs,
        teacher: ft,
        lse,
        temperature,
    }))
}
