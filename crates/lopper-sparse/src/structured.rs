//! Structured reconstruction: after a structural plan, the kept `o_proj` and `down_proj` of
//! every layer are refit by damped least squares so that the pruned model's residual stream
//! follows the dense model's on calibration text (no fine-tuning).
//!
//! Layer by layer, in order, two residual streams run over the calibration windows: the dense
//! model's and the pruned model's, the latter through the layers already reconstructed. For a
//! kept projection `P` of block `b` (attention or MLP) with kept inputs `X` (its input columns
//! that the plan keeps, computed on the pruned stream) the target is
//!
//! `T = r_dense(after b) - r_pruned(before b)`
//!
//! the update that would bring the pruned residual stream back onto the dense one. It holds the
//! dense block's own output, the outputs of blocks removed whole since the last kept projection
//! (so a removed layer's update is folded into the next kept projection, per token, not only
//! its mean) and the drift left by earlier layers. `P`'s weights `W` (`[kept inputs, hidden]`)
//! and bias `b` solve
//!
//! `min ||X W + 1 b^T - T||^2 + lambda ||W - W0||^2`,
//!
//! ridge towards the dense weights `W0` of the kept inputs, `lambda = damp * mean(diag(X^T X))`
//! (SparseGPT's convention; `damp = 0.01` by default), the bias undamped. With a plan that keeps
//! everything nothing is refit and the model is the dense one. By default
//! ([`ReconSettings::held_out`]) each projection's damping is chosen on held-out batches among
//! `damp` x 1, 10, 100 and 1000 (and the bias refit alone), then refit on every batch; the
//! report gives the damping used and the held-out errors.
//!
//! Every projection also gets the *bias refit* candidate (`W0` with the least-squares bias, which
//! is never worse than FLAP's mean compensation on the same data) and the plain cut (`W0`, `b0`);
//! their calibration errors are reported, and the least-squares solution is used only when its
//! error is not above the bias refit's (it always is below without damping). A Gram matrix that
//! Cholesky cannot factor gets ten times the damping, up to six times, with a warning; a solution
//! that is not finite is never written (the bias refit is used and the report says so).

use std::time::Instant;

use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use faer::linalg::solvers::Solve;
use faer::{Mat, Side};
use lopper_core::{LayerPlan, LayerShape, MaskPlan};
use lopper_model::{DecoderLayer, LayerStepper, Llama, Tap};

use crate::proxy::{add_gram, linear_of, theta_of};
use crate::{Error, Result, host_mat};

/// Settings of [`reconstruct`].
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ReconSettings {
    /// Calibration windows per forward pass.
    pub batch_size: usize,
    /// Ridge towards the dense weights, as a fraction of the mean diagonal of `X^T X`.
    pub damp: f64,
    /// OBS choice of the removed KV groups and MLP channels: within each layer's counts that
    /// the plan fixes, the units are removed greedily by their exact cost to the damped
    /// least-squares objective of o_proj / down_proj (each removal refits the rest), instead of
    /// the plan's choice.
    pub obs: bool,
    /// Which layers also get their input projections refit (q/k/v together, gate/up
    /// together) so that, from the pruned model's inputs, they reproduce what the dense
    /// layer's projections compute from the dense inputs ([`input_refits`]).
    pub inputs: InputRefit,
    /// Choose each projection's damping on held-out calibration batches: every
    /// [`HELD_OUT_EVERY`]-th batch is left out of the fit, the candidates (the bias refit, and
    /// least squares at `damp` x 1, 10, 100 and 1000) are fit on the rest and scored on it, and
    /// the best is refit on every batch. Off: least squares at `damp`. On by default: on the
    /// default model (LLM-BIP's 20% plan, 64 windows of 512 tokens) it lowered WikiText-2
    /// perplexity from 114.07 to 112.13 @128 and from 47.19 to 46.79 @2048.
    pub held_out: bool,
}

/// Which input projections (q/k/v, gate/up) the least-squares cut refits besides o_proj and
/// down_proj. On the default model (WikiText-2 @128 / @2048, first 500 / 24 windows) refitting
/// every drifted layer's inputs gained nothing on plans that keep every block (FLAP at 30%:
/// 158.32 without, 158.93 with) and gained on plans that remove blocks whole (SLEB at 20%:
/// 117.16 / 57.83 without, 109.72 / 51.07 with; PG at 30%: 142.68 / 55.88, 131.51 / 54.61),
/// where the layer after a removed block reads an input far from the dense one. Refitting that
/// layer alone (the default, [`InputRefit::Next`]) kept most of it for less time: SLEB 110.53
/// / 52.76, PG 133.76 / 54.37.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InputRefit {
    /// Only o_proj and down_proj.
    Off,
    /// The layer that holds the first kept block after each block removed whole (a layer's
    /// attention, its MLP, or both): from that block to the end of its layer. A plan that
    /// removes no block whole refits no input projection.
    #[default]
    Next,
    /// Every kept block whose input differs from the dense model's (every block after the
    /// first change).
    All,
}

impl std::fmt::Display for InputRefit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            InputRefit::Off => "off",
            InputRefit::Next => "next",
            InputRefit::All => "all",
        })
    }
}

impl std::str::FromStr for InputRefit {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "off" | "false" => InputRefit::Off,
            "next" => InputRefit::Next,
            "all" | "true" => InputRefit::All,
            o => {
                return Err(Error::Invalid(format!(
                    "input refit `{o}`: use off, next or all"
                )));
            }
        })
    }
}

/// Per source layer, whether [`reconstruct`] refits its input projections under `mode`:
/// `(q/k/v, gate/up)`. Enumerated here only, for the refit and for [`projections`].
pub fn input_refits(plan: &MaskPlan, mode: InputRefit) -> Vec<(bool, bool)> {
    let blocks = plan.layers.iter().zip(&plan.source.layers);
    match mode {
        InputRefit::Off => vec![(false, false); plan.layers.len()],
        InputRefit::All => {
            let mut drifted = false;
            blocks
                .map(|(keep, src)| {
                    let attn_cut = keep.kv_groups.len() != src.n_kv_heads;
                    let qkv = drifted && !keep.kv_groups.is_empty();
                    let gate_up = (drifted || attn_cut) && !keep.channels.is_empty();
                    drifted |= attn_cut || keep.channels.len() != src.ffn_hidden;
                    (qkv, gate_up)
                })
                .collect()
        }
        InputRefit::Next => {
            // A block removed whole and no kept block refit since.
            let mut pending = false;
            blocks
                .map(|(keep, src)| {
                    let qkv = pending && !keep.kv_groups.is_empty();
                    pending &= !qkv;
                    pending |= src.n_kv_heads > 0 && keep.kv_groups.is_empty();
                    let gate_up = (pending || qkv) && !keep.channels.is_empty();
                    pending &= !gate_up;
                    pending |= src.ffn_hidden > 0 && keep.channels.is_empty();
                    (qkv, gate_up)
                })
                .collect()
        }
    }
}

/// Gram matrices of one projection's inputs that a least-squares refit holds at once, at most:
/// the fitted and held-out statistics, and the solve's damped copy and its Cholesky factor.
pub const LS_GRAMS: u64 = 4;

/// Gram matrices of the widest projection's inputs held at once under `settings`: [`LS_GRAMS`],
/// and two more under OBS.
pub fn ls_grams(settings: &ReconSettings) -> u64 {
    LS_GRAMS + if settings.obs { 2 } else { 0 }
}

/// Host bytes of the f64 statistics the least-squares cut holds at its peak on `shape` under
/// `settings`: the widest refit projection's [`LS_GRAMS`] Gram matrices (`(k + 1)^2` for `k`
/// kept inputs, at most the dense width) and five `(k + 1) x out` right-hand sides and
/// solutions; OBS holds two more Gram matrices (the whole-batch sum it removes units from,
/// and the restricted problem). Beside the models and the calibration's residual streams
/// (which live on the device).
pub fn ls_host_bytes(shape: &lopper_core::ModelShape, settings: &ReconSettings) -> u64 {
    let grams = ls_grams(settings);
    let bytes = |k: usize, out: usize| {
        let k = k as u64 + 1;
        8 * (grams * k * k + 5 * k * out as u64)
    };
    let h = shape.hidden_size;
    shape
        .layers
        .iter()
        .map(|l| {
            let mut b = bytes(l.n_heads * l.head_dim, h).max(bytes(l.ffn_hidden, h));
            if settings.inputs != InputRefit::Off {
                let qkv = (l.n_heads + 2 * l.n_kv_heads) * l.head_dim;
                b = b.max(bytes(h, qkv)).max(bytes(h, 2 * l.ffn_hidden));
            }
            b
        })
        .max()
        .unwrap_or(0)
}

/// With [`ReconSettings::held_out`], one calibration batch in this many is held out.
pub const HELD_OUT_EVERY: usize = 8;

/// The damping factors [`ReconSettings::held_out`] tries, times [`ReconSettings::damp`].
pub const DAMP_GRID: [f64; 4] = [1.0, 10.0, 100.0, 1000.0];

impl Default for ReconSettings {
    fn default() -> Self {
        Self {
            batch_size: 4,
            damp: 0.01,
            obs: false,
            inputs: InputRefit::default(),
            held_out: true,
        }
    }
}

/// Which solution a projection ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Chosen {
    /// The damped least-squares weights and bias.
    LeastSquares,
    /// The dense weights of the kept inputs with the least-squares bias.
    BiasRefit,
}

/// What reconstruction did to one projection.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ProjectionReport {
    /// Source decoder layer.
    pub layer: usize,
    /// `o_proj` or `down_proj`.
    pub name: &'static str,
    /// Kept input columns.
    pub inputs: usize,
    /// Calibration tokens.
    pub tokens: usize,
    /// `||prediction - T||^2 / ||T||^2` of the plain cut (dense weights and bias of the kept inputs).
    pub rel_error_cut: f64,
    /// The same for the bias refit.
    pub rel_error_bias: f64,
    /// The same for the least-squares solution.
    pub rel_error_ls: f64,
    /// The damping the solve used (raised from the setting when the Gram matrix needed it).
    pub damp: f64,
    /// The solution written.
    pub chosen: Chosen,
    /// With [`ReconSettings::held_out`]: the candidates' errors on the held-out batches.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held_out: Option<HeldOutReport>,
    /// Seconds of this projection (its share of forward passes and the solve).
    pub seconds: f64,
}

impl ProjectionReport {
    /// The calibration tokens this projection should have had when it had fewer: least squares
    /// on fewer than 10 tokens per kept input (and its bias) may fit the calibration text more
    /// than the language. Measured on the default model: 4 tokens per input lost to the bias
    /// refit on held-out text, 12 won.
    pub fn tokens_wanted(&self) -> Option<usize> {
        let want = 10 * (self.inputs + 1);
        (self.tokens < want).then_some(want)
    }
}

/// How [`ReconSettings::held_out`] chose a projection's solution.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HeldOutReport {
    /// Held-out calibration tokens.
    pub tokens: usize,
    /// `||prediction - T||^2 / ||T||^2` on them of the bias refit fit on the other batches.
    pub rel_error_bias: f64,
    /// The same for least squares at each damping tried: `(damp, error)`.
    pub rel_error_ls: Vec<(f64, f64)>,
}

/// One least-squares problem's statistics: the batches it is fit on and, with
/// [`ReconSettings::held_out`], every [`HELD_OUT_EVERY`]-th batch apart.
struct Problem {
    fit: Stats,
    check: Option<Stats>,
    batches: usize,
}

impl Problem {
    fn new(k: usize, out: usize, held_out: bool) -> Self {
        Self {
            fit: Stats::new(k, out),
            check: held_out.then(|| Stats::new(k, out)),
            batches: 0,
        }
    }

    fn add<B: Backend>(&mut self, x: Tensor<B, 2>, t: Tensor<B, 2>) -> Result<()> {
        let i = self.batches;
        self.batches += 1;
        match &mut self.check {
            Some(c) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 => c.add(x, t),
            _ => self.fit.add(x, t),
        }
    }

    /// Every batch's statistics (a copy; [`Problem::into_all`] sums in place).
    fn all(&self) -> Stats {
        match &self.check {
            Some(c) => self.fit.plus(c),
            None => self.fit.clone(),
        }
    }

    /// Every batch's statistics, the held-out ones added into the fitted ones in place (no
    /// third Gram matrix beside the two).
    fn into_all(self) -> Stats {
        let mut fit = self.fit;
        if let Some(c) = self.check {
            fit.g += &c.g;
            fit.c += &c.c;
            fit.tt += c.tt;
        }
        fit
    }

    /// The damping least squares should use: `damp`, or with held-out batches the candidate
    /// of [`DAMP_GRID`] with the least error on them when it beats the bias refit (`None`:
    /// the bias refit does), each fit on the other batches; and the held-out errors.
    fn choose(
        &self,
        theta0: &Mat<f64>,
        damp: f64,
        what: &str,
    ) -> Result<(Option<f64>, Option<HeldOutReport>)> {
        let Some(check) = self.held() else {
            return Ok((Some(damp), None));
        };
        let ct = check.tt.max(f64::MIN_POSITIVE);
        let bias = check.error(&self.fit.bias_refit(theta0)) / ct;
        let mut tried = Vec::with_capacity(DAMP_GRID.len());
        for f in DAMP_GRID {
            let (ls, used) = self.fit.solve(theta0, damp * f, what)?;
            if tried.iter().all(|&(d, _)| d != used) {
                tried.push((used, check.error(&ls) / ct));
            }
        }
        let best = tried
            .iter()
            .copied()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .filter(|&(_, e)| e <= bias)
            .map(|(d, _)| d);
        let report = HeldOutReport {
            tokens: check.tokens(),
            rel_error_bias: bias,
            rel_error_ls: tried,
        };
        Ok((best, Some(report)))
    }

    /// The held-out statistics, where some batch was held out.
    fn held(&self) -> Option<&Stats> {
        self.check.as_ref().filter(|c| c.tokens() > 0)
    }

    fn restricted(&self, kept: &[usize]) -> Problem {
        Problem {
            fit: self.fit.restricted(kept),
            check: self.check.as_ref().map(|c| c.restricted(kept)),
            batches: self.batches,
        }
    }
}

/// Sufficient statistics of one least-squares problem, accumulated in f64 over batches.
#[derive(Clone)]
pub(crate) struct Stats {
    /// `[X 1]^T [X 1]`, `(k + 1) x (k + 1)`.
    g: Mat<f64>,
    /// `[X 1]^T T`, `(k + 1) x out`.
    c: Mat<f64>,
    /// `||T||^2`.
    tt: f64,
}

impl Stats {
    /// Statistics holding only a Gram matrix (`g`, its lower triangle) of a problem with `out`
    /// outputs and no targets.
    pub(crate) fn gram(g: Mat<f64>, out: usize) -> Self {
        let k = g.nrows();
        Self {
            g,
            c: Mat::zeros(k, out),
            tt: 0.0,
        }
    }

    fn new(k: usize, out: usize) -> Self {
        Self {
            g: Mat::zeros(k + 1, k + 1),
            c: Mat::zeros(k + 1, out),
            tt: 0.0,
        }
    }

    fn tokens(&self) -> usize {
        let k = self.g.nrows() - 1;
        self.g[(k, k)].round() as usize
    }

    /// Adds one batch: `x` `[n, k]` kept inputs, `t` `[n, out]` targets. The products are taken
    /// in f64 on the host (an f32 Gram matrix limits the solution to about 1e-6 relative).
    fn add<B: Backend>(&mut self, x: Tensor<B, 2>, t: Tensor<B, 2>) -> Result<()> {
        let [n, k] = x.dims();
        let out = self.c.ncols();
        let x = host_mat(x, false)?;
        let t = host_mat(t, false)?;
        // [X 1]
        let a = Mat::from_fn(n, k + 1, |i, j| if j < k { x[(i, j)] } else { 1.0 });
        // Only the lower triangle of the symmetric Gram matrix: half the products (the
        // Cholesky solve reads no more; `symmetric` mirrors it where the whole one is needed).
        add_gram(&mut self.g, &a);
        faer::linalg::matmul::matmul(
            self.c.as_mut(),
            faer::Accum::Add,
            a.transpose(),
            t.as_ref(),
            1.0,
            faer::Par::rayon(0),
        );
        debug_assert_eq!(t.ncols(), out);
        self.tt += t.squared_norm_l2();
        Ok(())
    }

    /// The statistics of both problems' samples together.
    fn plus(&self, other: &Stats) -> Stats {
        Stats {
            g: &self.g + &other.g,
            c: &self.c + &other.c,
            tt: self.tt + other.tt,
        }
    }

    /// The whole Gram matrix (`g` holds its lower triangle).
    fn symmetric(&self) -> Mat<f64> {
        Mat::from_fn(self.g.nrows(), self.g.ncols(), |i, j| {
            if i >= j {
                self.g[(i, j)]
            } else {
                self.g[(j, i)]
            }
        })
    }

    /// `||[X 1] theta - T||^2` for `theta = [W; b^T]`.
    fn error(&self, theta: &Mat<f64>) -> f64 {
        let gt = &self.symmetric() * theta;
        let mut quad = 0.0;
        let mut cross = 0.0;
        for i in 0..theta.nrows() {
            for j in 0..theta.ncols() {
                quad += gt[(i, j)] * theta[(i, j)];
                cross += self.c[(i, j)] * theta[(i, j)];
            }
        }
        (quad - 2.0 * cross + self.tt).max(0.0)
    }

    /// The dense `theta0 = [W0; b0^T]` with its bias replaced by the least-squares bias.
    fn bias_refit(&self, theta0: &Mat<f64>) -> Mat<f64> {
        let k = self.g.nrows() - 1;
        let n = self.g[(k, k)].max(1.0);
        let mut th = theta0.clone();
        for j in 0..th.ncols() {
            let wx: f64 = (0..k).map(|i| self.g[(k, i)] * theta0[(i, j)]).sum();
            th[(k, j)] = (self.c[(k, j)] - wx) / n;
        }
        th
    }

    /// The statistics of the problem that keeps only inputs `kept` (sorted; the bias column is
    /// always kept).
    fn restricted(&self, kept: &[usize]) -> Stats {
        let k = self.g.nrows() - 1;
        let rows: Vec<usize> = kept.iter().copied().chain([k]).collect();
        let g = Mat::from_fn(rows.len(), rows.len(), |i, j| {
            let (a, b) = (rows[i].max(rows[j]), rows[i].min(rows[j]));
            self.g[(a, b)]
        });
        let c = Mat::from_fn(rows.len(), self.c.ncols(), |i, j| self.c[(rows[i], j)]);
        Stats { g, c, tt: self.tt }
    }

    /// Greedy OBS over groups of inputs (a KV group's o_proj columns, or one MLP channel):
    /// removes `remove` of `groups` one at a time, each the group whose removal raises the damped
    /// objective `||[X 1] theta - T||^2 + lambda ||W - W0||^2` least once the remaining weights
    /// are refit. With `H` the damped Gram matrix and `G` a group, that cost is
    /// `sum_j theta[G, j]^T (Hinv[G, G])^-1 theta[G, j]` (Hassibi and Stork's formula; ZipLM's
    /// for groups), and the refit is the update `theta -= Hinv[:, G] Hinv[G, G]^-1 theta[G, :]`
    /// with the matching downdate of `Hinv`. Returns the removed groups' indices in order and
    /// their costs.
    fn obs_order(
        &self,
        theta0: &Mat<f64>,
        damp: f64,
        groups: &[Vec<usize>],
        remove: usize,
        what: &str,
    ) -> Result<(Vec<usize>, Vec<f64>)> {
        let k = self.g.nrows() - 1;
        let remove = remove.min(groups.len());
        let (llt, rhs, _) = self.damped(theta0, damp, what)?;
        let mut theta = llt.solve(&rhs);
        let mut hinv = llt.solve(Mat::<f64>::identity(k + 1, k + 1));
        let out = theta.ncols();
        // `Hinv[G, G]^-1 m` for the rows `g` of a matrix `m` (one column per output), or None
        // where the block is not positive definite (a group already gone).
        let block_solve = |hinv: &Mat<f64>, g: &[usize], m: &Mat<f64>| {
            let b = Mat::from_fn(g.len(), g.len(), |a, c| hinv[(g[a], g[c])]);
            let rhs = Mat::from_fn(g.len(), m.ncols(), |a, j| m[(g[a], j)]);
            b.llt(Side::Lower).ok().map(|f| f.solve(&rhs))
        };
        let mut alive = vec![true; groups.len()];
        let (mut order, mut costs) = (Vec::with_capacity(remove), Vec::with_capacity(remove));
        for _ in 0..remove {
            let mut best: Option<(f64, usize)> = None;
            for (gi, g) in groups.iter().enumerate().filter(|&(gi, _)| alive[gi]) {
                let cost = if let [i] = g[..] {
                    // One input: the block is a scalar.
                    let d = hinv[(i, i)];
                    let w2: f64 = (0..out).map(|j| theta[(i, j)].powi(2)).sum();
                    if d > 0.0 { w2 / d } else { f64::INFINITY }
                } else {
                    match block_solve(&hinv, g, &theta) {
                        Some(z) => (0..out)
                            .map(|j| {
                                (0..g.len())
                                    .map(|a| theta[(g[a], j)] * z[(a, j)])
                                    .sum::<f64>()
                            })
                            .sum(),
                        None => f64::INFINITY,
                    }
                };
                if best.is_none_or(|(c, _)| cost < c) {
                    best = Some((cost, gi));
                }
            }
            let (cost, gi) = best.expect("fewer removals than groups");
            let g = &groups[gi];
            // U = Hinv[:, G]; theta -= U (Hinv[G, G]^-1 theta[G, :]); Hinv -= U (Hinv[G, G]^-1 U^T).
            let u = Mat::from_fn(k + 1, g.len(), |r, a| hinv[(r, g[a])]);
            let (Some(zt), Some(zh)) =
                (block_solve(&hinv, g, &theta), block_solve(&hinv, g, &hinv))
            else {
                return Err(Error::Invalid(format!(
                    "{what}: the OBS update lost positive definiteness; raise the damping"
                )));
            };
            // In place: no (k + 1)^2 temporary per removal.
            for (dst, z) in [(&mut theta, &zt), (&mut hinv, &zh)] {
                faer::linalg::matmul::matmul(
                    dst.as_mut(),
                    faer::Accum::Add,
                    u.as_ref(),
                    z.as_ref(),
                    -1.0,
                    faer::Par::rayon(0),
                );
            }
            alive[gi] = false;
            order.push(gi);
            costs.push(cost);
        }
        Ok((order, costs))
    }

    /// [`Stats::obs_order`]'s choice as what stays: the kept groups' indices and their inputs,
    /// both in order.
    fn obs_keep(
        &self,
        theta0: &Mat<f64>,
        damp: f64,
        groups: &[Vec<usize>],
        remove: usize,
        what: &str,
    ) -> Result<(Vec<usize>, Vec<usize>)> {
        let (gone, _) = self.obs_order(theta0, damp, groups, remove, what)?;
        let mut kept = vec![true; groups.len()];
        for g in gone {
            kept[g] = false;
        }
        let kept: Vec<usize> = (0..groups.len()).filter(|&g| kept[g]).collect();
        let inputs = kept
            .iter()
            .flat_map(|&g| groups[g].iter().copied())
            .collect();
        Ok((kept, inputs))
    }

    /// The damped normal equations `(G + lambda I) theta = C + lambda theta0` (the bias row
    /// undamped), factored; raises the damping tenfold, up to six times, where Cholesky fails.
    pub(crate) fn damped(
        &self,
        theta0: &Mat<f64>,
        damp: f64,
        what: &str,
    ) -> Result<(faer::linalg::solvers::Llt<f64>, Mat<f64>, f64)> {
        let k = self.g.nrows() - 1;
        let mean_diag = (0..k).map(|i| self.g[(i, i)]).sum::<f64>() / k.max(1) as f64;
        let mut damp = damp;
        for attempt in 0..7 {
            let lambda = damp * mean_diag.max(1e-12);
            let mut g = self.g.clone();
            let mut rhs = self.c.clone();
            for i in 0..k {
                g[(i, i)] += lambda;
                for j in 0..rhs.ncols() {
                    rhs[(i, j)] += lambda * theta0[(i, j)];
                }
            }
            if let Ok(llt) = g.llt(Side::Lower) {
                return Ok((llt, rhs, damp));
            }
            if attempt < 6 {
                tracing::warn!(
                    "{what}: the Gram matrix of its kept inputs is ill-conditioned at damping {damp}; raising it to {}",
                    damp * 10.0
                );
                damp *= 10.0;
            }
        }
        Err(Error::Invalid(format!(
            "{what}: the Gram matrix of its inputs cannot be factored even at damping {damp}; the calibration inputs are degenerate (use more calibration windows, or --reconstruct bias)"
        )))
    }

    /// Damped least squares towards `theta0`; the damping actually used. A solution that is not
    /// finite raises the damping tenfold, as a Gram matrix Cholesky cannot factor does.
    fn solve(&self, theta0: &Mat<f64>, damp: f64, what: &str) -> Result<(Mat<f64>, f64)> {
        let mut damp = damp;
        for attempt in 0..7 {
            let (llt, rhs, used) = self.damped(theta0, damp, what)?;
            let theta = llt.solve(&rhs);
            if (0..theta.nrows()).all(|i| (0..theta.ncols()).all(|j| theta[(i, j)].is_finite())) {
                return Ok((theta, used));
            }
            damp = used;
            if attempt < 6 {
                tracing::warn!(
                    "{what}: no finite least-squares solution at damping {damp}; raising it to {}",
                    damp * 10.0
                );
                damp *= 10.0;
            }
        }
        Err(Error::Invalid(format!(
            "{what}: no finite least-squares solution even at damping {damp}; the calibration inputs are degenerate (use more calibration windows, or --reconstruct bias)"
        )))
    }
}

/// Solves one projection from its statistics; the new linear and its report.
/// The damping is chosen first, while the held-out statistics are apart; they are then added
/// into the fitted ones in place, so at most two Gram matrices of the projection's inputs are
/// held beside the solve's two ([`LS_GRAMS`]).
fn refit<B: Backend>(
    lin: &Linear<B>,
    problem: Problem,
    s: &ReconSettings,
    (layer, name): (usize, &'static str),
    started: Instant,
) -> Result<(Linear<B>, ProjectionReport)> {
    let theta0 = theta_of(lin)?;
    let what = format!("layer {layer} {name}");
    let (damp, held_out) = problem.choose(&theta0, s.damp, &what)?;
    let stats = problem.into_all();
    let tokens = stats.tokens();
    let k = theta0.nrows() - 1;
    let (ls, used) = stats.solve(&theta0, damp.unwrap_or(s.damp), &what)?;
    let bias = stats.bias_refit(&theta0);
    let tt = stats.tt.max(f64::MIN_POSITIVE);
    let (e_cut, e_bias, e_ls) = (
        stats.error(&theta0) / tt,
        stats.error(&bias) / tt,
        stats.error(&ls) / tt,
    );
    // `damp` is None where the held-out batches preferred the bias refit.
    let chosen = if damp.is_some() && e_ls <= e_bias {
        Chosen::LeastSquares
    } else {
        Chosen::BiasRefit
    };
    let theta = match chosen {
        Chosen::LeastSquares => &ls,
        Chosen::BiasRefit => &bias,
    };
    let report = ProjectionReport {
        layer,
        name,
        inputs: k,
        tokens,
        rel_error_cut: e_cut,
        rel_error_bias: e_bias,
        rel_error_ls: e_ls,
        damp: used,
        chosen,
        held_out,
        seconds: started.elapsed().as_secs_f64(),
    };
    tracing::debug!(?report, "projection reconstructed");
    Ok((linear_of(theta, lin), report))
}

/// One calibration batch: its stepper and the two residual streams entering the current layer.
struct Stream<B: Backend> {
    stepper: LayerStepper<B>,
    dense: Tensor<B, 2>,
    pruned: Tensor<B, 2>,
}

/// The layer with only its attention block (to tap `o_proj`'s input without running the MLP).
fn attention_only<B: Backend>(layer: &DecoderLayer<B>) -> DecoderLayer<B> {
    DecoderLayer {
        input_layernorm: layer.input_layernorm.clone(),
        self_attn: layer.self_attn.clone(),
        post_attention_layernorm: None,
        mlp: None,
    }
}

/// The projections side by side as one (same input): weights concatenated along the output
/// axis, biases too (zero where a projection has none).
fn concat_linear<B: Backend>(parts: &[&Linear<B>]) -> Linear<B> {
    let weight = Tensor::cat(parts.iter().map(|p| p.weight.val()).collect(), 1);
    let bias = parts.iter().any(|p| p.bias.is_some()).then(|| {
        let b = parts
            .iter()
            .map(|p| match &p.bias {
                Some(b) => b.val(),
                None => Tensor::zeros([p.weight.dims()[1]], &p.weight.device()),
            })
            .collect();
        Param::from_tensor(Tensor::cat(b, 0))
    });
    Linear {
        weight: Param::from_tensor(weight),
        bias,
    }
}

/// [`concat_linear`] undone: the projections of output widths `widths`, in order.
fn split_linear<B: Backend>(joined: &Linear<B>, widths: &[usize]) -> Vec<Linear<B>> {
    let mut start = 0;
    widths
        .iter()
        .map(|&w| {
            let part = Linear {
                weight: Param::from_tensor(joined.weight.val().narrow(1, start, w)),
                bias: joined
                    .bias
                    .as_ref()
                    .map(|b| Param::from_tensor(b.val().narrow(0, start, w))),
            };
            start += w;
            part
        })
        .collect()
}

/// Refits the input projections `parts` (which read the same input) so that from the pruned
/// inputs `x_pruned` they reproduce what they compute from the dense inputs `x_dense` (one pair
/// per batch), by the damped least squares of [`refit`].
fn refit_inputs<B: Backend>(
    parts: &[&Linear<B>],
    pairs: impl Iterator<Item = Result<(Tensor<B, 2>, Tensor<B, 2>)>>,
    settings: &ReconSettings,
    (layer, name): (usize, &'static str),
) -> Result<(Vec<Linear<B>>, ProjectionReport)> {
    let started = Instant::now();
    let joined = concat_linear(parts);
    let [k, out] = joined.weight.dims();
    let mut problem = Problem::new(k, out, settings.held_out);
    for pair in pairs {
        let (x_pruned, x_dense) = pair?;
        problem.add(x_pruned, lopper_kernels::linear(&joined, x_dense))?;
    }
    let (fit, report) = refit(&joined, problem, settings, (layer, name), started)?;
    let widths: Vec<usize> = parts.iter().map(|p| p.weight.dims()[1]).collect();
    Ok((split_linear(&fit, &widths), report))
}

/// Which projections [`reconstruct`] refits, per source layer: `(o_proj, down_proj)`. A kept
/// block is refit when it is cut itself or any block before it was; layers before the first
/// change stay dense.
pub fn refits(plan: &MaskPlan) -> Vec<(bool, bool)> {
    let mut changed = false;
    plan.layers
        .iter()
        .zip(&plan.source.layers)
        .map(|(keep, src)| {
            let attn_cut = keep.kv_groups.len() != src.n_kv_heads;
            let o = !keep.kv_groups.is_empty() && (changed || attn_cut);
            changed |= attn_cut;
            let mlp_cut = keep.channels.len() != src.ffn_hidden;
            let d = !keep.channels.is_empty() && (changed || mlp_cut);
            changed |= mlp_cut;
            (o, d)
        })
        .collect()
}

/// How many reports [`reconstruct`] gives for `plan` under `settings`: the refit o_proj and
/// down_proj of [`refits`], and the input projections of [`input_refits`].
pub fn projections(plan: &MaskPlan, settings: &ReconSettings) -> usize {
    refits(plan)
        .into_iter()
        .chain(input_refits(plan, settings.inputs))
        .map(|(a, b)| usize::from(a) + usize::from(b))
        .sum()
}

/// The model `plan` cuts from `model`, with every kept `o_proj` / `down_proj` refit by damped
/// least squares on `windows` (see the module documentation), the plan it was cut by (`plan`
/// itself, or under [`ReconSettings::obs`] the same counts with the units OBS chose), and one
/// report per refit projection (`on_projection` sees each as it is done). One layer's
/// statistics live at a time; the two residual streams of all windows are held
/// (`2 x windows x seq x hidden` floats; twice that in a layer whose input projections are
/// refit ([`input_refits`]), which also holds that layer's two dense normed inputs).
pub fn reconstruct<B: Backend>(
    model: &Llama<B>,
    plan: &MaskPlan,
    windows: &[Vec<u32>],
    settings: &ReconSettings,
    mut on_projection: impl FnMut(&ProjectionReport),
) -> Result<(Llama<B>, MaskPlan, Vec<ProjectionReport>)> {
    if windows.is_empty() || settings.batch_size == 0 {
        return Err(Error::Invalid(
            "reconstruction needs at least one calibration window and a batch size of at least 1"
                .into(),
        ));
    }
    if !(settings.damp.is_finite() && settings.damp > 0.0) {
        return Err(Error::Invalid(format!(
            "reconstruction damping {} is impossible: give a positive fraction such as 0.01",
            settings.damp
        )));
    }
    plan.validate_against(model.shape())
        .map_err(|e| Error::Invalid(e.to_string()))?;
    let hidden = model.shape().hidden_size;
    let mut streams: Vec<Stream<B>> = Vec::new();
    for batch in windows.chunks(settings.batch_size) {
        let t = model.tokens(batch)?;
        let [b, seq] = t.dims();
        let x = model.embed(t);
        streams.push(Stream {
            stepper: model.stepper(b, seq),
            dense: x.clone(),
            pruned: x,
        });
    }
    let mut reports = Vec::new();
    let mut layers = Vec::new();
    let mut chosen_plan = plan.clone();
    let to_refit = refits(plan);
    let inputs = input_refits(plan, settings.inputs);
    for (l, (&(refit_o, refit_down), &(refit_qkv, refit_gate_up))) in
        to_refit.iter().zip(&inputs).enumerate()
    {
        let (src, keep) = (&plan.source.layers[l], &plan.layers[l]);
        // The dense layer: the model's own, or read for its turn when offloaded.
        let dense_layer = model.layer(l)?;
        let dense_layer = &*dense_layer;
        // Both streams on the layer's device (a model placed over several devices).
        for s in &mut streams {
            s.dense = dense_layer.on_device(s.dense.clone());
            s.pruned = dense_layer.on_device(s.pruned.clone());
        }
        let whole = keep.kv_groups.len() == src.n_kv_heads && keep.channels.len() == src.ffn_hidden;
        if whole && !refit_o && !refit_down {
            for s in &mut streams {
                s.dense = s.stepper.forward(dense_layer, s.dense.clone(), |_, _| {});
                s.pruned = s.dense.clone();
            }
            layers.push(dense_layer.clone());
            continue;
        }
        // The dense stream: the residual after attention, and after the layer (and, to refit
        // the input projections, their dense inputs).
        let mut mid_dense = Vec::with_capacity(streams.len());
        let (mut attn_in, mut mlp_in) = (Vec::new(), Vec::new());
        for s in &mut streams {
            let mut mid = None;
            let out = s
                .stepper
                .forward(dense_layer, s.dense.clone(), |tap, x| match tap {
                    Tap::OProjInput => {
                        if let Some(a) = &dense_layer.self_attn {
                            mid = Some(lopper_kernels::linear(&a.o_proj, x.clone()));
                        }
                    }
                    Tap::AttnInput if refit_qkv => attn_in.push(x.clone()),
                    Tap::MlpInput if refit_gate_up => mlp_in.push(x.clone()),
                    _ => {}
                });
            let attn = mid.ok_or_else(|| {
                Error::Invalid(format!("layer {l}: the dense layer has no attention block"))
            })?;
            mid_dense.push(s.dense.clone() + attn);
            s.dense = out;
        }
        // OBS chooses this layer's KV groups and channels itself: each block stays whole until
        // then, and is cut to OBS's choice before its projection is refit.
        let obs_attn = settings.obs
            && refit_o
            && !keep.kv_groups.is_empty()
            && keep.kv_groups.len() < src.n_kv_heads;
        let obs_mlp = settings.obs
            && refit_down
            && !keep.channels.is_empty()
            && keep.channels.len() < src.ffn_hidden;
        let first_cut = LayerPlan {
            kv_groups: if obs_attn {
                (0..src.n_kv_heads).collect()
            } else {
                keep.kv_groups.clone()
            },
            channels: if obs_mlp {
                (0..src.ffn_hidden).collect()
            } else {
                keep.channels.clone()
            },
        };
        let mut layer = lopper_surgery::slice_layer(dense_layer, src, &first_cut).into_owned();
        // The input projections read the pruned stream: refit them to give the dense layer's
        // projections of the dense stream (where the two streams differ).
        let tap_pruned = |layer: &DecoderLayer<B>, want: Tap| {
            let (layer, streams) = (layer.clone(), &streams);
            streams.iter().map(move |s| {
                let mut got = None;
                s.stepper.forward(&layer, s.pruned.clone(), |tap, x| {
                    if tap == want {
                        got = Some(x.clone());
                    }
                });
                got.ok_or_else(|| Error::Invalid(format!("layer {l}: no input reached {want:?}")))
            })
        };
        if refit_qkv && let Some(a) = &layer.self_attn {
            let probe = attention_only(&layer);
            let pairs = tap_pruned(&probe, Tap::AttnInput)
                .zip(&attn_in)
                .map(|(p, d)| Ok((p?, d.clone())));
            let parts = [&a.q_proj, &a.k_proj, &a.v_proj];
            let (fit, r) = refit_inputs(&parts, pairs, settings, (l, "q/k/v_proj"))?;
            on_projection(&r);
            reports.push(r);
            let [q, k, v]: [Linear<B>; 3] = fit.try_into().expect("three projections");
            if let Some(a) = &mut layer.self_attn {
                (a.q_proj, a.k_proj, a.v_proj) = (q, k, v);
            }
        }
        // Attention: o_proj refit (if the block survives and anything changed before it).
        if let Some(a) = &layer.self_attn
            && refit_o
        {
            let started = Instant::now();
            let probe = attention_only(&layer);
            let mut stats = Problem::new(a.o_proj.weight.dims()[0], hidden, settings.held_out);
            for (s, mid) in streams.iter().zip(&mid_dense) {
                let mut x_k = None;
                s.stepper.forward(&probe, s.pruned.clone(), |tap, x| {
                    if tap == Tap::OProjInput {
                        x_k = Some(x.clone());
                    }
                });
                let x_k = x_k
                    .ok_or_else(|| Error::Invalid(format!("layer {l}: no input reached o_proj")))?;
                stats.add(x_k, mid.clone() - s.pruned.clone())?;
            }
            let (o, r) = if obs_attn {
                // A KV group's o_proj inputs: its query heads' columns, contiguous.
                let width = src.n_rep() * src.head_dim;
                let groups: Vec<Vec<usize>> = (0..src.n_kv_heads)
                    .map(|g| (g * width..(g + 1) * width).collect())
                    .collect();
                let remove = src.n_kv_heads - keep.kv_groups.len();
                let what = format!("layer {l} o_proj (obs)");
                let theta0 = theta_of(&a.o_proj)?;
                let (kv_groups, inputs) =
                    stats
                        .all()
                        .obs_keep(&theta0, settings.damp, &groups, remove, &what)?;
                let now = LayerShape {
                    ffn_hidden: first_cut.channels.len(),
                    ..*src
                };
                let cut = LayerPlan {
                    kv_groups: kv_groups.clone(),
                    channels: (0..now.ffn_hidden).collect(),
                };
                layer = lopper_surgery::slice_layer(&layer, &now, &cut).into_owned();
                chosen_plan.layers[l].kv_groups = kv_groups;
                let a = layer
                    .self_attn
                    .as_ref()
                    .expect("the attention block is kept");
                refit(
                    &a.o_proj,
                    stats.restricted(&inputs),
                    settings,
                    (l, "o_proj"),
                    started,
                )?
            } else {
                refit(&a.o_proj, stats, settings, (l, "o_proj"), started)?
            };
            on_projection(&r);
            reports.push(r);
            if let Some(a) = &mut layer.self_attn {
                a.o_proj = o;
            }
        }
        if refit_gate_up && let Some(m) = &layer.mlp {
            let pairs = tap_pruned(&layer, Tap::MlpInput)
                .zip(&mlp_in)
                .map(|(p, d)| Ok((p?, d.clone())));
            let parts = [&m.gate_proj, &m.up_proj];
            let (fit, r) = refit_inputs(&parts, pairs, settings, (l, "gate/up_proj"))?;
            on_projection(&r);
            reports.push(r);
            let [g, u]: [Linear<B>; 2] = fit.try_into().expect("two projections");
            if let Some(m) = &mut layer.mlp {
                (m.gate_proj, m.up_proj) = (g, u);
            }
        }
        // MLP: down_proj refit against the dense residual after the layer.
        if let Some(m) = &layer.mlp
            && refit_down
        {
            let started = Instant::now();
            let mut stats = Problem::new(m.down_proj.weight.dims()[0], hidden, settings.held_out);
            for s in &streams {
                let (mut mid, mut x_k) = (None, None);
                s.stepper
                    .forward(&layer, s.pruned.clone(), |tap, x| match tap {
                        Tap::OProjInput => {
                            if let Some(a) = &layer.self_attn {
                                mid = Some(lopper_kernels::linear(&a.o_proj, x.clone()));
                            }
                        }
                        Tap::DownProjInput => x_k = Some(x.clone()),
                        _ => {}
                    });
                let mid = match mid {
                    Some(attn) => s.pruned.clone() + attn,
                    None => s.pruned.clone(),
                };
                let x_k = x_k.ok_or_else(|| {
                    Error::Invalid(format!("layer {l}: no input reached down_proj"))
                })?;
                stats.add(x_k, s.dense.clone() - mid)?;
            }
            let (d, r) = if obs_mlp {
                let theta0 = theta_of(&m.down_proj)?;
                let singles: Vec<Vec<usize>> = (0..src.ffn_hidden).map(|c| vec![c]).collect();
                let remove = src.ffn_hidden - keep.channels.len();
                let what = format!("layer {l} down_proj (obs)");
                let (channels, _) =
                    stats
                        .all()
                        .obs_keep(&theta0, settings.damp, &singles, remove, &what)?;
                // Cut the MLP to the chosen channels (the attention block is already cut).
                let kv = chosen_plan.layers[l].kv_groups.len();
                let now = LayerShape {
                    n_heads: kv * src.n_rep(),
                    n_kv_heads: kv,
                    ..*src
                };
                let cut = LayerPlan {
                    kv_groups: (0..kv).collect(),
                    channels: channels.clone(),
                };
                layer = lopper_surgery::slice_layer(&layer, &now, &cut).into_owned();
                chosen_plan.layers[l].channels = channels.clone();
                let m = layer.mlp.as_ref().expect("the MLP is kept");
                refit(
                    &m.down_proj,
                    stats.restricted(&channels),
                    settings,
                    (l, "down_proj"),
                    started,
                )?
            } else {
                refit(&m.down_proj, stats, settings, (l, "down_proj"), started)?
            };
            on_projection(&r);
            reports.push(r);
            if let Some(m) = &mut layer.mlp {
                m.down_proj = d;
            }
        }
        for s in &mut streams {
            s.pruned = s.stepper.forward(&layer, s.pruned.clone(), |_, _| {});
        }
        if !(keep.kv_groups.is_empty() && keep.channels.is_empty()) {
            layers.push(layer);
        }
    }
    let kept = plan.kept_layers();
    // Layers kept whole before the first change were pushed as they are; all-removed layers
    // were skipped: what is left lines up with the plan's kept layers.
    if layers.len() != kept.len() {
        return Err(Error::Invalid(format!(
            "reconstruction built {} layers for a plan that keeps {}",
            layers.len(),
            kept.len()
        )));
    }
    let out = Llama::from_parts(
        model.embed_tokens.clone(),
        layers,
        model.norm.clone(),
        model.lm_head.clone(),
        plan.pruned_shape(),
    )?;
    Ok((out, chosen_plan, reports))
}

#[cfg(test)]
mod obs_tests {
    use super::*;

    /// Seeded uniform values in [-0.5, 0.5) (xorshift).
    fn uniform(mut seed: u64) -> impl FnMut() -> f64 {
        move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        }
    }

    /// A least-squares problem with correlated inputs: `k` inputs and the bias column, `out`
    /// outputs, `n` samples, and a dense `theta0` that is not the solution.
    fn problem(n: usize, k: usize, out: usize) -> (Stats, Mat<f64>) {
        let mut rand = uniform(0x2545_f491_4f6c_dd1du64);
        let z = Mat::from_fn(n, k, |_, _| rand());
        let a = Mat::from_fn(n, k + 1, |i, j| match j {
            j if j == k => 1.0,
            0 => z[(i, 0)],
            j => z[(i, j)] + 0.7 * z[(i, j - 1)],
        });
        let w = Mat::from_fn(k + 1, out, |_, _| rand());
        let t = &a * &w + Mat::from_fn(n, out, |_, _| 0.3 * rand());
        let stats = Stats {
            g: a.transpose() * &a,
            c: a.transpose() * &t,
            tt: t.squared_norm_l2(),
        };
        let theta0 = Mat::from_fn(k + 1, out, |i, j| w[(i, j)] + 0.2 * rand());
        (stats, theta0)
    }

    /// The damped objective's minimum with only `kept` inputs (and the bias), brute force:
    /// removed inputs' weights are 0, the rest solve the normal equations.
    fn objective(stats: &Stats, theta0: &Mat<f64>, lambda: f64, kept: &[usize]) -> f64 {
        let k = stats.g.nrows() - 1;
        let rows: Vec<usize> = kept.iter().copied().chain([k]).collect();
        let m = rows.len();
        let a = Mat::from_fn(m, m, |i, j| {
            let d = if i == j && rows[i] < k { lambda } else { 0.0 };
            stats.g[(rows[i], rows[j])] + d
        });
        let rhs = Mat::from_fn(m, theta0.ncols(), |i, j| {
            let d = if rows[i] < k {
                lambda * theta0[(rows[i], j)]
            } else {
                0.0
            };
            stats.c[(rows[i], j)] + d
        });
        let sol = a.llt(Side::Lower).unwrap().solve(&rhs);
        let mut theta = Mat::zeros(k + 1, theta0.ncols());
        for (i, &r) in rows.iter().enumerate() {
            for j in 0..theta.ncols() {
                theta[(r, j)] = sol[(i, j)];
            }
        }
        let ridge: f64 = (0..k)
            .map(|i| {
                (0..theta.ncols())
                    .map(|j| (theta[(i, j)] - theta0[(i, j)]).powi(2))
                    .sum::<f64>()
            })
            .sum();
        stats.error(&theta) + lambda * ridge
    }

    #[test]
    fn the_obs_removal_order_matches_a_brute_force_search() {
        let (k, remove, damp) = (7, 4, 0.05);
        let (stats, theta0) = problem(300, k, 3);
        let lambda = damp * (0..k).map(|i| stats.g[(i, i)]).sum::<f64>() / k as f64;
        let singles: Vec<Vec<usize>> = (0..k).map(|i| vec![i]).collect();
        let (order, costs) = stats
            .obs_order(&theta0, damp, &singles, remove, "test")
            .unwrap();
        assert_eq!(order.len(), remove);
        let mut alive: Vec<usize> = (0..k).collect();
        for (step, (&picked, &cost)) in order.iter().zip(&costs).enumerate() {
            let before = objective(&stats, &theta0, lambda, &alive);
            // Every candidate refit from scratch: OBS picks the cheapest, at its exact cost.
            let trials: Vec<(usize, f64)> = alive
                .iter()
                .map(|&i| {
                    let rest: Vec<usize> = alive.iter().copied().filter(|&j| j != i).collect();
                    (i, objective(&stats, &theta0, lambda, &rest) - before)
                })
                .collect();
            let best = trials.iter().min_by(|a, b| a.1.total_cmp(&b.1)).unwrap();
            assert_eq!(picked, best.0, "step {step}: {trials:?}");
            assert!(
                (cost - best.1).abs() <= 1e-8 * before.max(1.0),
                "step {step}: OBS cost {cost}, refit {}",
                best.1
            );
            alive.retain(|&j| j != picked);
        }
        // The problem is not trivial: some removal costs differ by more than rounding.
        assert!(costs.iter().any(|&c| c > 1e-3));
    }

    #[test]
    fn group_obs_matches_a_brute_force_search_over_groups() {
        let (k, damp) = (8, 0.02);
        let (stats, theta0) = problem(200, k, 2);
        let lambda = damp * (0..k).map(|i| stats.g[(i, i)]).sum::<f64>() / k as f64;
        let groups = vec![vec![0, 1], vec![2, 3, 4], vec![5], vec![6, 7]];
        let (order, costs) = stats.obs_order(&theta0, damp, &groups, 3, "test").unwrap();
        let mut alive: Vec<usize> = (0..groups.len()).collect();
        let inputs = |alive: &[usize]| -> Vec<usize> {
            let mut v: Vec<usize> = alive.iter().flat_map(|&g| groups[g].clone()).collect();
            v.sort_unstable();
            v
        };
        for (&picked, &cost) in order.iter().zip(&costs) {
            let before = objective(&stats, &theta0, lambda, &inputs(&alive));
            let trials: Vec<(usize, f64)> = alive
                .iter()
                .map(|&g| {
                    let rest: Vec<usize> = alive.iter().copied().filter(|&h| h != g).collect();
                    (
                        g,
                        objective(&stats, &theta0, lambda, &inputs(&rest)) - before,
                    )
                })
                .collect();
            let best = trials.iter().min_by(|a, b| a.1.total_cmp(&b.1)).unwrap();
            assert_eq!(picked, best.0, "{trials:?}");
            assert!(
                (cost - best.1).abs() <= 1e-8 * before.max(1.0),
                "{cost} vs {trials:?}"
            );
            alive.retain(|&g| g != picked);
        }
    }

    /// Statistics of rows `rows` of `[X 1]` and `T`.
    fn stats_of(a: &Mat<f64>, t: &Mat<f64>, rows: &[usize]) -> Stats {
        let a = Mat::from_fn(rows.len(), a.ncols(), |i, j| a[(rows[i], j)]);
        let t = Mat::from_fn(rows.len(), t.ncols(), |i, j| t[(rows[i], j)]);
        Stats {
            g: a.transpose() * &a,
            c: a.transpose() * &t,
            tt: t.squared_norm_l2(),
        }
    }

    /// A problem of `n` samples, `k` inputs and `out` outputs whose target is `signal` times a
    /// linear map of the inputs plus a constant and noise, one sample in [`HELD_OUT_EVERY`]
    /// held out; and the dense `theta0` (zero weights).
    fn split_problem(n: usize, k: usize, out: usize, signal: f64) -> (Problem, Mat<f64>) {
        let mut rand = uniform(0x9e37_79b9_7f4a_7c15u64);
        let a = Mat::from_fn(n, k + 1, |_, j| if j == k { 1.0 } else { rand() });
        let w = Mat::from_fn(
            k + 1,
            out,
            |i, _| if i == k { 2.0 } else { signal * rand() },
        );
        let t = &a * &w + Mat::from_fn(n, out, |_, _| rand());
        let (held, fit): (Vec<usize>, Vec<usize>) =
            (0..n).partition(|i| i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1);
        let problem = Problem {
            fit: stats_of(&a, &t, &fit),
            check: Some(stats_of(&a, &t, &held)),
            batches: n,
        };
        (problem, Mat::zeros(k + 1, out))
    }

    #[test]
    fn held_out_damping_takes_the_candidate_that_generalises() {
        // Inputs that predict nothing, few samples per input: least squares fits the noise of
        // the fit samples, and the held-out ones say so.
        let (noise, theta0) = split_problem(240, 60, 4, 0.0);
        let (damp, report) = noise.choose(&theta0, 0.01, "test").unwrap();
        let r = report.unwrap();
        assert_eq!(r.tokens, 30);
        assert_eq!(r.rel_error_ls.len(), DAMP_GRID.len());
        let (d0, e0) = r.rel_error_ls[0];
        assert_eq!(d0, 0.01);
        assert!(e0 > r.rel_error_bias, "{r:?}");
        let chosen = match damp {
            None => r.rel_error_bias,
            Some(d) => r.rel_error_ls.iter().find(|x| x.0 == d).unwrap().1,
        };
        let least = r
            .rel_error_ls
            .iter()
            .map(|x| x.1)
            .fold(r.rel_error_bias, f64::min);
        assert_eq!(chosen, least, "{r:?}");
        // A strong linear signal and many samples: the least damping wins and beats the bias.
        let (signal, theta0) = split_problem(4000, 20, 3, 3.0);
        let (damp, report) = signal.choose(&theta0, 0.01, "test").unwrap();
        let r = report.unwrap();
        assert_eq!(damp, Some(0.01), "{r:?}");
        assert!(r.rel_error_ls[0].1 < 0.5 * r.rel_error_bias, "{r:?}");
        // Nothing held out: the setting, no report.
        let (p, t0) = split_problem(100, 5, 2, 1.0);
        let plain = Problem { check: None, ..p };
        assert_eq!(plain.choose(&t0, 0.05, "test").unwrap(), (Some(0.05), None));
        // `all` is every sample: the fit and the held-out statistics together.
        let all = signal.all();
        assert_eq!(all.tokens(), 4000);
    }

    #[test]
    fn restricted_statistics_are_the_sub_problem() {
        let (stats, _) = problem(50, 5, 2);
        let sub = stats.restricted(&[1, 3]);
        assert_eq!((sub.g.nrows(), sub.c.nrows()), (3, 3));
        assert_eq!(sub.g[(0, 0)], stats.g[(1, 1)]);
        assert_eq!(sub.g[(1, 0)], stats.g[(3, 1)]);
        assert_eq!(sub.g[(2, 1)], stats.g[(5, 3)]);
        assert_eq!(sub.c[(2, 1)], stats.c[(5, 1)]);
        assert_eq!(sub.tokens(), 50);
    }
}
