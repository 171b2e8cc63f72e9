//! Per-matrix solvers of the layer-wise problem `min ||X W^T - X W0^T||^2` under a sparsity
//! pattern, on the host in f64. `W` is `[out, in]` (PyTorch layout); `H = X^T X` is `[in, in]`.

use faer::linalg::solvers::DenseSolveCore;
use faer::{Mat, Side};

use crate::{Error, Pattern, Result};

/// Keep-mask of the `k` largest `score`s among `idx` (ties to the lower position).
fn keep_top(score: &[f64], idx: &[usize], k: usize, keep: &mut [bool]) {
    let mut order: Vec<usize> = idx.to_vec();
    if k < order.len() {
        // Linear-time selection; the order is total, so the first k are exactly the best k.
        order.select_nth_unstable_by(k, |&a, &b| score[b].total_cmp(&score[a]).then(a.cmp(&b)));
        order.truncate(k);
    }
    for i in order {
        keep[i] = true;
    }
}

/// The keep-mask of a `[rows, cols]` score matrix (row-major) under `pattern`, where
/// `per_row` chooses between one budget per row and one for the whole matrix (unstructured).
/// N:M groups run along the columns (the input dimension) of every row.
pub fn mask(score: &[f64], rows: usize, cols: usize, pattern: Pattern, per_row: bool) -> Vec<bool> {
    let mut keep = vec![false; rows * cols];
    match pattern {
        Pattern::Unstructured(sp) => {
            if per_row {
                let k = ((1.0 - sp) * cols as f64).round() as usize;
                for r in 0..rows {
                    let idx: Vec<usize> = (r * cols..(r + 1) * cols).collect();
                    keep_top(score, &idx, k, &mut keep);
                }
            } else {
                let k = ((1.0 - sp) * (rows * cols) as f64).round() as usize;
                let idx: Vec<usize> = (0..rows * cols).collect();
                keep_top(score, &idx, k, &mut keep);
            }
        }
        Pattern::NM { n, m } => {
            for r in 0..rows {
                for g in (0..cols).step_by(m) {
                    let idx: Vec<usize> = (r * cols + g..r * cols + (g + m).min(cols)).collect();
                    keep_top(score, &idx, n, &mut keep);
                }
            }
        }
    }
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
    let mut b0 = 0;
    while b0 < cols {
        let b1 = (b0 + block).min(cols);
        let count = b1 - b0;
        let mut err = Mat::<f64>::zeros(rows, count);
        // Unstructured: one threshold over the whole block.
        let mut keep = vec![true; rows * count];
        if let Pattern::Unstructured(_) = pattern {
            let s: Vec<f64> = (0..rows * count)
                .map(|i| {
                    let (r, c) = (i / count, i % count);
                    w[(r, b0 + c)].powi(2) / u[(b0 + c, b0 + c)].powi(2)
                })
                .collect();
            keep = mask(&s, rows, count, pattern, false);
        }
        for c in 0..count {
            let j = b0 + c;
            if let Pattern::NM { n, m } = pattern
                && j.is_multiple_of(m)
            {
                let g = m.min(cols - j);
                for r in 0..rows {
                    let s: Vec<f64> = (0..g)
                        .map(|t| w[(r, j + t)].powi(2) / u[(j + t, j + t)].powi(2))
                        .collect();
                    let idx: Vec<usize> = (0..g).collect();
                    let mut k = vec![false; g];
                    keep_top(&s, &idx, n, &mut k);
                    for t in 0..g {
                        keep[r * count + c + t] = k[t];
                    }
                }
            }
            let d = u[(j, j)];
            for r in 0..rows {
                let wv = w[(r, j)];
                let q = if keep[r * count + c] { wv } else { 0.0 };
                let e = (wv - q) / d;
                w[(r, j)] = q;
                err[(r, c)] = e;
                if e != 0.0 {
                    for t in j + 1..b1 {
                        w[(r, t)] -= e * u[(j, t)];
                    }
                }
            }
        }
        if b1 < cols {
            // Lazy update of the later columns: W[:, b1:] -= Err U[b0:b1, b1:].
            let ublk = u.submatrix(b0, b1, count, cols - b1).to_owned();
            let upd = &err * &ublk;
            for r in 0..rows {
                for t in 0..cols - b1 {
                    w[(r, b1 + t)] -= upd[(r, t)];
                }
            }
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

/// Projection of a `[in, out]` matrix (row-major values) onto the pattern: global top-k of
/// `|.|` (unstructured) or top-n of every group of `m` inputs in each output column.
fn project_b(b: &Mat<f64>, pattern: Pattern) -> Vec<bool> {
    // Work in [out, in] so that N:M groups run along the inputs of each output.
    let (nin, nout) = (b.nrows(), b.ncols());
    let s: Vec<f64> = (0..nout * nin)
        .map(|i| b[(i % nin, i / nin)].abs())
        .collect();
    let k = mask(&s, nout, nin, pattern, false);
    // Back to [in, out] order.
    (0..nin * nout)
        .map(|i| k[(i % nout) * nin + i / nout])
        .collect()
}

fn masked(b: &Mat<f64>, keep: &[bool]) -> Mat<f64> {
    let c = b.ncols();
    Mat::from_fn(
        b.nrows(),
        c,
        |i, j| if keep[i * c + j] { b[(i, j)] } else { 0.0 },
    )
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
    let (nout, nin) = (w0.nrows(), w0.ncols());
    let hd = damped(h, s.damp)?;
    let d: Vec<f64> = (0..nin).map(|i| hd[(i, i)].sqrt() + 1e-8).collect();
    let hn = Mat::from_fn(nin, nin, |i, j| hd[(i, j)] / (d[i] * d[j]));
    let b0 = Mat::from_fn(nin, nout, |i, o| w0[(o, i)] * d[i]);
    let hb0 = &hn * &b0;
    let eig = hn
        .self_adjoint_eigen(Side::Lower)
        .map_err(|e| Error::Invalid(format!("eigen-decomposition failed: {e:?}")))?;
    let q = eig.U().to_owned();
    let lam: Vec<f64> = (0..nin).map(|i| eig.S().column_vector()[i]).collect();
    let qt = q.transpose().to_owned();
    let solve = |rhs: &Mat<f64>, rho: f64| -> Mat<f64> {
        let mut t = &qt * rhs;
        for i in 0..nin {
            let f = 1.0 / (lam[i] + rho);
            for o in 0..nout {
                t[(i, o)] *= f;
            }
        }
        &q * &t
    };
    let keep0 = project_b(&b0, pattern);
    let k = keep0.iter().filter(|&&x| x).count().max(1);
    let init_d = masked(&b0, &keep0);
    let (mut dm, mut v) = (init_d.clone(), Mat::<f64>::zeros(nin, nout));
    let mut b = b0.clone();
    let mut support = keep0.clone();
    let mut rho = s.rho;
    let mut increased = false;
    let mut flips_since = 0usize;
    let mut iterations = 0;
    for it in 1..=s.max_iter {
        iterations = it;
        let rhs = Mat::from_fn(nin, nout, |i, o| hb0[(i, o)] - v[(i, o)] + rho * dm[(i, o)]);
        b = solve(&rhs, rho);
        let z = Mat::from_fn(nin, nout, |i, o| b[(i, o)] + v[(i, o)] / rho);
        let keep = project_b(&z, pattern);
        flips_since += keep.iter().zip(&support).filter(|(a, b)| a != b).count();
        support = keep;
        dm = masked(&z, &support);
        for i in 0..nin {
            for o in 0..nout {
                v[(i, o)] += rho * (b[(i, o)] - dm[(i, o)]);
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
                    v = Mat::zeros(nin, nout);
                    support = keep0.clone();
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
    let keep = project_b(&b, pattern);
    let mut bs = masked(&b, &keep);
    cg_on_support(&hn, &hb0, &mut bs, &keep, s.cg_iter, s.cg_rtol);
    let w = Mat::from_fn(nout, nin, |o, i| bs[(i, o)] / d[i]);
    Ok((w, AlpsTrace { iterations, rho }))
}

/// Conjugate gradient on `A B = R0` restricted to the support `keep` (residuals and directions
/// are masked), one independent system per column of `B`, warm-started at `b`.
pub fn cg_on_support(
    a: &Mat<f64>,
    rhs: &Mat<f64>,
    b: &mut Mat<f64>,
    keep: &[bool],
    iters: usize,
    rtol: f64,
) {
    let (n, cols) = (b.nrows(), b.ncols());
    let msk = |m: &Mat<f64>| masked(m, keep);
    let ab = a * &*b;
    let mut r = msk(&Mat::from_fn(n, cols, |i, j| rhs[(i, j)] - ab[(i, j)]));
    let mut p = r.clone();
    let col_dot =
        |x: &Mat<f64>, y: &Mat<f64>, j: usize| (0..n).map(|i| x[(i, j)] * y[(i, j)]).sum::<f64>();
    let mut rr: Vec<f64> = (0..cols).map(|j| col_dot(&r, &r, j)).collect();
    let tol: Vec<f64> = (0..cols)
        .map(|j| rtol * rtol * col_dot(&msk(rhs), &msk(rhs), j).max(1e-300))
        .collect();
    for _ in 0..iters {
        if (0..cols).all(|j| rr[j] <= tol[j]) {
            break;
        }
        let ap = msk(&(a * &p));
        for j in 0..cols {
            if rr[j] <= tol[j] {
                continue;
            }
            let pap = col_dot(&p, &ap, j);
            if pap <= 0.0 {
                continue;
            }
            let alpha = rr[j] / pap;
            for i in 0..n {
                b[(i, j)] += alpha * p[(i, j)];
                r[(i, j)] -= alpha * ap[(i, j)];
            }
            let new = col_dot(&r, &r, j);
            let beta = new / rr[j];
            rr[j] = new;
            for i in 0..n {
                p[(i, j)] = r[(i, j)] + beta * p[(i, j)];
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
