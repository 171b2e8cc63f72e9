//! Where a model's parts live. Decoder layers can be split over several devices, in contiguous
//! runs balanced by their bytes (what accelerate's `device_map="balanced"` does), with the
//! residual stream moving to the next device where the run changes; or they can be offloaded:
//! left in their source (a memory-mapped file, or the seeded generator of a synthetic model)
//! and read onto their device for their turn only, so that the device holds the embedding, the
//! LM head and one layer at a time.

use std::fmt;
use std::sync::Arc;

use burn::module::Module;
use burn::tensor::backend::{Backend, Device as _, DeviceId};
use lopper_core::{Dtype, ModelShape};

use crate::error::{Error, Result};
use crate::model::{DecoderLayer, LINEAR_NAMES, Llama, build_layer};
use crate::weights::{WeightSource, expected_dims};

/// Which device of a list each decoder layer lives on. The embedding lives on device 0, the
/// final norm and the LM head on the last layer's device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceMap {
    layers: Vec<usize>,
    devices: usize,
}

impl DeviceMap {
    /// A map of `layers[i]` = the device index of layer `i`, over `devices` devices.
    pub fn new(layers: Vec<usize>, devices: usize) -> Result<Self> {
        if devices == 0 {
            return Err(Error::Input(
                "a device map needs at least one device".into(),
            ));
        }
        if let Some((i, &d)) = layers.iter().enumerate().find(|(_, d)| **d >= devices) {
            return Err(Error::Input(format!(
                "the device map puts layer {i} on device {d}, but only {devices} devices are listed"
            )));
        }
        Ok(Self { layers, devices })
    }

    /// Every layer of `shape` on one device.
    pub fn single(shape: &ModelShape) -> Self {
        Self {
            layers: vec![0; shape.n_layers()],
            devices: 1,
        }
    }

    /// The layers of `shape` split over `devices` devices in contiguous runs so that the
    /// largest device share of parameters (the embedding counted on device 0, the LM head and
    /// final norm on the last) is as small as it can be. Devices beyond the layer count get
    /// nothing.
    pub fn balanced(shape: &ModelShape, devices: usize) -> Self {
        let devices = devices.max(1);
        let n = shape.n_layers();
        let cost = layer_params(shape);
        let (first, last) = (shape.embedding_params(), head_params(shape));
        // Exact minimax partition of the chain into at most `devices` runs: best[k][j] is the
        // smallest largest share that puts layers 0..j on k devices; from[k][j] where run k
        // starts. O(devices * n^2), tiny for any real model.
        let prefix: Vec<u64> = std::iter::once(0)
            .chain(cost.iter().scan(0, |s, &c| {
                *s += c;
                Some(*s)
            }))
            .collect();
        let share = |a: usize, b: usize| {
            prefix[b] - prefix[a] + if a == 0 { first } else { 0 } + if b == n { last } else { 0 }
        };
        let k_max = devices.min(n.max(1));
        let mut best = vec![vec![u64::MAX; n + 1]; k_max + 1];
        let mut from = vec![vec![0usize; n + 1]; k_max + 1];
        best[0][0] = 0;
        for k in 1..=k_max {
            for j in 0..=n {
                for a in 0..=j {
                    if best[k - 1][a] == u64::MAX {
                        continue;
                    }
                    let m = best[k - 1][a].max(share(a, j));
                    if m < best[k][j] {
                        best[k][j] = m;
                        from[k][j] = a;
                    }
                }
            }
        }
        let k = (1..=k_max).min_by_key(|&k| (best[k][n], k)).unwrap_or(1);
        let mut layers = vec![0; n];
        let (mut j, mut k_at) = (n, k);
        while k_at > 0 {
            let a = from[k_at][j];
            layers[a..j].fill(k_at - 1);
            j = a;
            k_at -= 1;
        }
        Self { layers, devices }
    }

    /// The device index of layer `i`.
    pub fn device_of(&self, layer: usize) -> usize {
        self.layers[layer]
    }

    /// The device index of every layer.
    pub fn layers(&self) -> &[usize] {
        &self.layers
    }

    /// The number of devices the map is over.
    pub fn devices(&self) -> usize {
        self.devices
    }

    /// The device holding the final norm and the LM head (the last layer's; device 0 for a
    /// model without layers).
    pub fn head_device(&self) -> usize {
        self.layers.last().copied().unwrap_or(0)
    }

    /// Parameters each device holds when every layer is resident (norms and biases excluded;
    /// a tied LM head is the embedding, on device 0).
    pub fn params_per_device(&self, shape: &ModelShape) -> Vec<u64> {
        let mut out = vec![0; self.devices];
        for (c, &d) in layer_params(shape).iter().zip(&self.layers) {
            out[d] += c;
        }
        out[0] += shape.embedding_params();
        out[self.head_device()] += head_params(shape);
        out
    }

    fn check(&self, shape: &ModelShape, devices: usize) -> Result<()> {
        if self.layers.len() != shape.n_layers() || self.devices != devices {
            return Err(Error::Input(format!(
                "the device map covers {} layers over {} devices, but the model has {} layers and {devices} devices were given",
                self.layers.len(),
                self.devices,
                shape.n_layers()
            )));
        }
        Ok(())
    }
}

/// The projection parameters of every layer of `shape`.
pub fn layer_params(shape: &ModelShape) -> Vec<u64> {
    shape
        .layers
        .iter()
        .map(|l| l.attn_params(shape.hidden_size) + l.mlp_params(shape.hidden_size))
        .collect()
}

/// The parameters of an untied LM head (0 when tied to the embedding).
fn head_params(shape: &ModelShape) -> u64 {
    if shape.tie_word_embeddings {
        0
    } else {
        shape.embedding_params()
    }
}

/// A weight source that can be kept for the life of a model and read from several threads.
pub type SharedSource = Arc<dyn WeightSource + Send + Sync>;

/// The decoder layers of an offloaded model: their source, the storage type and the device
/// each one is read onto for its turn (by id, so that the stream does not name a backend).
#[derive(Clone)]
pub struct LayerStream {
    source: SharedSource,
    dtype: Dtype,
    devices: Vec<DeviceId>,
}

impl fmt::Debug for LayerStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LayerStream")
            .field("source", &self.source.describe())
            .field("dtype", &self.dtype)
            .field("devices", &self.devices)
            .finish()
    }
}

impl LayerStream {
    /// Layer `i`, read from the source onto its device.
    pub(crate) fn layer<B: Backend>(
        &self,
        shape: &ModelShape,
        i: usize,
    ) -> Result<DecoderLayer<B>> {
        build_layer(
            shape,
            self.source.as_ref(),
            i,
            &self.device::<B>(i),
            self.dtype,
        )
    }

    /// The device layer `i` runs on.
    pub(crate) fn device<B: Backend>(&self, i: usize) -> B::Device {
        B::Device::from_id(self.devices[i])
    }
}

/// Checks that the source has every tensor of decoder layer `i` with the dims `shape` implies
/// (biases only where present: they are optional).
fn check_layer_tensors(shape: &ModelShape, src: &dyn WeightSource, i: usize) -> Result<()> {
    let check = |name: String, required: bool| -> Result<()> {
        let expected = expected_dims(shape, &name);
        match src.dims(&name)? {
            None if required => Err(Error::MissingTensor {
                name,
                source_desc: src.describe(),
            }),
            Some(got) if Some(&got) != expected.as_ref() => Err(Error::TensorShape {
                name,
                source_desc: src.describe(),
                expected: expected.unwrap_or_default(),
                got,
            }),
            _ => Ok(()),
        }
    };
    let l = &shape.layers[i];
    let blocks = [
        (
            l.has_attn(),
            "input_layernorm",
            "self_attn",
            &LINEAR_NAMES[..4],
        ),
        (
            l.has_mlp(),
            "post_attention_layernorm",
            "mlp",
            &LINEAR_NAMES[4..],
        ),
    ];
    for (present, norm, block, projections) in blocks {
        if !present {
            continue;
        }
        check(format!("model.layers.{i}.{norm}.weight"), true)?;
        for p in projections {
            check(format!("model.layers.{i}.{block}.{p}.weight"), true)?;
            check(format!("model.layers.{i}.{block}.{p}.bias"), false)?;
        }
    }
    Ok(())
}

/// `module` on `device`, left as it is where it already lives there.
fn moved<B: Backend, M: Module<B>>(module: M, device: &B::Device) -> M {
    if module.devices().iter().all(|d| d == device) {
        module
    } else {
        // `fork`, not `to_device`: on an autodiff backend the moved parameters are leaves of
        // their own (trainable), not the recorded output of a move.
        module.fork(device)
    }
}

/// A layer with no blocks: what an offloaded model holds in place of each decoder layer.
fn placeholder<B: Backend>() -> DecoderLayer<B> {
    DecoderLayer {
        input_layernorm: None,
        self_attn: None,
        post_attention_layernorm: None,
        mlp: None,
    }
}

impl<B: Backend> Llama<B> {
    /// The model of `shape` with its decoder layers offloaded: the embedding, final norm and LM
    /// head are read onto their devices now (device 0, and the head device of `map`), and each
    /// decoder layer is read from `weights` onto its device of `map` at its turn in every
    /// forward, then dropped. Device memory holds the embedding, the head and one layer;
    /// the source keeps the rest (a memory-mapped file stays in the page cache, which the
    /// kernel can evict; a synthetic model regenerates the layer).
    ///
    /// An offloaded model serves every forward pass ([`Llama::forward`],
    /// [`Llama::token_nll`], [`Llama::forward_layers`] and the calls built on them) and hands
    /// out its layers one at a time ([`Llama::layer`]), which is what the metric methods, the
    /// search, surgery and reconstruction read. What needs every layer at once (autodiff
    /// copies, one-shot pruning in place, exports of the unpruned model) checks
    /// [`Llama::require_resident`] first.
    pub fn offloaded(
        shape: &ModelShape,
        weights: SharedSource,
        devices: &[B::Device],
        map: &DeviceMap,
        dtype: Dtype,
    ) -> Result<Self> {
        shape.validate()?;
        map.check(shape, devices.len())?;
        // Every layer's tensors must be there and of the right shape before any work (read from
        // the headers, no data), so that a bad file fails here and not halfway through a
        // forward.
        for i in 0..shape.n_layers() {
            check_layer_tensors(shape, weights.as_ref(), i)?;
        }
        let stream = LayerStream {
            source: weights.clone(),
            dtype,
            devices: Vec::new(), // set by `place`
        };
        let layers = (0..shape.n_layers()).map(|_| placeholder()).collect();
        let model = Self::with_layers(
            shape,
            weights.as_ref(),
            layers,
            &devices[0],
            dtype,
            Some(stream),
        )?
        .place(devices, map)?;
        tracing::debug!(layers = shape.n_layers(), %dtype, source = %weights.describe(), "model built, layers offloaded");
        Ok(model)
    }

    /// The model of `shape` read from `weights` with each decoder layer straight onto its
    /// device of `map` (no device ever holds more than its share), the embedding onto device 0
    /// and the final norm and LM head onto the head device.
    pub fn from_weights_placed(
        shape: &ModelShape,
        weights: &dyn WeightSource,
        devices: &[B::Device],
        map: &DeviceMap,
        dtype: Dtype,
    ) -> Result<Self> {
        shape.validate()?;
        map.check(shape, devices.len())?;
        let layers = (0..shape.n_layers())
            .map(|i| build_layer(shape, weights, i, &devices[map.device_of(i)], dtype))
            .collect::<Result<Vec<_>>>()?;
        Self::with_layers(shape, weights, layers, &devices[0], dtype, None)?.place(devices, map)
    }

    /// The model with its layers moved to `devices` as `map` says: the embedding on device 0,
    /// the final norm and LM head on the last layer's device. Forward passes move the residual
    /// stream (and masks) to each layer's device; results equal the unplaced model's.
    pub fn place(mut self, devices: &[B::Device], map: &DeviceMap) -> Result<Self> {
        map.check(&self.shape, devices.len())?;
        let head = &devices[map.head_device()];
        self.embed_tokens = moved(self.embed_tokens, &devices[0]);
        self.norm = moved(self.norm, head);
        self.lm_head = self.lm_head.map(|h| moved(h, head));
        if let Some(stream) = &mut self.stream {
            stream.devices = map.layers().iter().map(|&d| devices[d].to_id()).collect();
        } else {
            self.layers = std::mem::take(&mut self.layers)
                .into_iter()
                .zip(map.layers())
                .map(|(l, &d)| moved(l, &devices[d]))
                .collect();
        }
        Ok(self)
    }

    /// Where the model lives, as [`Llama::place`] takes it: the embedding's device first, then
    /// every other device a layer runs on in layer order, and the map of the layers onto that
    /// list (a layer without blocks goes with the layer before it). A model that was never
    /// placed gives one device.
    pub fn placement(&self) -> (Vec<B::Device>, DeviceMap) {
        let mut devices = vec![self.device()];
        let mut layers = Vec::with_capacity(self.layers.len());
        for i in 0..self.layers.len() {
            let at = match self.layer_device(i) {
                Some(d) => match devices.iter().position(|x| *x == d) {
                    Some(k) => k,
                    None => {
                        devices.push(d);
                        devices.len() - 1
                    }
                },
                None => layers.last().copied().unwrap_or(0),
            };
            layers.push(at);
        }
        let n = devices.len();
        (devices, DeviceMap { layers, devices: n })
    }

    /// This model's weights in f32 on backend `C` (an autodiff backend over `B`, say), every
    /// layer built straight onto the device it has here ([`Llama::placement`]), so that no
    /// device ever holds more than its share.
    pub fn placed_copy<C: Backend<Device = B::Device>>(&self) -> Result<Llama<C>> {
        self.require_resident("a trainable copy of every layer")?;
        let (devices, map) = self.placement();
        Llama::<C>::from_weights_placed(
            self.shape(),
            &self.to_host_weights(),
            &devices,
            &map,
            Dtype::F32,
        )
    }

    /// Decoder layer `i`: the model's own when resident, read from the source onto its device
    /// when offloaded (held by the caller for as long as it needs it, then dropped). What reads
    /// a layer's weights (metrics, surgery, reconstruction) goes through this, so that it
    /// serves resident and offloaded models alike; `model.layers` of an offloaded model holds
    /// empty placeholders.
    pub fn layer(&self, i: usize) -> Result<std::borrow::Cow<'_, DecoderLayer<B>>> {
        use std::borrow::Cow;
        if i >= self.layers.len() {
            return Err(Error::Input(format!(
                "layer {i} of a model with {} layers",
                self.layers.len()
            )));
        }
        Ok(match &self.stream {
            Some(stream) => Cow::Owned(stream.layer(&self.shape, i)?),
            None => Cow::Borrowed(&self.layers[i]),
        })
    }

    /// Whether the decoder layers are offloaded ([`Llama::offloaded`]).
    pub fn is_offloaded(&self) -> bool {
        self.stream.is_some()
    }

    /// An error naming `what` when the model is offloaded: for the operations that need every
    /// layer's weights in place.
    pub fn require_resident(&self, what: &str) -> Result<()> {
        if self.is_offloaded() {
            return Err(Error::Input(format!(
                "{what} needs the decoder layers' weights in memory, but this model's layers are offloaded (read for each turn); load it without --offload"
            )));
        }
        Ok(())
    }

    /// The device decoder layer `i` runs on (`None` for a resident layer without blocks: it
    /// runs nothing).
    pub fn layer_device(&self, i: usize) -> Option<B::Device> {
        if let Some(stream) = &self.stream {
            return Some(stream.device::<B>(i));
        }
        self.layers[i].device()
    }
}
