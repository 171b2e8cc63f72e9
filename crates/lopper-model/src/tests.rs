//! Model tests on the tiny seeded LLaMA (3 layers, GQA 4/2): masks, loading paths, bad input.

use burn::tensor::{Tensor, TensorData};
use burn_flex::{Flex, FlexDevice};
use lopper_core::{MaskPlan, ModelShape, PruneUnit};

use crate::gguf::{GgufFile, Value, llama_gguf};
use crate::weights::{GgufWeights, SafetensorsWeights};
use crate::{
    DecoderLayer, Error, HostWeights, Llama, Masks, RandomWeights, WeightSource, shape_from_gguf,
};

type B = Flex;
const D: FlexDevice = FlexDevice;

fn tiny() -> Llama<B> {
    Llama::random(&ModelShape::tiny(), 7, &D).unwrap()
}

fn rows() -> Vec<Vec<u32>> {
    (0..2)
        .map(|b| {
            (0..12)
                .map(|t| ((b * 31 + t * 17 + 3) % 128) as u32)
                .collect()
        })
        .collect()
}

fn logits(m: &Llama<B>, masks: Option<&Masks<B>>) -> Vec<f32> {
    let t = m.tokens(&rows()).unwrap();
    m.forward_masked(t, masks)
        .unwrap()
        .into_data()
        .to_vec()
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn forward_has_the_documented_shape_and_is_finite() {
    let m = tiny();
    let t = m.tokens(&rows()).unwrap();
    let out = m.forward(t.clone());
    assert_eq!(out.dims(), [2, 12, 128]);
    let nll = m.token_nll(t.clone(), None).unwrap();
    assert_eq!(nll.dims(), [2, 11]);
    let loss = m.mean_loss(t, None).unwrap();
    assert!(loss.is_finite() && loss > 0.0);
}

#[test]
fn all_ones_masks_equal_the_plain_forward_exactly() {
    let m = tiny();
    let ones = Masks::ones(m.shape(), &D);
    assert_eq!(logits(&m, None), logits(&m, Some(&ones)));
    let keep_all = Masks::from_plan(&MaskPlan::keep_all(m.shape()), &D).unwrap();
    assert_eq!(logits(&m, None), logits(&m, Some(&keep_all)));
}

#[test]
fn causal_attention_ignores_future_tokens() {
    let m = tiny();
    let mut r = rows();
    let full = logits(&m, None);
    r[0][11] = (r[0][11] + 1) % 128;
    let t = m.tokens(&r).unwrap();
    let changed: Vec<f32> = m.forward(t).into_data().to_vec().unwrap();
    // Positions 0..11 of row 0 cannot see token 11.
    assert_eq!(full[..11 * 128], changed[..11 * 128]);
    assert_ne!(full[11 * 128..12 * 128], changed[11 * 128..12 * 128]);
}

/// Removing units from the weights by hand (the surgery that masks stand for) gives the masked
/// model's logits: KV groups (q/k/v rows, o_proj columns), MLP channels, whole blocks.
#[test]
fn masks_equal_physically_removed_units() {
    let m = tiny();
    let shape = m.shape().clone();
    let removed = [
        PruneUnit::KvGroup { layer: 0, group: 1 },
        PruneUnit::Channel { layer: 1, index: 3 },
        PruneUnit::Channel {
            layer: 1,
            index: 40,
        },
        PruneUnit::AttnBlock { layer: 2 },
    ];
    let plan = MaskPlan::from_removed(&shape, &removed).unwrap();
    let masked = logits(&m, Some(&Masks::from_plan(&plan, &D).unwrap()));

    let mut w = m.to_host_weights();
    let hd = 8;
    let keep_rows = |t: &crate::HostTensor, rows: &[usize]| crate::HostTensor {
        shape: vec![rows.len(), t.shape[1]],
        data: rows
            .iter()
            .flat_map(|&r| t.data[r * t.shape[1]..(r + 1) * t.shape[1]].to_vec())
            .collect(),
    };
    let keep_cols =
        |t: &crate::HostTensor, cols: &[usize]| keep_rows(&t.transposed(), cols).transposed();
    let mut edit = |name: &str, f: &dyn Fn(&crate::HostTensor) -> crate::HostTensor| {
        let t = w.tensors[name].clone();
        w.tensors.insert(name.into(), f(&t));
    };
    // Layer 0, KV group 0 kept: query heads 0, 1 (rows 0..16), KV head 0 (rows 0..8).
    let q_rows: Vec<usize> = (0..2 * hd).collect();
    let kv_rows: Vec<usize> = (0..hd).collect();
    edit("model.layers.0.self_attn.q_proj.weight", &|t| {
        keep_rows(t, &q_rows)
    });
    edit("model.layers.0.self_attn.k_proj.weight", &|t| {
        keep_rows(t, &kv_rows)
    });
    edit("model.layers.0.self_attn.v_proj.weight", &|t| {
        keep_rows(t, &kv_rows)
    });
    edit("model.layers.0.self_attn.o_proj.weight", &|t| {
        keep_cols(t, &q_rows)
    });
    let ch: Vec<usize> = (0..48).filter(|&c| c != 3 && c != 40).collect();
    edit("model.layers.1.mlp.gate_proj.weight", &|t| {
        keep_rows(t, &ch)
    });
    edit("model.layers.1.mlp.up_proj.weight", &|t| keep_rows(t, &ch));
    edit("model.layers.1.mlp.down_proj.weight", &|t| {
        keep_cols(t, &ch)
    });
    for t in [
        "input_layernorm",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
    ] {
        w.tensors.remove(&format!("model.layers.2.{t}.weight"));
    }
    let small_shape = plan.pruned_shape();
    let small = Llama::<B>::from_weights(&small_shape, &w, &D).unwrap();
    let physical = logits(&small, None);
    assert!(
        max_diff(&masked, &physical) < 1e-5,
        "{}",
        max_diff(&masked, &physical)
    );
    assert_eq!(small_shape.num_params(), {
        let hw = small.to_host_weights();
        hw.tensors
            .values()
            .map(|t| t.data.len() as u64)
            .sum::<u64>()
    });
}

#[test]
fn safetensors_round_trip_gives_identical_logits() {
    let m = tiny();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("model.safetensors");
    m.to_host_weights().save_safetensors(&p).unwrap();
    let st = SafetensorsWeights::open_files(&[p]).unwrap();
    let back = Llama::<B>::from_weights(m.shape(), &st, &D).unwrap();
    assert_eq!(logits(&m, None), logits(&back, None));
}

#[test]
fn gguf_round_trip_restores_the_qk_layout() {
    let m = tiny();
    let mut b = llama_gguf(m.shape(), &m.to_host_weights());
    b.meta("general.name", Value::Str("tiny".into()));
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tiny.gguf");
    std::fs::write(&p, b.to_bytes()).unwrap();
    let f = GgufFile::open(&p).unwrap();
    let shape = shape_from_gguf(&f).unwrap();
    assert_eq!(&shape, m.shape());
    // The stored q rows are permuted (llama.cpp layout), so they differ from the HF layout...
    let raw_q = f.dequantize("blk.0.attn_q.weight").unwrap().1;
    let hf_q = &m.to_host_weights().tensors["model.layers.0.self_attn.q_proj.weight"];
    assert_ne!(&raw_q, &hf_q.data);
    // ...and loading undoes it.
    let back = Llama::<B>::from_weights(&shape, &GgufWeights::new(&f, &shape), &D).unwrap();
    assert_eq!(logits(&m, None), logits(&back, None));
    // Offloaded, the layers are read from the file's map for each turn: the same logits.
    let off = Llama::<B>::offloaded(
        &shape,
        std::sync::Arc::new(crate::GgufSource::new(f, &shape)),
        &[D],
        &crate::DeviceMap::single(&shape),
        lopper_core::Dtype::F32,
    )
    .unwrap();
    assert_eq!(logits(&m, None), logits(&off, None));
    // And a safetensors directory's layers, offloaded, likewise.
    m.to_host_weights()
        .save_safetensors(&dir.path().join("model.safetensors"))
        .unwrap();
    let st = SafetensorsWeights::open_dir(dir.path()).unwrap();
    let off = Llama::<B>::offloaded(
        &shape,
        std::sync::Arc::new(st),
        &[D],
        &crate::DeviceMap::single(&shape),
        lopper_core::Dtype::F32,
    )
    .unwrap();
    assert_eq!(logits(&m, None), logits(&off, None));
}

#[test]
fn heterogeneous_shapes_round_trip_through_gguf_arrays() {
    let shape = MaskPlan::from_removed(
        &ModelShape::tiny(),
        &[
            PruneUnit::KvGroup { layer: 1, group: 0 },
            PruneUnit::MlpBlock { layer: 2 },
        ],
    )
    .unwrap()
    .pruned_shape();
    let m = Llama::<B>::random(&shape, 3, &D).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("het.gguf");
    std::fs::write(&p, llama_gguf(&shape, &m.to_host_weights()).to_bytes()).unwrap();
    let f = GgufFile::open(&p).unwrap();
    // Heterogeneous layers are llama.cpp's `deci` architecture, with per-layer arrays; the
    // layer with attention and no MLP carries a zero one-channel MLP that lopper reads as none.
    assert_eq!(
        f.get("general.architecture").unwrap().as_str(),
        Some("deci")
    );
    assert!(
        f.get("deci.attention.head_count")
            .unwrap()
            .as_array()
            .is_some()
    );
    let ffn = f
        .get("deci.feed_forward_length")
        .unwrap()
        .as_array()
        .unwrap();
    assert_eq!(ffn[2].as_u64(), Some(1));
    assert!(f.tensor_info("blk.2.ffn_down.weight").is_some());
    assert_eq!(shape_from_gguf(&f).unwrap(), shape);
    let back = Llama::<B>::from_weights(&shape, &GgufWeights::new(&f, &shape), &D).unwrap();
    assert_eq!(logits(&m, None), logits(&back, None));
}

#[test]
fn missing_and_misshapen_tensors_are_named() {
    let shape = ModelShape::tiny();
    let mut w = HostWeights {
        tensors: RandomWeights::new(&shape, 1)
            .tensor("model.embed_tokens.weight")
            .ok()
            .flatten()
            .map(|t| {
                [("model.embed_tokens.weight".to_string(), t)]
                    .into_iter()
                    .collect()
            })
            .unwrap(),
    };
    let e = Llama::<B>::from_weights(&shape, &w, &D).unwrap_err();
    assert!(
        matches!(&e, Error::MissingTensor { name, .. } if name.starts_with("model.layers.0.")),
        "{e}"
    );
    let full = Llama::<B>::random(&shape, 1, &D).unwrap().to_host_weights();
    w = full.clone();
    w.tensors.insert(
        "model.layers.1.mlp.up_proj.weight".into(),
        crate::HostTensor {
            shape: vec![47, 32],
            data: vec![0.0; 47 * 32],
        },
    );
    let e = Llama::<B>::from_weights(&shape, &w, &D)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.layers.1.mlp.up_proj.weight")
            && e.contains("[47, 32]")
            && e.contains("[48, 32]"),
        "{e}"
    );
}

#[test]
fn bad_masks_and_tokens_are_refused() {
    let m = tiny();
    let mut masks = Masks::<B>::none(m.shape());
    masks.layers[1].channels = Some(Tensor::from_data(TensorData::new(vec![1f32; 47], [47]), &D));
    let t = m.tokens(&rows()).unwrap();
    let e = m.forward_masked(t, Some(&masks)).unwrap_err().to_string();
    assert!(e.contains("layer 1") && e.contains("47"), "{e}");
    let masks = Masks::<B> { layers: vec![] };
    assert!(
        m.forward_masked(m.tokens(&rows()).unwrap(), Some(&masks))
            .is_err()
    );
    assert!(
        m.tokens(&[vec![1, 2], vec![3]])
            .unwrap_err()
            .to_string()
            .contains("row 1")
    );
    assert!(
        m.tokens(&[vec![1, 500]])
            .unwrap_err()
            .to_string()
            .contains("outside the vocabulary")
    );
    assert!(m.tokens(&[]).is_err());
    assert!(m.token_nll(m.tokens(&[vec![5]]).unwrap(), None).is_err());
}

#[test]
fn a_plan_for_another_model_does_not_make_masks_that_fit() {
    let m = tiny();
    let mut other = ModelShape::tiny();
    other.layers[0].ffn_hidden = 40;
    let plan = MaskPlan::keep_all(&other);
    let masks = Masks::<B>::from_plan(&plan, &D).unwrap();
    let e = m
        .forward_masked(m.tokens(&rows()).unwrap(), Some(&masks))
        .unwrap_err()
        .to_string();
    assert!(e.contains("layer 0"), "{e}");
    assert!(plan.validate_against(m.shape()).is_err());
}

#[test]
fn chunked_causal_attention_equals_the_fused_kernel() {
    use burn::tensor::Distribution;
    use burn::tensor::module::attention;
    use burn::tensor::ops::AttentionModuleOptions;
    let (b, h, s, hd) = (2, 3, 600, 8);
    let rope = crate::Rope::<B>::new(&[1.0; 4], b, s, &D);
    let q = Tensor::<B, 4>::random([b, h, s, hd], Distribution::Normal(0.0, 1.0), &D);
    let k = Tensor::<B, 4>::random([b, h, s, hd], Distribution::Normal(0.0, 1.0), &D);
    let v = Tensor::<B, 4>::random([b, h, s, hd], Distribution::Normal(0.0, 1.0), &D);
    let chunked: Vec<f32> = rope
        .causal_attention(q.clone(), k.clone(), v.clone())
        .into_data()
        .to_vec()
        .unwrap();
    let options = AttentionModuleOptions {
        scale: None,
        softcap: None,
        is_causal: true,
    };
    let fused: Vec<f32> = attention(q, k, v, None, None, options)
        .into_data()
        .to_vec()
        .unwrap();
    assert!(
        max_diff(&chunked, &fused) < 1e-5,
        "{}",
        max_diff(&chunked, &fused)
    );
}

#[test]
fn the_blocked_loss_equals_the_loss_of_the_full_logits() {
    let m = tiny();
    let t = m.tokens(&rows()).unwrap();
    let full: Vec<f32> = crate::next_token_nll(m.forward(t.clone()), t.clone())
        .into_data()
        .to_vec()
        .unwrap();
    let vals = |x: Tensor<B, 2>| -> Vec<f32> { x.into_data().to_vec().unwrap() };
    // 2 rows x 11 predicting positions: blocks of 7 (not dividing 22, crossing a row), 1, 22.
    let hidden = m.forward_hidden(t.clone(), None).unwrap();
    for block in [7, 1, 22, 1024] {
        let got = vals(m.nll_in_blocks(hidden.clone(), t.clone(), block));
        assert!(max_diff(&full, &got) < 1e-5, "block {block}");
    }
    assert!(max_diff(&full, &vals(m.token_nll(t.clone(), None).unwrap())) < 1e-5);
    // From the residual stream leaving the last layer: final norm, head, loss.
    let mut last = None;
    m.forward_with_hidden(t.clone(), None, |i, h| {
        if i + 1 == m.layers.len() {
            last = Some(h.clone());
        }
    })
    .unwrap();
    // `on_hidden(i, x)` sees the stream entering layer i: run the last layer by hand.
    let stepper = m.stepper(2, 12);
    let out = stepper.forward(m.layers.last().unwrap(), last.unwrap(), |_, _| {});
    assert!(max_diff(&full, &vals(m.stream_nll(out, t))) < 1e-5);
}

#[test]
fn the_fused_attention_equals_the_portable_path() {
    // The BLAS path (fused RoPE + causal GQA attention, BLAS products) against burn's ops on
    // the same model, with and without head masks, short (fused burn kernel) and long
    // (block-causal) sequences.
    if lopper_kernels::blas().is_none() {
        return; // lopper-kernels' the_blas_is_installed fails instead
    }
    let m = tiny();
    let shape = m.shape().clone();
    let removed = [
        PruneUnit::KvGroup { layer: 0, group: 1 },
        PruneUnit::Channel { layer: 1, index: 3 },
        PruneUnit::KvGroup { layer: 2, group: 0 },
    ];
    let plan = MaskPlan::from_removed(&shape, &removed).unwrap();
    let masks = Masks::<B>::from_plan(&plan, &D).unwrap();
    for (batch, seq) in [(2, 12), (1, 600)] {
        let ids: Vec<Vec<u32>> = (0..batch)
            .map(|b| {
                (0..seq)
                    .map(|t| ((b * 31 + t * 17 + 3) % 128) as u32)
                    .collect()
            })
            .collect();
        let t = m.tokens(&ids).unwrap();
        for masks in [None, Some(&masks)] {
            let before = lopper_kernels::products_on_blas();
            let fast: Vec<f32> = m
                .forward_masked(t.clone(), masks)
                .unwrap()
                .into_data()
                .to_vec()
                .unwrap();
            assert!(lopper_kernels::products_on_blas() > before);
            let slow: Vec<f32> = lopper_kernels::portable(|| {
                m.forward_masked(t.clone(), masks)
                    .unwrap()
                    .into_data()
                    .to_vec()
                    .unwrap()
            });
            let d = max_diff(&fast, &slow);
            assert!(
                d < 1e-4,
                "{batch}x{seq}, masks {}: max diff {d}",
                masks.is_some()
            );
        }
    }
}

#[test]
fn the_fused_backward_equals_the_portable_one() {
    // On Autodiff<Flex> the attention and the NLL are recorded ops with their own backward
    // (lopper-kernels); burn's ops differentiate the portable path. The loss and every gradient
    // of the decoder's weights agree, with head and channel masks, for a short sequence and a
    // long one (several blocks of query rows in the attention's backward).
    use burn::backend::Autodiff;
    if lopper_kernels::blas().is_none() {
        return; // lopper-kernels' the_blas_is_installed fails instead
    }
    type A = Autodiff<Flex>;
    let shape = ModelShape::tiny();
    let m = Llama::<A>::from_weights(&shape, &RandomWeights::new(&shape, 7), &D).unwrap();
    let removed = [
        PruneUnit::KvGroup { layer: 0, group: 1 },
        PruneUnit::Channel { layer: 1, index: 3 },
    ];
    let plan = MaskPlan::from_removed(&shape, &removed).unwrap();
    let masks = Masks::<A>::from_plan(&plan, &D).unwrap();
    let grads_of = |seq: usize, masks: Option<&Masks<A>>| -> (f32, Vec<Vec<f32>>) {
        let ids: Vec<Vec<u32>> = (0..2)
            .map(|b| {
                (0..seq)
                    .map(|t| ((b * 31 + t * 17 + 3) % 128) as u32)
                    .collect()
            })
            .collect();
        let loss = m.token_nll(m.tokens(&ids).unwrap(), masks).unwrap().mean();
        let value: f32 = loss.clone().into_data().to_vec::<f32>().unwrap()[0];
        let grads = loss.backward();
        let per_weight = m
            .layers
            .iter()
            .flat_map(|l| l.linears())
            .flatten()
            .map(|lin| {
                let g = lin
                    .weight
                    .val()
                    .grad(&grads)
                    .expect("every weight is tracked");
                g.into_data().to_vec::<f32>().unwrap()
            })
            .collect();
        (value, per_weight)
    };
    for seq in [12, 300] {
        for masks in [None, Some(&masks)] {
            let before = lopper_kernels::products_on_blas();
            let (fast_loss, fast) = grads_of(seq, masks);
            assert!(lopper_kernels::products_on_blas() > before);
            let (slow_loss, slow) = lopper_kernels::portable(|| grads_of(seq, masks));
            assert!(
                (fast_loss - slow_loss).abs() < 1e-5 * slow_loss.abs(),
                "seq {seq}: loss {fast_loss} vs {slow_loss}"
            );
            for (i, (f, s)) in fast.iter().zip(&slow).enumerate() {
                let scale = s.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = max_diff(f, s);
                assert!(
                    d <= 1e-3 * scale,
                    "seq {seq}, masks {}, weight {i}: max diff {d} of scale {scale}",
                    masks.is_some()
                );
            }
        }
    }
}

#[test]
fn narrow_weights_give_the_f32_model_within_rounding() {
    use lopper_core::Dtype;
    let shape = ModelShape::tiny();
    let src = RandomWeights::new(&shape, 7);
    let f32_model = tiny();
    let want = logits(&f32_model, None);
    let t = f32_model.tokens(&rows()).unwrap();
    let want_loss = f32_model.mean_loss(t.clone(), None).unwrap();
    for dtype in [Dtype::Bf16, Dtype::F16] {
        let m = Llama::<B>::from_weights_in(&shape, &src, &D, dtype).unwrap();
        assert_eq!(m.dtype(), dtype);
        let got = logits(&m, None);
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = max_diff(&got, &want);
        assert!(d > 0.0, "{dtype}: rounding must show");
        assert!(d < 0.05 * scale, "{dtype}: max diff {d} of scale {scale}");
        let loss = m.mean_loss(t.clone(), None).unwrap();
        assert!(
            (loss - want_loss).abs() < 0.01 * want_loss,
            "{dtype}: loss {loss} vs f32 {want_loss}"
        );
        // Masks and the host copy work on narrow weights too.
        let ones = Masks::ones(m.shape(), &D);
        assert_eq!(logits(&m, Some(&ones)), got);
        let host = m.to_host_weights();
        let back = Llama::<B>::from_weights_in(&shape, &host, &D, dtype).unwrap();
        assert_eq!(
            logits(&back, None),
            got,
            "{dtype}: the host copy round-trips"
        );
    }
}

#[test]
fn narrow_weights_are_stored_narrow() {
    use lopper_core::Dtype;
    let shape = ModelShape::tiny();
    let m = Llama::<B>::from_weights_in(&shape, &RandomWeights::new(&shape, 7), &D, Dtype::Bf16)
        .unwrap();
    let a = m.layers[0].self_attn.as_ref().unwrap();
    assert_eq!(a.q_proj.weight.val().dtype(), burn::tensor::DType::BF16);
    assert_eq!(
        m.layers[0]
            .input_layernorm
            .as_ref()
            .unwrap()
            .weight
            .val()
            .dtype(),
        burn::tensor::DType::F32,
        "norm scales stay f32"
    );
    // The stored [in, out] weight is the transpose of the HF [out, in] tensor, rounded.
    let hf = RandomWeights::new(&shape, 7)
        .tensor("model.layers.0.self_attn.q_proj.weight")
        .unwrap()
        .unwrap();
    let stored: Vec<f32> = a
        .q_proj
        .weight
        .val()
        .into_data()
        .convert::<f32>()
        .to_vec()
        .unwrap();
    let (r, c) = (hf.shape[0], hf.shape[1]);
    for i in 0..r {
        for j in 0..c {
            let v = hf.data[i * c + j];
            assert_eq!(stored[j * r + i], half::bf16::from_f32(v).to_f32());
        }
    }
}

/// The tiny shape with a tied head and layers of different widths (what a pruned model is).
fn hetero_tied() -> ModelShape {
    let mut s = ModelShape::tiny();
    s.tie_word_embeddings = true;
    s.layers[1].ffn_hidden = 16;
    s.layers[2].n_kv_heads = 1;
    s.layers[2].n_heads = 2;
    s
}

#[test]
fn a_balanced_device_map_is_contiguous_and_its_largest_share_is_the_smallest_possible() {
    use crate::DeviceMap;
    let mut shape = ModelShape::tiny();
    shape.layers = (0..7)
        .map(|i| lopper_core::LayerShape {
            ffn_hidden: [48, 8, 96, 16, 48, 200, 8][i],
            ..ModelShape::tiny().layers[0]
        })
        .collect();
    for tied in [false, true] {
        shape.tie_word_embeddings = tied;
        for devices in 1..=9 {
            let map = DeviceMap::balanced(&shape, devices);
            let l = map.layers();
            assert_eq!(l.len(), 7);
            assert!(
                l.windows(2).all(|w| w[0] <= w[1] && w[1] - w[0] <= 1),
                "{l:?}"
            );
            assert_eq!(l[0], 0);
            let worst = *map.params_per_device(&shape).iter().max().unwrap();
            // Brute force over every way to cut the 7 layers into at most `devices` runs.
            let mut best = u64::MAX;
            for cuts in 0u32..(1 << 6) {
                if cuts.count_ones() as usize + 1 > devices {
                    continue;
                }
                let mut d = 0;
                let mut layers = vec![0; 7];
                for (i, slot) in layers.iter_mut().enumerate().skip(1) {
                    if cuts & (1 << (i - 1)) != 0 {
                        d += 1;
                    }
                    *slot = d;
                }
                let m = DeviceMap::new(layers, devices).unwrap();
                best = best.min(*m.params_per_device(&shape).iter().max().unwrap());
            }
            assert_eq!(worst, best, "{devices} devices, tied {tied}: {l:?}");
        }
    }
    let total: u64 = DeviceMap::balanced(&shape, 3)
        .params_per_device(&shape)
        .iter()
        .sum();
    assert_eq!(total, shape.num_params() - shape.norm_params());
    let e = DeviceMap::new(vec![0, 2, 1], 2).unwrap_err().to_string();
    assert!(
        e.contains("layer 1 on device 2") && e.contains("only 2"),
        "{e}"
    );
}

#[test]
fn a_model_placed_over_several_devices_gives_the_unplaced_logits() {
    use crate::DeviceMap;
    for shape in [ModelShape::tiny(), hetero_tied()] {
        let w = RandomWeights::new(&shape, 5);
        let plain = Llama::<B>::from_weights(&shape, &w, &D).unwrap();
        let devices = [D, D, D];
        let map = DeviceMap::new(vec![0, 1, 2], 3).unwrap();
        let placed =
            Llama::<B>::from_weights_placed(&shape, &w, &devices, &map, lopper_core::Dtype::F32)
                .unwrap();
        assert_eq!(logits(&plain, None), logits(&placed, None));
        let moved = plain
            .clone()
            .place(&devices[..2], &DeviceMap::balanced(&shape, 2))
            .unwrap();
        let masks = Masks::from_plan(
            &MaskPlan::from_removed(&shape, &[PruneUnit::Channel { layer: 0, index: 3 }]).unwrap(),
            &D,
        )
        .unwrap();
        assert_eq!(logits(&plain, Some(&masks)), logits(&moved, Some(&masks)));
        assert!(
            (0..shape.n_layers()).all(|i| placed.layer_device(i) == Some(D)),
            "every layer reports its device"
        );
        let e = plain
            .place(&devices, &DeviceMap::balanced(&shape, 2))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("over 2 devices") && e.contains("3 devices were given"),
            "{e}"
        );
    }
}

#[test]
fn an_offloaded_model_gives_the_resident_logits_and_layers_and_refuses_what_needs_them_all() {
    use crate::DeviceMap;
    use lopper_core::Dtype;
    use std::sync::Arc;
    for shape in [ModelShape::tiny(), hetero_tied()] {
        let w = RandomWeights::new(&shape, 9);
        for dtype in [Dtype::F32, Dtype::Bf16] {
            let resident = Llama::<B>::from_weights_in(&shape, &w, &D, dtype).unwrap();
            let off = Llama::<B>::offloaded(
                &shape,
                Arc::new(w.clone()),
                &[D],
                &DeviceMap::single(&shape),
                dtype,
            )
            .unwrap();
            assert!(off.is_offloaded() && !resident.is_offloaded());
            assert!(
                off.layers
                    .iter()
                    .all(|l| l.self_attn.is_none() && l.mlp.is_none())
            );
            assert_eq!(logits(&resident, None), logits(&off, None), "{dtype}");
            let t = off.tokens(&rows()).unwrap();
            assert_eq!(
                resident.token_nll(t.clone(), None).unwrap().into_data(),
                off.token_nll(t.clone(), None).unwrap().into_data()
            );
            // Layers handed out one at a time, and replaced in the forward loop.
            for i in 0..shape.n_layers() {
                assert!(matches!(off.layer(i).unwrap(), std::borrow::Cow::Owned(_)));
                assert!(matches!(
                    resident.layer(i).unwrap(),
                    std::borrow::Cow::Borrowed(_)
                ));
            }
            assert!(off.layer(shape.n_layers()).is_err());
            fn without_mlp(_: usize, l: &DecoderLayer<B>) -> std::borrow::Cow<'_, DecoderLayer<B>> {
                let mut l = l.clone();
                l.mlp = None;
                l.post_attention_layernorm = None;
                std::borrow::Cow::Owned(l)
            }
            let replaced = |m: &Llama<B>| {
                m.forward_layers(t.clone(), None, |_, _| {}, without_mlp)
                    .unwrap()
                    .into_data()
            };
            assert_eq!(replaced(&resident), replaced(&off), "{dtype}");
            let e = off.placed_copy::<B>().unwrap_err().to_string();
            assert!(e.contains("offloaded") && e.contains("--offload"), "{e}");
        }
    }
}

#[test]
fn an_offloaded_model_checks_every_layer_before_any_work() {
    use crate::DeviceMap;
    use std::sync::Arc;
    let shape = ModelShape::tiny();
    let full = Llama::<B>::random(&shape, 1, &D).unwrap().to_host_weights();
    let mut missing = full.clone();
    missing
        .tensors
        .remove("model.layers.2.self_attn.v_proj.weight");
    let mut wrong = full;
    wrong.tensors.insert(
        "model.layers.1.mlp.down_proj.weight".into(),
        crate::HostTensor {
            shape: vec![32, 47],
            data: vec![0.0; 32 * 47],
        },
    );
    for (w, want) in [
        (missing, "model.layers.2.self_attn.v_proj.weight"),
        (wrong, "[32, 47]"),
    ] {
        let e = Llama::<B>::offloaded(
            &shape,
            Arc::new(w),
            &[D],
            &DeviceMap::single(&shape),
            lopper_core::Dtype::F32,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains(want), "{e}");
    }
}

#[test]
fn the_safetensors_file_written_tensor_by_tensor_holds_every_weight() {
    use lopper_core::Dtype;
    let model = Llama::<B>::random(&hetero_tied(), 4, &D).unwrap();
    let host = model.to_host_weights();
    let zero = vec![("model.layers.0.self_attn.q_proj.bias".to_string(), 7)];
    for dtype in [Dtype::F32, Dtype::Bf16, Dtype::F16] {
        let bytes = model.safetensors_bytes_in(dtype, &zero).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.len(), host.tensors.len() + 1, "{dtype}");
        for (name, t) in &host.tensors {
            let v = st.tensor(name).unwrap();
            assert_eq!(v.shape(), &t.shape[..], "{name}");
            let got: Vec<f32> = match v.dtype() {
                safetensors::Dtype::F32 => v
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
                safetensors::Dtype::BF16 => v
                    .data()
                    .chunks_exact(2)
                    .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                safetensors::Dtype::F16 => v
                    .data()
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                other => panic!("{name}: {other:?}"),
            };
            // Matrices in the asked type, vectors in F32.
            let want: Vec<f32> = match (t.shape.len(), dtype) {
                (2, Dtype::Bf16) => t
                    .data
                    .iter()
                    .map(|&x| half::bf16::from_f32(x).to_f32())
                    .collect(),
                (2, Dtype::F16) => t
                    .data
                    .iter()
                    .map(|&x| half::f16::from_f32(x).to_f32())
                    .collect(),
                _ => t.data.clone(),
            };
            assert_eq!(got, want, "{name} {dtype}");
        }
        let z = st.tensor(&zero[0].0).unwrap();
        assert_eq!(z.shape(), &[7]);
        assert!(z.data().iter().all(|&b| b == 0));
        // The same bytes as the host copy's file when nothing is added.
        assert_eq!(
            model.safetensors_bytes_in(dtype, &[]).unwrap(),
            host.safetensors_bytes_in(dtype).unwrap()
        );
    }
}

#[test]
fn the_gguf_file_written_tensor_by_tensor_equals_the_one_built_in_memory() {
    use crate::gguf::{GgmlType, llama_gguf_meta, llama_gguf_typed};
    // Heterogeneous layers (the `deci` layout) and one layer without its MLP (its zero
    // placeholder MLP is part of the metadata builder's own tensors).
    let mut shape = hetero_tied();
    shape.layers[1].ffn_hidden = 0;
    let model = Llama::<B>::random(&shape, 5, &D).unwrap();
    for ty in [GgmlType::F32, GgmlType::F16, GgmlType::Q8_0] {
        let mut whole = llama_gguf_typed(&shape, &model.to_host_weights(), ty);
        whole.meta("general.name", Value::Str("tiny".into()));
        let mut meta = llama_gguf_meta(&shape, ty);
        meta.meta("general.name", Value::Str("tiny".into()));
        let layout = model.gguf_layout(&meta, ty);
        let mut buf = vec![0xAAu8; layout.len() as usize];
        model
            .write_gguf(&layout, &mut |at, b| {
                buf[at as usize..at as usize + b.len()].copy_from_slice(b);
                Ok(())
            })
            .unwrap();
        // Byte for byte, except the padding between tensors, which the writer never touches
        // (a file sink pre-sizes the file with zeros, as the builder pads).
        let want = whole.to_bytes();
        assert_eq!(buf.len(), want.len(), "{ty:?}");
        let bad = buf
            .iter()
            .zip(&want)
            .position(|(a, b)| a != b && !(*a == 0xAA && *b == 0));
        assert_eq!(bad, None, "{ty:?}: the streamed file differs at this byte");
        // And it reads back as the model.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        std::fs::write(&p, want).unwrap();
        let f = GgufFile::open(&p).unwrap();
        assert_eq!(&shape_from_gguf(&f).unwrap(), &shape, "{ty:?}");
    }
    // A tensor the layout has no slot of the asked shape for is an error, not a torn file.
    let meta = llama_gguf_meta(&shape, GgmlType::F32);
    let other = Llama::<B>::random(&hetero_tied(), 5, &D).unwrap();
    let layout = other.gguf_layout(&meta, GgmlType::F32);
    let err = model
        .write_gguf(&layout, &mut |_, _| Ok(()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("slot")
            || err.contains("never written")
            || err.contains("not in the tensor table"),
        "{err}"
    );
}
