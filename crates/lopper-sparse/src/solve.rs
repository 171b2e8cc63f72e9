//! Per-matrix solvers of the layer-wise problem `min ||X W^T - X W0^T||^2` under a sparsity
//! pattern, on the host in f64. `W` is `[out, in]` (PyTorch layout); `H = X^T X` is `[in, in]`.

use faer::linalg::solvers::DenseSolveCore;
use faer::{Mat, Side};

use crate::{Error, Pattern, Result};

/// Keep the `k` largest of `vals` (ties to the lower position), writing `keep`; `scratch` is
/// reused between calls. Linear time: one selection finds the k-th largest value, then everything
/// above it and the first ties are kept.
fn keep_top_slice(vals: &[f64], k: usize, keep: &mut [bool], scratch: &mut Vec<f64>) {
    let n = vals.len();
    if k >= n {
        keep.fill(true);
        return;
    }
    keep.fill(false);
    if k == 0 {
        return;
    }
    if n <= 8 {
        // Small groups (N:M): rank directly.
        for i in 0..n {
            let above = (0..n)
                .filter(|&j| vals[j] > vals[i] || (vals[j] == vals[i] && j < i))
                .count();
            keep[i] = above < k;
        }
        return;
    }
    scratch.clear();
    scratch.extend_from_slice(vals);
    let (_, thr, _) = scratch.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let thr = *thr;
    let mut taken = 0;
    for (kp, v) in keep.iter_mut().zip(vals) {
        if v.total_cmp(&thr).is_gt() {
            *kp = true;
            taken += 1;
        }
    }
    for (kp, v) in keep.iter_mut().zip(vals) {
        if taken == k {
            break;
        }
        if v.total_cmp(&thr).is_eq() {
            *kp = true;
            taken += 1;
        }
    }
}

/// [`mask`] into a caller's buffers (the ADMM loop calls it every iteration).
fn mask_into(
    score: &[f64],
    rows: usize,
    cols: usize,
    pattern: Pattern,
    per_row: bool,
    keep: &mut [bool],
    scratch: &mut Vec<f64>,
) {
    match pattern {
        Pattern::Unstructured(sp) => {
            if per_row {
                let k = ((1.0 - sp) * cols as f64).round() as usize;
                for (s, kp) in score.chunks(cols).zip(keep.chunks_mut(cols)) {
                    keep_top_slice(s, k, kp, scratch);
                }
            } else {
                let k = ((1.0 - sp) * (rows * cols) as f64).round() as usize;
                keep_top_slice(score, k, keep, scratch);
            }
        }
        Pattern::NM { n, m } => {
            for (s, kp) in score.chunks(cols).zip(keep.chunks_mut(cols)) {
                for (g, kg) in s.chunks(m).zip(kp.chunks_mut(m)) {
                    keep_top_slice(g, n, kg, scratch);
                }
            }
        }
    }
}

/// The keep-mask of a `[rows, cols]` score matrix (row-major) under `pattern`, where
/// `per_row` chooses between one budget per row and one for the whole matrix (unstructured).
/// N:M groups run along the columns (the input dimension) of every row. Among equal scores the
/// lower position is kept.
pub fn mask(score: &[f64], rows: usize, cols: usize, pattern: Pattern, per_row: bool) -> Vec<bool> {
    let mut keep = vec![false; rows * cols];
    mask_into(
        score,
        rows,
        cols,
        pattern,
        per_row,
        &mut keep,
        &mut Vec::new(),
    );
    keep
}

fn to_vec(w: &Mat<f64>) -> Vec<f64> {
    let (r, c) = (w.nrows(), w.ncols());
    (0..r * c).map(|i| w[(i / c, i % c)]).collect()
}

fn apply_mask(w: &Mat<f64>, keep: &[bool]) -> Mat<f64> {
    let c = w.ncols();
    Mat::from_fn(
        w.nrows(),
        c,
        |i, j| if keep[i * c + j] { w[(i, j)] } else { 0.0 },
    )
}

/// Magnitude pruning: the largest `|W|` of the whole matrix (unstructured) or of every group.
pub fn magnitude(w: &Mat<f64>, pattern: Pattern) -> Mat<f64> {
    let s: Vec<f64> = to_vec(w).iter().map(|x| x.abs()).collect();
    apply_mask(w, &mask(&s, w.nrows(), w.ncols(), pattern, false))
}

/// Wanda: score `|W_ij| * sqrt(H_jj)` (`sqrt(H_jj)` is the norm of input feature `j` over the
/// calibration tokens), pruned per output row (unstructured) or per group (N:M).
pub fn wanda(w: &Mat<f64>, h: &Mat<f64>, pattern: Pattern) -> Mat<f64> {
    let c = w.ncols();
    let s: Vec<f64> = to_vec(w)
        .iter()
        .enumerate()
        .map(|(i, x)| x.abs() * h[(i % c, i % c)].max(0.0).sqrt())
        .collect();
    apply_mask(w, &mask(&s, w.nrows(), c, pattern, true))
}

/// `H + damp * mean(diag H) * I`, with dead inputs (`H_jj = 0`) given `H_jj = 1`.
pub fn damped(h: &Mat<f64>, damp: f64) -> Result<Mat<f64>> {
    if damp.is_nan() || damp < 0.0 {
        return Err(Error::Invalid(format!(
            "damping {damp} is impossible; use a non-negative fraction of the mean diagonal (0.01)"
        )));
    }
    let n = h.nrows();
    let mean = (0..n).map(|i| h[(i, i)]).sum::<f64>() / n as f64;
    let mut d = h.clone();
    for i in 0..n {
        if d[(i, i)] == 0.0 {
            d[(i, i)] = 1.0;
        }
        d[(i, i)] += damp * mean;
    }
    Ok(d)
}

/// SparseGPT (Frantar & Alistarh 2023): columns swept left to right in blocks of `block`;
/// inside a block the mask is chosen by `w^2 / [H^-1]_jj^2` (over the block for unstructured,
/// per group for N:M), each pruned weight's error `w / [U]_jj` is pushed onto the later columns
/// through the upper Cholesky factor `U` of `H^-1`, and blocks are updated lazily.
pub fn sparsegpt(
    w0: &Mat<f64>,
    h: &Mat<f64>,
    pattern: Pattern,
    damp: f64,
    block: usize,
) -> Result<Mat<f64>> {
    let (rows, cols) = (w0.nrows(), w0.ncols());
    let mut w = w0.clone();
    for j in 0..cols {
        if h[(j, j)] == 0.0 {
            for r in 0..rows {
                w[(r, j)] = 0.0;
            }
        }
    }
    let hd = damped(h, damp)?;
    let hinv = hd
        .llt(Side::Lower)
        .map_err(|e| Error::Invalid(format!("H is not positive definite after damping: {e:?}")))?
        .inverse();
    let l = hinv
        .llt(Side::Lower)
        .map_err(|e| Error::Invalid(format!("H^-1 is not positive definite: {e:?}")))?;
    // Upper factor U = L^T, so that H^-1 = U^T U.
    let u: Mat<f64> = l.L().transpose().to_owned();
    // N:M groups must not straddle blocks: the block is a multiple of M (as the reference needs).
    let block = match pattern {
        Pattern::NM { m, .. } => block.max(1).div_ceil(m) * m,
        Pattern::Unstructured(_) => block.max(1),
    };
    // faer matrices are column-major: every update below runs down whole columns, and the
    // buffers are allocated once.
    let mut err = Mat::<f64>::zeros(rows, block);
    let mut keep = vec![true; rows * block];
    let mut score = Vec::with_capacity(rows * block);
    let mut scratch = Vec::new();
    let mut b0 = 0;
    while b0 < cols {
        let b1 = (b0 + block).min(cols);
        let count = b1 - b0;
        // The keep-mask of the block, row-major (`keep[r * count + c]`).
        let keep = &mut keep[..rows * count];
        match pattern {
            // Unstructured: one threshold over the whole block.
            Pattern::Unstructured(_) => {
                score.clear();
                score.extend((0..rows * count).map(|i| {
                    let (r, c) = (i / count, i % count);
                    w[(r, b0 + c)].powi(2) / u[(b0 + c, b0 + c)].powi(2)
                }));
                mask_into(&score, rows, count, pattern, false, keep, &mut scratch);
            }
            Pattern::NM { .. } => keep.fill(true),
        }
        for c in 0..count {
            let j = b0 + c;
            if let Pattern::NM { n, m } = pattern
                && j.is_multiple_of(m)
            {
                let g = m.min(cols - j);
                let mut k = vec![false; g];
                for r in 0..rows {
                    let s: Vec<f64> = (0..g)
                        .map(|t| w[(r, j + t)].powi(2) / u[(j + t, j + t)].powi(2))
                        .collect();
                    keep_top_slice(&s, n, &mut k, &mut Vec::new());
                    keep[r * count + c..r * count + c + g].copy_from_slice(&k);
                }
            }
            let d = u[(j, j)];
            for r in 0..rows {
                let wv = w[(r, j)];
                let q = if keep[r * count + c] { wv } else { 0.0 };
                w[(r, j)] = q;
                err[(r, c)] = (wv - q) / d;
            }
            // Each pruned weight's error onto the block's later columns: W[:, t] -= e U[j, t].
            let e = err.col(c);
            for t in j + 1..b1 {
                let ujt = u[(j, t)];
                let mut wt = w.col_mut(t);
                for r in 0..rows {
                    wt[r] -= e[r] * ujt;
                }
            }
        }
        if b1 < cols {
            // Lazy update of the later columns: W[:, b1:] -= Err U[b0:b1, b1:].
            faer::linalg::matmul::matmul(
                w.submatrix_mut(0, b1, rows, cols - b1),
                faer::Accum::Add,
                err.submatrix(0, 0, rows, count),
                u.submatrix(b0, b1, count, cols - b1),
                -1.0,
                faer::get_global_parallelism(),
            );
        }
        b0 = b1;
    }
    Ok(w)
}

/// Settings of [`alps`] (the reference's values by default).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AlpsSettings {
    /// Damping as a fraction of the mean diagonal of H.
    pub damp: f64,
    /// Initial ADMM penalty.
    pub rho: f64,
    /// ADMM iteration cap.
    pub max_iter: usize,
    /// Conjugate-gradient iterations on the support.
    pub cg_iter: usize,
    /// Conjugate-gradient relative tolerance.
    pub cg_rtol: f64,
}

impl Default for AlpsSettings {
    fn default() -> Self {
        Self {
            damp: 0.01,
            rho: 0.1,
            max_iter: 300,
            cg_iter: 10,
            cg_rtol: 1e-4,
        }
    }
}

/// What ALPS did on one matrix.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct AlpsTrace {
    /// ADMM iterations run.
    pub iterations: usize,
    /// Final penalty.
    pub rho: f64,
}

/// The per-input-matrix part of ALPS, shared by every linear that reads the same input (q, k
/// and v; gate and up): damping, the Jacobi scaling `d = sqrt(diag H) + 1e-8`, the scaled
/// `Hn = D^-1 H D^-1` and its eigen-decomposition `Hn = Q diag(lam) Q^T`.
#[derive(Debug)]
pub struct AlpsFactor {
    d: Vec<f64>,
    hn: Mat<f64>,
    q: Mat<f64>,
    lam: Vec<f64>,
}

impl AlpsFactor {
    /// Factors the Gram matrix `h` (`[in, in]`) with damping `damp` (fraction of the mean
    /// diagonal).
    pub fn new(h: &Mat<f64>, damp: f64) -> Result<Self> {
        let nin = h.nrows();
        let hd = damped(h, damp)?;
        let d: Vec<f64> = (0..nin).map(|i| hd[(i, i)].sqrt() + 1e-8).collect();
        let hn = Mat::from_fn(nin, nin, |i, j| hd[(i, j)] / (d[i] * d[j]));
        let eig = hn
            .self_adjoint_eigen(Side::Lower)
            .map_err(|e| Error::Invalid(format!("eigen-decomposition failed: {e:?}")))?;
        let q = eig.U().to_owned();
        let lam: Vec<f64> = (0..nin).map(|i| eig.S().column_vector()[i]).collect();
        Ok(Self { d, hn, q, lam })
    }
}

/// `dst = src` masked by `keep` (column `o` of a `[in, out]` matrix owns `keep[o*in..]`).
fn masked_into(dst: &mut Mat<f64>, src: &Mat<f64>, keep: &[bool]) {
    let nin = src.nrows();
    for o in 0..src.ncols() {
        let k = &keep[o * nin..(o + 1) * nin];
        for ((x, &s), &kp) in dst
            .col_as_slice_mut(o)
            .iter_mut()
            .zip(src.col_as_slice(o))
            .zip(k)
        {
            *x = if kp { s } else { 0.0 };
        }
    }
}

fn masked(b: &Mat<f64>, keep: &[bool]) -> Mat<f64> {
    let mut m = Mat::zeros(b.nrows(), b.ncols());
    masked_into(&mut m, b, keep);
    m
}

/// Buffers of the projection step: `|.|` in `[out, in]` row-major order (which is the
/// column-major order of the `[in, out]` matrix `B`), the keep-mask, selection scratch.
struct Projector {
    pattern: Pattern,
    abs: Vec<f64>,
    scratch: Vec<f64>,
}

impl Projector {
    /// Projection of a `[in, out]` matrix onto the pattern: top-k of `|.|` over the whole
    /// matrix (unstructured) or top-n of every group of `m` inputs of each output.
    fn project(&mut self, b: &Mat<f64>, keep: &mut [bool]) {
        let (nin, nout) = (b.nrows(), b.ncols());
        self.abs.clear();
        for o in 0..nout {
            self.abs.extend(b.col_as_slice(o).iter().map(|x| x.abs()));
        }
        mask_into(
            &self.abs,
            nout,
            nin,
            self.pattern,
            false,
            keep,
            &mut self.scratch,
        );
    }
}

/// ALPS (Meng et al. 2024): Jacobi-scaled problem in `B = (W D)^T` with `Hn = D^-1 H D^-1`,
/// ADMM `B <- (Hn + rho I)^-1 (Hn B0 - V + rho D)`, `D <- P(B + V / rho)`, `V <- V + rho (B - D)`
/// with the reference's adaptive rho schedule (every 3 iterations, from the support flips) and
/// early stop, then conjugate gradient on the final support. One eigen-decomposition of `Hn`
/// serves every rho.
pub fn alps(
    w0: &Mat<f64>,
    h: &Mat<f64>,
    pattern: Pattern,
    s: &AlpsSettings,
) -> Result<(Mat<f64>, AlpsTrace)> {
    alps_factored(w0, &AlpsFactor::new(h, s.damp)?, pattern, s)
}

/// [`alps`] on an already factored input (see [`AlpsFactor`]). Each iteration costs two
/// `in x in x out` products (`Q^T rhs`, `Q t`) written into preallocated buffers; everything
/// else is linear in the matrix size.
pub fn alps_factored(
    w0: &Mat<f64>,
    f: &AlpsFactor,
    pattern: Pattern,
    s: &AlpsSettings,
) -> Result<(Mat<f64>, AlpsTrace)> {
    use faer::Accum;
    use faer::linalg::matmul::matmul;
    let (nout, nin) = (w0.nrows(), w0.ncols());
    if f.d.len() != nin {
        return Err(Error::Invalid(format!(
            "the factored input has {} features but the matrix has {nin} inputs",
            f.d.len()
        )));
    }
    let par = faer::get_global_parallelism();
    let (d, hn, q, lam) = (&f.d, &f.hn, &f.q, &f.lam);
    let b0 = Mat::from_fn(nin, nout, |i, o| w0[(o, i)] * d[i]);
    let hb0 = hn * &b0;
    let mut proj = Projector {
        pattern,
        abs: Vec::with_capacity(nin * nout),
        scratch: Vec::with_capacity(nin * nout),
    };
    let mut keep0 = vec![false; nin * nout];
    proj.project(&b0, &mut keep0);
    let k = keep0.iter().filter(|&&x| x).count().max(1);
    let init_d = masked(&b0, &keep0);
    let (mut dm, mut v) = (init_d.clone(), Mat::<f64>::zeros(nin, nout));
    let mut b = b0.clone();
    let (mut rhs, mut t, mut z) = (
        Mat::<f64>::zeros(nin, nout),
        Mat::<f64>::zeros(nin, nout),
        Mat::<f64>::zeros(nin, nout),
    );
    let mut support = keep0.clone();
    let mut keep = vec![false; nin * nout];
    let mut rho = s.rho;
    let mut increased = false;
    let mut flips_since = 0usize;
    let mut iterations = 0;
    for it in 1..=s.max_iter {
        iterations = it;
        for o in 0..nout {
            let (hb, vv, dd) = (hb0.col_as_slice(o), v.col_as_slice(o), dm.col_as_slice(o));
            for (i, r) in rhs.col_as_slice_mut(o).iter_mut().enumerate() {
                *r = hb[i] - vv[i] + rho * dd[i];
            }
        }
        // B = Q diag(1 / (lam + rho)) Q^T rhs.
        matmul(
            t.as_mut(),
            Accum::Replace,
            q.transpose(),
            rhs.as_ref(),
            1.0,
            par,
        );
        let inv: Vec<f64> = lam.iter().map(|l| 1.0 / (l + rho)).collect();
        for o in 0..nout {
            for (x, f) in t.col_as_slice_mut(o).iter_mut().zip(&inv) {
                *x *= f;
            }
        }
        matmul(b.as_mut(), Accum::Replace, q.as_ref(), t.as_ref(), 1.0, par);
        for o in 0..nout {
            let (bb, vv) = (b.col_as_slice(o), v.col_as_slice(o));
            for (i, x) in z.col_as_slice_mut(o).iter_mut().enumerate() {
                *x = bb[i] + vv[i] / rho;
            }
        }
        proj.project(&z, &mut keep);
        flips_since += keep.iter().zip(&support).filter(|(a, b)| a != b).count();
        std::mem::swap(&mut support, &mut keep);
        masked_into(&mut dm, &z, &support);
        for o in 0..nout {
            let (bb, dd) = (b.col_as_slice(o), dm.col_as_slice(o));
            for (i, x) in v.col_as_slice_mut(o).iter_mut().enumerate() {
                *x += rho * (bb[i] - dd[i]);
            }
        }
        if it % 3 == 0 {
            let frac = flips_since as f64 / k as f64;
            if it >= 30 && frac < 3e-4 {
                break;
            }
            if frac > 0.1 {
                rho *= 1.3;
                increased = true;
            } else if frac > 0.005 {
                rho *= 1.2;
                increased = true;
            } else if flips_since > 0 {
                if increased {
                    rho *= 1.1;
                } else {
                    rho /= 5.0;
                    b = b0.clone();
                    dm = init_d.clone();
                    v.fill(0.0);
                    support.copy_from_slice(&keep0);
                }
            } else if increased {
                break;
            } else {
                rho /= 5.0;
            }
            rho = rho.min(1e6);
            flips_since = 0;
        }
    }
    proj.project(&b, &mut keep);
    let mut bs = masked(&b, &keep);
    cg_on_support(hn, &hb0, &mut bs, &keep, s.cg_iter, s.cg_rtol);
    let w = Mat::from_fn(nout, nin, |o, i| bs[(i, o)] / d[i]);
    Ok((w, AlpsTrace { iterations, rho }))
}

/// Conjugate gradient on `A B = R0` restricted to the support `keep` (residuals and directions
/// are masked), one independent system per column of `B`, warm-started at `b`. Column `o` of
/// `B` owns `keep[o * rows..(o + 1) * rows]`.
pub fn cg_on_support(
    a: &Mat<f64>,
    rhs: &Mat<f64>,
    b: &mut Mat<f64>,
    keep: &[bool],
    iters: usize,
    rtol: f64,
) {
    let cols = b.ncols();
    let dot = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(a, b)| a * b).sum::<f64>();
    let mut r = masked(&(rhs - &(a * &*b)), keep);
    let mut p = r.clone();
    let mut rr: Vec<f64> = (0..cols)
        .map(|j| dot(r.col_as_slice(j), r.col_as_slice(j)))
        .collect();
    let mrhs = masked(rhs, keep);
    let tol: Vec<f64> = (0..cols)
        .map(|j| rtol * rtol * dot(mrhs.col_as_slice(j), mrhs.col_as_slice(j)).max(1e-300))
        .collect();
    for _ in 0..iters {
        if (0..cols).all(|j| rr[j] <= tol[j]) {
            break;
        }
        let ap = masked(&(a * &p), keep);
        for j in 0..cols {
            if rr[j] <= tol[j] {
                continue;
            }
            let pap = dot(p.col_as_slice(j), ap.col_as_slice(j));
            if pap <= 0.0 {
                continue;
            }
            let alpha = rr[j] / pap;
            let (pj, apj) = (p.col_as_slice(j), ap.col_as_slice(j));
            for (x, pv) in b.col_as_slice_mut(j).iter_mut().zip(pj) {
                *x += alpha * pv;
            }
            for (x, av) in r.col_as_slice_mut(j).iter_mut().zip(apj) {
                *x -= alpha * av;
            }
            let new = dot(r.col_as_slice(j), r.col_as_slice(j));
            let beta = new / rr[j];
            rr[j] = new;
            let rj = r.col_as_slice(j);
            for (x, rv) in p.col_as_slice_mut(j).iter_mut().zip(rj) {
                *x = rv + beta * *x;
            }
        }
    }
}

/// `||X W^T - X W0^T||^2 / ||X W0^T||^2 = tr(dW H dW^T) / tr(W0 H W0^T)`.
pub fn relative_error(w: &Mat<f64>, w0: &Mat<f64>, h: &Mat<f64>) -> f64 {
    let dw = Mat::from_fn(w.nrows(), w.ncols(), |i, j| w[(i, j)] - w0[(i, j)]);
    let quad = |m: &Mat<f64>| {
        let mh = m * h;
        (0..m.nrows())
            .map(|i| (0..m.ncols()).map(|j| mh[(i, j)] * m[(i, j)]).sum::<f64>())
            .sum::<f64>()
    };
    let base = quad(w0);
    if base == 0.0 { 0.0 } else { quad(&dw) / base }
}
