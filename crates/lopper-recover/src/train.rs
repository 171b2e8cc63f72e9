//! The training loop: AdamW steps on accumulated micro-batch gradients, with a global
//! gradient-norm clip, and checkpoints that resume bit for bit.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::backend::Autodiff;
use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, AdamWConfig, GradientsAccumulator, GradientsParams, Optimizer};
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor};
use lopper_model::{Llama, next_token_nll};
use serde::{Deserialize, Serialize};

use crate::{Adapt, Distill, Error, LoraAdapters, LossKind, RecoverConfig, Result};

type Ad<B> = Autodiff<B>;
type AdamOf<M, B> = OptimizerAdaptor<AdamW, M, Ad<B>>;

/// One optimiser step, as written to `curve.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// 0-based step.
    pub step: usize,
    /// The objective, averaged over the step's predicted tokens.
    pub loss: f64,
    /// Its cross-entropy part (nats/token), when the loss has one.
    pub ce: Option<f64>,
    /// Its distillation part (`T^2 * KL`, nats/token), when the loss has one.
    pub kd: Option<f64>,
    /// Learning rate of the step.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Predicted tokens in the step.
    pub tokens: usize,
    /// Wall seconds of the step.
    pub seconds: f64,
}

enum Trainee<B: Backend> {
    Lora {
        base: Llama<Ad<B>>,
        adapters: LoraAdapters<Ad<B>>,
        optim: AdamOf<LoraAdapters<Ad<B>>, B>,
    },
    Full {
        model: Llama<Ad<B>>,
        optim: AdamOf<Llama<Ad<B>>, B>,
    },
}

/// A recovery run in progress: the student, what trains, the optimiser state and the step.
pub struct Recovery<B: Backend> {
    config: RecoverConfig,
    step: usize,
    /// `None` only after a step failed halfway (the run then continues from a checkpoint).
    trainee: Option<Trainee<B>>,
}

impl<B: Backend> std::fmt::Debug for Recovery<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recovery")
            .field("config", &self.config)
            .field("step", &self.step)
            .finish_non_exhaustive()
    }
}

/// The checkpoint's index, written last: the files it names are complete.
#[derive(Debug, Serialize, Deserialize)]
struct CheckpointIndex {
    step: usize,
    config: RecoverConfig,
    trained: String,
    optimizer: String,
}

const INDEX: &str = "recover-checkpoint.json";

fn recorder() -> BinBytesRecorder<FullPrecisionSettings> {
    BinBytesRecorder::<FullPrecisionSettings>::default()
}

fn scalar<B: Backend>(t: Tensor<B, 1>) -> f64 {
    t.into_scalar().elem::<f64>()
}

impl<B: Backend> Recovery<B> {
    /// A fresh run that trains `student` (a copy is made on `Autodiff<B>`, placed as the
    /// student is: each layer on its device).
    pub fn new(student: &Llama<B>, config: RecoverConfig) -> Result<Self> {
        config.validate()?;
        let ad: Llama<Ad<B>> = student.placed_copy()?;
        let optim = AdamWConfig::new()
            .with_beta_1(0.9)
            .with_beta_2(0.999)
            .with_epsilon(1e-8)
            .with_weight_decay(config.weight_decay as f32);
        let trainee = match config.adapt {
            Adapt::Lora { rank, alpha } => {
                let adapters = LoraAdapters::new(&ad, rank, alpha, config.seed)?;
                Trainee::Lora {
                    base: ad.no_grad(),
                    adapters,
                    optim: optim.init(),
                }
            }
            Adapt::Full => Trainee::Full {
                model: ad,
                optim: optim.init(),
            },
        };
        Ok(Self {
            config,
            step: 0,
            trainee: Some(trainee),
        })
    }

    /// The settings.
    pub fn config(&self) -> &RecoverConfig {
        &self.config
    }

    /// Steps done.
    pub fn step(&self) -> usize {
        self.step
    }

    fn trainee(&self) -> Result<&Trainee<B>> {
        self.trainee.as_ref().ok_or_else(|| {
            Error::Invalid(
                "an earlier step failed halfway; continue from the last checkpoint".into(),
            )
        })
    }

    /// Trainable parameters.
    pub fn trainable_params(&self) -> Result<usize> {
        Ok(match self.trainee()? {
            Trainee::Lora { adapters, .. } => adapters.num_params(),
            Trainee::Full { model, .. } => model.num_params(),
        })
    }

    /// The student as it is now, on the inner backend: adapters merged into the weights.
    pub fn model(&self) -> Result<Llama<B>> {
        Ok(match self.trainee()? {
            Trainee::Lora { base, adapters, .. } => adapters.valid().apply(&base.valid()),
            Trainee::Full { model, .. } => model.valid(),
        })
    }

    /// The adapters (LoRA runs only), on the inner backend.
    pub fn adapters(&self) -> Result<Option<LoraAdapters<B>>> {
        Ok(match self.trainee()? {
            Trainee::Lora { adapters, .. } => Some(adapters.valid()),
            Trainee::Full { .. } => None,
        })
    }

    /// One optimiser step on `batch` (equal-length windows; `teacher` is read when the loss
    /// has `kd`): the gradient of the mean objective over the batch's predicted tokens,
    /// accumulated over micro-batches of `config.micro_batch` windows, clipped to
    /// `config.clip_norm`, then an AdamW step at `config.lr_at(step)`.
    pub fn train_step(
        &mut self,
        batch: &[Vec<u32>],
        teacher: Option<&Llama<B>>,
    ) -> Result<StepRecord> {
        let cfg = self.config;
        if batch.is_empty() || batch.iter().any(|w| w.len() < 2) {
            return Err(Error::Invalid(
                "a training batch needs at least one window of at least 2 tokens".into(),
            ));
        }
        if cfg.loss.needs_teacher() && teacher.is_none() {
            return Err(Error::Invalid(format!(
                "--loss {} distils from a teacher; give --teacher, or use --loss ce",
                cfg.loss
            )));
        }
        self.trainee()?;
        let started = Instant::now();
        let lr = cfg.lr_at(self.step);
        let (trainee, sums, norm) = match self.trainee.take().expect("checked above") {
            Trainee::Lora {
                base,
                adapters,
                mut optim,
            } => {
                let (grads, sums) =
                    accumulate(&adapters, batch, &cfg, teacher, |a| a.apply(&base))?;
                let (grads, norm) = clip(&adapters, grads, cfg.clip_norm);
                let adapters = optim.step(lr, adapters, grads);
                (
                    Trainee::Lora {
                        base,
                        adapters,
                        optim,
                    },
                    sums,
                    norm,
                )
            }
            Trainee::Full { model, mut optim } => {
                let (grads, sums) = accumulate(&model, batch, &cfg, teacher, Clone::clone)?;
                let (grads, norm) = clip(&model, grads, cfg.clip_norm);
                let model = optim.step(lr, model, grads);
                (Trainee::Full { model, optim }, sums, norm)
            }
        };
        self.trainee = Some(trainee);
        let record = StepRecord {
            step: self.step,
            loss: sums.loss,
            ce: sums.ce,
            kd: sums.kd,
            lr,
            grad_norm: norm,
            tokens: sums.tokens,
            seconds: started.elapsed().as_secs_f64(),
        };
        if !record.loss.is_finite() {
            return Err(Error::Invalid(format!(
                "the loss became {} at step {}; lower --lr or set --clip-norm",
                record.loss, self.step
            )));
        }
        self.step += 1;
        Ok(record)
    }

    /// Writes the trained tensors and the optimiser state of the current step into `dir`, then
    /// (atomically, last) the index naming them; older checkpoint files are removed.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let tag = format!("{:07}", self.step);
        let (trained, optimizer) = match self.trainee()? {
            Trainee::Lora {
                adapters, optim, ..
            } => (
                record_bytes(adapters.clone().into_record(), dir)?,
                record_bytes(optim.to_record(), dir)?,
            ),
            Trainee::Full { model, optim } => (
                record_bytes(model.clone().into_record(), dir)?,
                record_bytes(optim.to_record(), dir)?,
            ),
        };
        let index = CheckpointIndex {
            step: self.step,
            config: self.config,
            trained: format!("recover-{tag}.trained.bin"),
            optimizer: format!("recover-{tag}.optimizer.bin"),
        };
        write(&dir.join(&index.trained), &trained)?;
        write(&dir.join(&index.optimizer), &optimizer)?;
        let json = serde_json::to_vec_pretty(&index).expect("serialisable");
        write(&dir.join(INDEX), &json)?;
        // Only the files of the index just written are needed from now on.
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("recover-")
                    && name.ends_with(".bin")
                    && name != index.trained
                    && name != index.optimizer
                {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(())
    }

    /// Whether `dir` holds a checkpoint.
    pub fn has_checkpoint(dir: &Path) -> bool {
        dir.join(INDEX).is_file()
    }

    /// Continues the run checkpointed in `dir` on `student` (the model the run started from).
    /// The settings must be the checkpoint's.
    pub fn resume(student: &Llama<B>, config: RecoverConfig, dir: &Path) -> Result<Self> {
        let path = dir.join(INDEX);
        let bad = |why: String| Error::Checkpoint {
            path: path.clone(),
            why,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
        let index: CheckpointIndex =
            serde_json::from_str(&text).map_err(|e| bad(format!("not a checkpoint index: {e}")))?;
        if index.config != config {
            return Err(bad(format!(
                "its settings differ from these ({}); resume with the same flags",
                serde_json::to_string(&index.config).expect("serialisable")
            )));
        }
        if index.step > config.steps {
            return Err(bad(format!(
                "it is at step {} of a {}-step run",
                index.step, config.steps
            )));
        }
        let mut run = Self::new(student, config)?;
        let device = student.device();
        let read = |name: &str| -> Result<Vec<u8>> {
            let p = dir.join(name);
            std::fs::read(&p).map_err(|e| Error::Checkpoint {
                path: p,
                why: e.to_string(),
            })
        };
        let (trained, optimizer) = (read(&index.trained)?, read(&index.optimizer)?);
        let trainee = match run.trainee.take().expect("fresh") {
            Trainee::Lora {
                base,
                adapters,
                optim,
            } => Trainee::Lora {
                base,
                adapters: adapters.load_record(load(trained, &device, dir, &index.trained)?),
                optim: optim.load_record(load(optimizer, &device, dir, &index.optimizer)?),
            },
            Trainee::Full { model, optim } => Trainee::Full {
                model: model.load_record(load(trained, &device, dir, &index.trained)?),
                optim: optim.load_record(load(optimizer, &device, dir, &index.optimizer)?),
            },
        };
        run.trainee = Some(trainee);
        run.step = index.step;
        Ok(run)
    }
}

/// A record read back from the bytes of checkpoint file `name` in `dir`.
fn load<B: Backend, R: burn::record::Record<Ad<B>>>(
    bytes: Vec<u8>,
    device: &B::Device,
    dir: &Path,
    name: &str,
) -> Result<R> {
    Recorder::<Ad<B>>::load(&recorder(), bytes, device).map_err(|e| Error::Checkpoint {
        path: dir.join(name),
        why: format!("unreadable ({e}); delete the run folder and start over"),
    })
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    lopper_core::write_atomic(path, bytes).map_err(|e| Error::Checkpoint {
        path: path.to_owned(),
        why: e.to_string(),
    })
}

fn record_bytes<B: Backend, R: burn::record::Record<B>>(record: R, dir: &Path) -> Result<Vec<u8>> {
    Recorder::<B>::record(&recorder(), record, ()).map_err(|e| Error::Checkpoint {
        path: PathBuf::from(dir),
        why: e.to_string(),
    })
}

/// The step's objective and its parts, weighted by each micro-batch's share of tokens.
#[derive(Debug, Default)]
struct Sums {
    loss: f64,
    ce: Option<f64>,
    kd: Option<f64>,
    tokens: usize,
}

fn add(acc: &mut Option<f64>, v: Option<f64>) {
    if let Some(v) = v {
        *acc = Some(acc.unwrap_or(0.0) + v);
    }
}

/// Gradients of the batch's mean objective with respect to `module`'s parameters.
fn accumulate<B: Backend, M: AutodiffModule<Ad<B>>>(
    module: &M,
    batch: &[Vec<u32>],
    cfg: &RecoverConfig,
    teacher: Option<&Llama<B>>,
    student_of: impl Fn(&M) -> Llama<Ad<B>>,
) -> Result<(GradientsParams, Sums)> {
    let predicted = |c: &[Vec<u32>]| c.iter().map(|w| w.len() - 1).sum::<usize>();
    let total = predicted(batch);
    let mut acc = GradientsAccumulator::<M>::new();
    let mut sums = Sums {
        tokens: total,
        ..Default::default()
    };
    for chunk in batch.chunks(cfg.micro_batch) {
        let w = predicted(chunk) as f64 / total as f64;
        let student = student_of(module);
        let tokens = student.tokens(chunk)?;
        let teacher_logits = match teacher {
            Some(t) if cfg.loss.needs_teacher() => {
                if t.shape().vocab_size != student.shape().vocab_size {
                    return Err(Error::Invalid(format!(
                        "the teacher's vocabulary ({}) differs from the student's ({}); distillation needs the same tokenizer",
                        t.shape().vocab_size,
                        student.shape().vocab_size
                    )));
                }
                Some(t.forward(t.tokens(chunk)?))
            }
            _ => None,
        };
        let o = objective(&student, tokens, teacher_logits, cfg)?;
        sums.loss += w * scalar(o.loss.clone().inner());
        add(&mut sums.ce, o.ce.map(|v| w * v));
        add(&mut sums.kd, o.kd.map(|v| w * v));
        let grads = (o.loss * w).backward();
        acc.accumulate(module, GradientsParams::from_grads(grads, module));
    }
    Ok((acc.grads(), sums))
}

/// One micro-batch's objective (on the graph) and the values of its parts.
struct Objective<B: Backend> {
    loss: Tensor<Ad<B>, 1>,
    ce: Option<f64>,
    kd: Option<f64>,
}

/// The objective of one micro-batch.
fn objective<B: Backend>(
    student: &Llama<Ad<B>>,
    tokens: Tensor<Ad<B>, 2, Int>,
    teacher_logits: Option<Tensor<B, 3>>,
    cfg: &RecoverConfig,
) -> Result<Objective<B>> {
    let Some(tl) = teacher_logits else {
        // Cross-entropy only: the chunked NLL, no full logits tensor.
        let ce = student.token_nll(tokens, None)?.mean();
        let v = scalar(ce.clone().inner());
        return Ok(Objective {
            loss: ce,
            ce: Some(v),
            kd: None,
        });
    };
    let logits = student.forward(tokens.clone());
    let [b, s, v] = logits.dims();
    // Teacher and student may end on different devices (placed models).
    let tl = tl.to_device(&logits.device());
    let tokens = tokens.to_device(&logits.device());
    let rows = |t: Tensor<_, 3>| t.narrow(1, 0, s - 1).reshape([b * (s - 1), v]);
    let kd = kd_loss(rows(logits.clone()), rows_inner(tl, b, s, v), &cfg.distill);
    let kd_v = scalar(kd.clone().inner());
    Ok(match cfg.loss {
        LossKind::Kd => Objective {
            loss: kd,
            ce: None,
            kd: Some(kd_v),
        },
        _ => {
            let ce = next_token_nll(logits, tokens).mean();
            let ce_v = scalar(ce.clone().inner());
            Objective {
                loss: ce + kd * cfg.distill.weight,
                ce: Some(ce_v),
                kd: Some(kd_v),
            }
        }
    })
}

fn rows_inner<B: Backend>(t: Tensor<B, 3>, b: usize, s: usize, v: usize) -> Tensor<B, 2> {
    t.narrow(1, 0, s - 1).reshape([b * (s - 1), v])
}

/// Distillation loss `T^2 * mean_rows KL(p_teacher || p_student)` at temperature `T`, over the
/// full vocabulary or the teacher's top `k` tokens per row (both renormalised over them).
/// The teacher's logits are constants.
///
/// # Shapes
/// - `student`, `teacher`: `[rows, vocab]` -> `[1]`
pub fn kd_loss<AD: AutodiffBackend>(
    student: Tensor<AD, 2>,
    teacher: Tensor<AD::InnerBackend, 2>,
    d: &Distill,
) -> Tensor<AD, 1> {
    let t = d.temperature;
    let vocab = teacher.dims()[1];
    if d.top_k.is_none_or(|k| k >= vocab) {
        // Over the full vocabulary: one fused pass each way where it applies (lopper-kernels).
        match lopper_kernels::kl_div(student, Tensor::from_inner(teacher), t as f32) {
            Ok(rows) => return rows.mean() * (t * t),
            Err((s, tl)) => return kd_portable(s, tl.inner(), t),
        }
    }
    let (s, tl) = match d.top_k {
        Some(k) if k < vocab => {
            let (values, indices) = teacher.topk_with_indices(k, 1);
            (student.gather(1, Tensor::from_inner(indices)), values)
        }
        _ => (student, teacher),
    };
    kd_portable(s, tl, t)
}

/// [`kd_loss`] on burn's ops: `T^2 * mean_rows KL(softmax(teacher / T) || softmax(student / T))`.
fn kd_portable<AD: AutodiffBackend>(
    s: Tensor<AD, 2>,
    tl: Tensor<AD::InnerBackend, 2>,
    t: f64,
) -> Tensor<AD, 1> {
    let log_q = log_softmax(s / t, 1);
    let log_p = log_softmax(tl / t, 1);
    let p = log_p.clone().exp();
    // sum p log p is a constant of the teacher: KL = sum p log p - sum p log q.
    let neg_entropy = (p.clone() * log_p).sum_dim(1);
    let cross = (Tensor::<AD, 2>::from_inner(p) * log_q).sum_dim(1);
    (Tensor::<AD, 2>::from_inner(neg_entropy) - cross).mean() * (t * t)
}

/// Sum of squares of every gradient of `module`'s parameters present in `grads`.
struct SquaredNorm<'a> {
    grads: &'a GradientsParams,
    sum: f64,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for SquaredNorm<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
            self.sum += scalar(g.powi_scalar(2).sum());
        }
    }
}

/// Multiplies every gradient of `module`'s parameters in `grads` by `factor`.
struct ScaleGrads<'a> {
    grads: &'a mut GradientsParams,
    factor: f32,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for ScaleGrads<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
            self.grads.register(param.id, g * self.factor);
        }
    }
}

/// The global gradient norm, and the gradients scaled down to `max` when it is above it (one
/// norm over every tensor, as PyTorch's `clip_grad_norm_`).
fn clip<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    mut grads: GradientsParams,
    max: Option<f64>,
) -> (GradientsParams, f64) {
    let mut n = SquaredNorm {
        grads: &grads,
        sum: 0.0,
    };
    module.visit(&mut n);
    let norm = n.sum.sqrt();
    if let Some(max) = max
        && norm > max
    {
        let mut s = ScaleGrads {
            grads: &mut grads,
            factor: (max / (norm + 1e-6)) as f32,
        };
        module.visit(&mut s);
    }
    (grads, norm)
}
