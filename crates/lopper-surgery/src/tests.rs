use std::path::Path;

use burn::tensor::Tensor;
use burn_flex::Flex;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::export::{FileSink, config_json, export_with};
use crate::*;
use lopper_core::{LayerPlan, MaskPlan, ModelShape, PruneUnit};
use lopper_model::{Llama, Masks, ModelFiles, Tokenizer, load_files, shape_from_hf_config};

type B = Flex;
const D: burn_flex::FlexDevice = burn_flex::FlexDevice;

fn tiny() -> Llama<B> {
    Llama::random(&ModelShape::tiny(), 7, &D).unwrap()
}

/// A word-level tokenizer over the tiny model's 128 ids (`t0` .. `t127`).
fn tiny_tokenizer() -> Tokenizer {
    Tokenizer::word_level(128)
}

/// A byte-level BPE tokenizer over 128 ids: printable ASCII as itself, id 0 = the merge "ab",
/// the other ids placeholders.
fn bpe_tokenizer() -> Tokenizer {
    let vocab: serde_json::Map<String, serde_json::Value> = (0..128u32)
        .map(|i| {
            let t = match i {
                0 => "ab".to_string(),
                33..=126 => char::from_u32(i).unwrap().to_string(),
                _ => format!("<p{i}>"),
            };
            (t, i.into())
        })
        .collect();
    let bl = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 1, "content": "<p1>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null, "pre_tokenizer": bl, "post_processor": null, "decoder": bl,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": [["a", "b"]]}
    });
    Tokenizer::from_json(json.to_string(), "tiny bpe").unwrap()
}

fn tokens(model: &Llama<B>) -> Tensor<B, 2, burn::tensor::Int> {
    let rows: Vec<Vec<u32>> = (0..2)
        .map(|r| {
            (0..13)
                .map(|t| ((t * 31 + r * 17 + 5) % 128) as u32)
                .collect()
        })
        .collect();
    model.tokens(&rows).unwrap()
}

fn values(t: Tensor<B, 3>) -> Vec<f32> {
    t.into_data().to_vec().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A random plan: each KV group and channel kept with probability `keep`; sometimes a whole
/// block or layer goes.
fn random_plan(shape: &ModelShape, keep: f64, rng: &mut ChaCha8Rng) -> MaskPlan {
    loop {
        let layers = shape
            .layers
            .iter()
            .map(|l| {
                let mut kv: Vec<usize> = (0..l.n_kv_heads)
                    .filter(|_| rng.random_bool(keep))
                    .collect();
                let mut ch: Vec<usize> = (0..l.ffn_hidden)
                    .filter(|_| rng.random_bool(keep))
                    .collect();
                match rng.random_range(0..8) {
                    0 => kv.clear(),
                    1 => ch.clear(),
                    2 => {
                        kv.clear();
                        ch.clear();
                    }
                    _ => {}
                }
                LayerPlan {
                    kv_groups: kv,
                    channels: ch,
                }
            })
            .collect();
        let plan = MaskPlan {
            layers,
            ..MaskPlan::keep_all(shape)
        };
        if plan.validate().is_ok() {
            return plan;
        }
    }
}

#[test]
fn surgery_equals_the_masked_model_on_many_random_plans() {
    let model = tiny();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for case in 0..40 {
        let keep = [0.3, 0.5, 0.8][case % 3];
        let plan = random_plan(model.shape(), keep, &mut rng);
        let masks = Masks::from_plan(&plan, &D).unwrap();
        let masked = values(model.forward_masked(tokens(&model), Some(&masks)).unwrap());
        let pruned = prune(&model, &plan).unwrap();
        let physical = values(pruned.forward(tokens(&model)));
        let d = max_diff(&masked, &physical);
        assert!(d < 1e-4, "case {case}: surgery differs from masking by {d}");
        // Layer-at-a-time slicing is the same computation.
        let kept = values(forward_kept(&model, &plan, tokens(&model)).unwrap());
        assert!(max_diff(&kept, &physical) < 1e-5, "case {case}");
        // The parameter count is the shape's.
        let n: u64 = pruned
            .to_host_weights()
            .tensors
            .values()
            .map(|t| t.data.len() as u64)
            .sum();
        assert_eq!(n, pruned.shape().num_params(), "case {case}");
        assert_eq!(pruned.shape(), &plan.pruned_shape());
        assert_eq!(pruned.layers.len(), plan.kept_layers().len());
    }
}

#[test]
fn surgery_of_an_all_keep_plan_is_the_identity() {
    let model = tiny();
    let pruned = prune(&model, &MaskPlan::keep_all(model.shape())).unwrap();
    assert_eq!(pruned.to_host_weights(), model.to_host_weights());
    assert_eq!(
        values(pruned.forward(tokens(&model))),
        values(model.forward(tokens(&model)))
    );
}

#[test]
fn a_layer_may_lose_a_whole_block() {
    let model = tiny();
    let plan = MaskPlan::from_removed(
        model.shape(),
        &[
            PruneUnit::AttnBlock { layer: 0 },
            PruneUnit::MlpBlock { layer: 2 },
            PruneUnit::Layer { layer: 1 },
        ],
    )
    .unwrap();
    let pruned = prune(&model, &plan).unwrap();
    assert_eq!(pruned.layers.len(), 2);
    assert!(pruned.layers[0].self_attn.is_none() && pruned.layers[0].input_layernorm.is_none());
    assert!(pruned.layers[1].mlp.is_none() && pruned.layers[1].self_attn.is_some());
    let masked = values(
        model
            .forward_masked(tokens(&model), Some(&Masks::from_plan(&plan, &D).unwrap()))
            .unwrap(),
    );
    assert!(max_diff(&masked, &values(pruned.forward(tokens(&model)))) < 1e-4);
}

#[test]
fn a_plan_for_another_model_is_refused() {
    let model = tiny();
    let mut other = ModelShape::tiny();
    other.layers[1].ffn_hidden = 40;
    let err = prune(&model, &MaskPlan::keep_all(&other))
        .unwrap_err()
        .to_string();
    assert!(err.contains("another model"), "{err}");
}

fn opts(force: bool) -> ExportOptions {
    ExportOptions {
        format: ExportFormat::Hf,
        force,
        provenance: serde_json::json!({"method": "test"}),
    }
}

fn reload(dir: &Path) -> Llama<B> {
    load_files::<B>(&ModelFiles::HfDir(dir.to_owned()), "test", &D)
        .unwrap()
        .model
}

#[test]
fn export_round_trips_heterogeneous_and_uniform_models() {
    let model = tiny();
    let tok = tiny_tokenizer();
    let root = tempfile::tempdir().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    // Heterogeneous: shape.json carries the exact layers; config.json lists them per layer.
    let plan = random_plan(model.shape(), 0.6, &mut rng);
    let pruned = prune(&model, &plan).unwrap();
    let out = root.path().join("het");
    export(&pruned, &tok, Some(&plan), &opts(false), &out).unwrap();
    let back = reload(&out);
    assert_eq!(back.shape(), pruned.shape());
    assert_eq!(
        values(back.forward(tokens(&model))),
        values(pruned.forward(tokens(&model)))
    );
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("lopper.json")).unwrap()).unwrap();
    assert_eq!(
        MaskPlan::from_json(&record["plan"].to_string()).unwrap(),
        plan
    );
    assert_eq!(record["provenance"]["method"], "test");
    // Uniform with a dropped layer: a stock config.json, layers renumbered.
    let plan = MaskPlan::from_removed(
        model.shape(),
        &[
            PruneUnit::Layer { layer: 1 },
            PruneUnit::KvGroup { layer: 0, group: 1 },
            PruneUnit::KvGroup { layer: 2, group: 0 },
        ],
    )
    .unwrap();
    let mut plan = plan;
    plan.layers[0].channels.truncate(40);
    plan.layers[2].channels.truncate(40);
    assert!(plan.is_uniform());
    let pruned = prune(&model, &plan).unwrap();
    let out = root.path().join("uni");
    export(&pruned, &tok, Some(&plan), &opts(false), &out).unwrap();
    std::fs::remove_file(out.join("shape.json")).unwrap();
    assert_eq!(
        &shape_from_hf_config(&out.join("config.json")).unwrap(),
        pruned.shape()
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert!(cfg.get("lopper_layer_config").is_none() && cfg.get("auto_map").is_none());
    assert_eq!(cfg["model_type"], "llama");
    assert!(!out.join(crate::export::MODELING_FILE).exists());
    assert_eq!(cfg["num_hidden_layers"], 2);
    assert_eq!(
        values(reload(&out).forward(tokens(&model))),
        values(pruned.forward(tokens(&model)))
    );
}

#[test]
fn heterogeneous_config_lists_every_layer() {
    let model = tiny();
    let plan = MaskPlan::from_removed(model.shape(), &[PruneUnit::AttnBlock { layer: 1 }]).unwrap();
    let cfg = config_json(&plan.pruned_shape(), &tiny_tokenizer());
    let per = cfg["lopper_layer_config"].as_array().unwrap();
    assert_eq!(per.len(), 3);
    assert_eq!(per[1]["num_attention_heads"], 0);
    assert_eq!(per[1]["intermediate_size"], 48);
    // transformers loads it through the shipped modelling file (trust_remote_code).
    assert_eq!(cfg["model_type"], "lopper_llama");
    assert_eq!(cfg["architectures"][0], "LopperLlamaForCausalLM");
    assert_eq!(
        cfg["auto_map"]["AutoModelForCausalLM"],
        "modeling_lopper.LopperLlamaForCausalLM"
    );
    // lopper reads the per-layer sizes back without shape.json, also under the key that
    // earlier exports used.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("config.json");
    std::fs::write(&p, cfg.to_string()).unwrap();
    assert_eq!(shape_from_hf_config(&p).unwrap(), plan.pruned_shape());
    let mut old = cfg.clone();
    old["per_layer_config"] = old["lopper_layer_config"].take();
    old.as_object_mut().unwrap().remove("lopper_layer_config");
    old["model_type"] = "llama".into();
    std::fs::write(&p, old.to_string()).unwrap();
    assert_eq!(shape_from_hf_config(&p).unwrap(), plan.pruned_shape());
    // The export ships the modelling file that auto_map names, and lopper loads it back.
    let model_dir = dir.path().join("m");
    let pruned = prune(&model, &plan).unwrap();
    export(
        &pruned,
        &tiny_tokenizer(),
        Some(&plan),
        &opts(false),
        &model_dir,
    )
    .unwrap();
    let source = std::fs::read_to_string(model_dir.join(crate::export::MODELING_FILE)).unwrap();
    for class in ["LopperLlamaConfig", "LopperLlamaForCausalLM"] {
        assert!(source.contains(&format!("class {class}(")), "{class}");
    }
    assert_eq!(
        values(reload(&model_dir).forward(tokens(&model))),
        values(pruned.forward(tokens(&model)))
    );
}

#[test]
fn vllm_exports_describe_every_layer_as_decilm_blocks_or_are_refused() {
    let model = tiny();
    // Layer 0 without attention, layer 2 without MLP, layer 1 with fewer channels: fits.
    let mut plan = MaskPlan::from_removed(
        model.shape(),
        &[
            PruneUnit::AttnBlock { layer: 0 },
            PruneUnit::MlpBlock { layer: 2 },
        ],
    )
    .unwrap();
    plan.layers[1].channels.truncate(20);
    let shape = plan.pruned_shape();
    let cfg = crate::deci_config_json(&shape, &tiny_tokenizer()).unwrap();
    assert_eq!(cfg["model_type"], "nemotron-nas");
    assert_eq!(cfg["architectures"][0], "DeciLMForCausalLM");
    assert_eq!(cfg["num_attention_heads"], 4);
    let blocks = cfg["block_configs"].as_array().unwrap();
    assert_eq!(blocks.len(), 3);
    assert_eq!(blocks[0]["attention"]["no_op"], true);
    assert_eq!(blocks[1]["attention"]["n_heads_in_group"], 2);
    assert_eq!(blocks[1]["ffn"]["intermediate_size"], 20);
    assert_eq!(blocks[2]["ffn"]["no_op"], true);
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("vllm");
    let pruned = prune(&model, &plan).unwrap();
    let o = ExportOptions {
        format: ExportFormat::Vllm,
        ..opts(false)
    };
    export(&pruned, &tiny_tokenizer(), Some(&plan), &o, &out).unwrap();
    assert!(out.join(crate::export::DECI_CONFIG_FILE).is_file());
    assert!(!out.join(crate::export::MODELING_FILE).exists());
    assert_eq!(
        values(reload(&out).forward(tokens(&model))),
        values(pruned.forward(tokens(&model)))
    );
    // A key/value group removed in one layer only: DeciLM keeps every layer's query heads.
    let plan = MaskPlan::from_removed(model.shape(), &[PruneUnit::KvGroup { layer: 1, group: 0 }])
        .unwrap();
    let err = crate::deci_config_json(&plan.pruned_shape(), &tiny_tokenizer()).unwrap_err();
    assert!(
        err.to_string().contains("layer 1 2") && err.to_string().contains("--format hf"),
        "{err}"
    );
    let out = root.path().join("refused");
    let pruned = prune(&model, &plan).unwrap();
    assert!(export(&pruned, &tiny_tokenizer(), Some(&plan), &o, &out).is_err());
    assert!(!out.exists());
}

#[test]
fn an_existing_output_is_refused_unless_forced() {
    let model = tiny();
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("m");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "x").unwrap();
    let err = export(&model, &tiny_tokenizer(), None, &opts(false), &out).unwrap_err();
    assert!(err.to_string().contains("--force"), "{err}");
    assert!(out.join("keep.txt").exists());
    export(&model, &tiny_tokenizer(), None, &opts(true), &out).unwrap();
    assert!(!out.join("keep.txt").exists() && out.join("model.safetensors").exists());
    // Nothing temporary is left beside it.
    let names: Vec<_> = std::fs::read_dir(root.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("m")]);
}

/// A disk that fills up halfway through the file after `ok` whole files.
struct FullDisk {
    ok: usize,
}

impl FileSink for FullDisk {
    fn write(
        &mut self,
        path: &Path,
        len: u64,
        fill: crate::export::Fill<'_>,
    ) -> std::io::Result<()> {
        let full = self.ok == 0;
        self.ok = self.ok.saturating_sub(1);
        let mut bytes = vec![0u8; len as usize];
        fill(&mut |at, b| {
            let end = at as usize + b.len();
            if full && end > bytes.len() / 2 {
                // Leave a truncated file behind, as a real full disk would.
                std::fs::write(path, &bytes[..at as usize])?;
                return Err(std::io::Error::new(
                    std::io::ErrorKind::StorageFull,
                    "No space left on device",
                ));
            }
            bytes[at as usize..end].copy_from_slice(b);
            Ok(())
        })?;
        std::fs::write(path, bytes)
    }
}

#[test]
fn a_full_disk_mid_write_leaves_nothing_under_the_final_name() {
    let model = tiny();
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("m");
    for ok in 0..4 {
        let err = export_with(
            &model,
            &tiny_tokenizer(),
            None,
            &opts(false),
            &out,
            &mut FullDisk { ok },
        )
        .unwrap_err();
        assert!(err.to_string().contains("No space left"), "{err}");
        assert!(!out.exists());
        assert_eq!(
            std::fs::read_dir(root.path()).unwrap().count(),
            0,
            "temporary folder left behind"
        );
    }
}

/// `m` with a random bias on every projection (as least-squares reconstruction leaves them).
fn with_biases(mut m: Llama<B>, rng: &mut ChaCha8Rng) -> Llama<B> {
    for layer in &mut m.layers {
        let mut lins: Vec<&mut burn::nn::Linear<B>> = Vec::new();
        if let Some(a) = &mut layer.self_attn {
            lins.extend([&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj]);
        }
        if let Some(f) = &mut layer.mlp {
            lins.extend([&mut f.gate_proj, &mut f.up_proj, &mut f.down_proj]);
        }
        for l in lins {
            let out = l.weight.dims()[1];
            let b: Vec<f32> = (0..out).map(|_| rng.random_range(-0.5..0.5)).collect();
            l.bias = Some(burn::module::Param::from_tensor(Tensor::from_data(
                burn::tensor::TensorData::new(b, [out]),
                &D,
            )));
        }
    }
    m
}

#[test]
fn gguf_export_round_trips_at_every_tensor_type() {
    let model = tiny();
    let root = tempfile::tempdir().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let plan = random_plan(model.shape(), 0.7, &mut rng);
    // Biases on every projection travel too (q and k biases in llama.cpp's RoPE row order).
    let pruned = with_biases(prune(&model, &plan).unwrap(), &mut rng);
    let want = values(pruned.forward(tokens(&model)));
    for (ty, tol) in [
        (lopper_model::gguf::GgmlType::F32, 0.0),
        (lopper_model::gguf::GgmlType::F16, 2e-2),
        (lopper_model::gguf::GgmlType::Q8_0, 1e-1),
    ] {
        let out = root.path().join(format!("{ty:?}"));
        let o = ExportOptions {
            format: ExportFormat::Gguf(ty),
            force: false,
            provenance: serde_json::Value::Null,
        };
        export(&pruned, &bpe_tokenizer(), Some(&plan), &o, &out).unwrap();
        // A lopper GGUF folder loads by its path.
        let spec: lopper_model::ModelSpec = out.to_str().unwrap().parse().unwrap();
        let files =
            lopper_model::resolve(&spec, root.path(), &lopper_model::HubOptions::from_env())
                .unwrap();
        let back = load_files::<B>(&files, "test", &D).unwrap();
        assert_eq!(back.model.shape(), pruned.shape());
        let got = values(back.model.forward(tokens(&model)));
        let d = max_diff(&got, &want);
        assert!(d <= tol, "{ty:?}: {d}");
        assert_eq!(
            back.tokenizer.encode("abxyz<p1>").unwrap(),
            vec![0, 120, 121, 122, 1]
        );
        assert_eq!(
            bpe_tokenizer().encode("abxyz<p1>").unwrap(),
            vec![0, 120, 121, 122, 1]
        );
    }
}

#[test]
fn bias_compensation_keeps_each_projection_output_mean_on_the_calibration_set() {
    let model = tiny();
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let plan = loop {
        let p = random_plan(model.shape(), 0.6, &mut rng);
        if p.layers
            .iter()
            .all(|l| !l.kv_groups.is_empty() && !l.channels.is_empty())
        {
            break p;
        }
    };
    // Calibration inputs of every o_proj / down_proj in the dense model.
    let t = tokens(&model);
    let mut taps: Vec<(usize, lopper_model::Tap, Vec<f32>, usize)> = Vec::new();
    model
        .forward_tapped(t, None, |i, p, x| {
            if matches!(
                p,
                lopper_model::Tap::OProjInput | lopper_model::Tap::DownProjInput
            ) {
                let [_, w] = x.dims();
                taps.push((i, p, x.clone().into_data().to_vec().unwrap(), w));
            }
        })
        .unwrap();
    let n_layers = model.shape().n_layers();
    let mut means = InputMeans {
        o_proj: vec![vec![]; n_layers],
        down_proj: vec![vec![]; n_layers],
    };
    for (i, p, x, w) in &taps {
        let rows = x.len() / w;
        let m: Vec<f64> = (0..*w)
            .map(|c| (0..rows).map(|r| x[r * w + c] as f64).sum::<f64>() / rows as f64)
            .collect();
        match p {
            lopper_model::Tap::OProjInput => means.o_proj[*i] = m,
            lopper_model::Tap::DownProjInput => means.down_proj[*i] = m,
            _ => {}
        }
    }
    let pruned = prune_compensated(&model, &plan, &means).unwrap();
    // For each layer: mean over tokens of the dense projection output equals the mean of the
    // pruned projection (kept inputs) plus its bias, on the same calibration inputs.
    let out_mean = |lin: &burn::nn::Linear<B>, x: &[f32], w: usize, cols: &[usize]| -> Vec<f64> {
        let rows = x.len() / w;
        let xs: Vec<f32> = (0..rows)
            .flat_map(|r| cols.iter().map(move |&c| x[r * w + c]))
            .collect();
        let xt =
            Tensor::<B, 2>::from_data(burn::tensor::TensorData::new(xs, [rows, cols.len()]), &D);
        let y: Vec<f32> = lin.forward(xt).mean_dim(0).into_data().to_vec().unwrap();
        y.into_iter().map(f64::from).collect()
    };
    for (i, p, x, w) in &taps {
        let (lp, ls) = (&plan.layers[*i], &plan.source.layers[*i]);
        let (dense_lin, small_lin, kept) = match p {
            lopper_model::Tap::OProjInput => {
                let kept: Vec<usize> = lp
                    .kv_groups
                    .iter()
                    .flat_map(|&g| g * ls.n_rep() * 8..(g + 1) * ls.n_rep() * 8)
                    .collect();
                (
                    &model.layers[*i].self_attn.as_ref().unwrap().o_proj,
                    &pruned.layers[*i].self_attn.as_ref().unwrap().o_proj,
                    kept,
                )
            }
            lopper_model::Tap::DownProjInput => (
                &model.layers[*i].mlp.as_ref().unwrap().down_proj,
                &pruned.layers[*i].mlp.as_ref().unwrap().down_proj,
                lp.channels.clone(),
            ),
            _ => continue,
        };
        let all: Vec<usize> = (0..*w).collect();
        let dense = out_mean(dense_lin, x, *w, &all);
        let small = out_mean(small_lin, x, *w, &kept);
        let d = dense
            .iter()
            .zip(&small)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(d < 1e-5, "layer {i} {p:?}: output means differ by {d}");
        assert!(small_lin.bias.is_some());
    }
    // The compensated model round-trips through the HF export (biases included).
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("c");
    export(&pruned, &tiny_tokenizer(), Some(&plan), &opts(false), &out).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["attention_bias"], true);
    assert_eq!(
        values(reload(&out).forward(tokens(&model))),
        values(pruned.forward(tokens(&model)))
    );
}

#[test]
fn parts_that_do_not_fit_the_shape_are_refused() {
    let model = tiny();
    let plan = MaskPlan::from_removed(model.shape(), &[PruneUnit::KvGroup { layer: 0, group: 1 }])
        .unwrap();
    // The dense layers under the pruned shape: layer 0's q_proj is too wide.
    let e = Llama::from_parts(
        model.embed_tokens.clone(),
        model.layers.clone(),
        model.norm.clone(),
        model.lm_head.clone(),
        plan.pruned_shape(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("model.layers.0") || e.contains("layer 0"), "{e}");
    // A missing block.
    let mut layers = model.layers.clone();
    layers[2].mlp = None;
    let e = Llama::from_parts(
        model.embed_tokens.clone(),
        layers,
        model.norm.clone(),
        model.lm_head.clone(),
        model.shape().clone(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("layer 2"), "{e}");
}

fn some_means(shape: &ModelShape) -> InputMeans {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut v = |n: usize| {
        (0..n)
            .map(|_| rng.random::<f64>() - 0.5)
            .collect::<Vec<f64>>()
    };
    InputMeans {
        o_proj: shape
            .layers
            .iter()
            .map(|s| v(s.n_heads * s.head_dim))
            .collect(),
        down_proj: shape.layers.iter().map(|s| v(s.ffn_hidden)).collect(),
    }
}

#[test]
fn the_search_scores_the_compensated_model_it_ships() {
    let model = tiny();
    let mut removed = vec![
        PruneUnit::Layer { layer: 1 },
        PruneUnit::KvGroup { layer: 0, group: 1 },
    ];
    removed.extend((0..48).map(|index| PruneUnit::Channel { layer: 2, index }));
    removed.extend((0..10).map(|index| PruneUnit::Channel {
        layer: 0,
        index: index * 3,
    }));
    let plan = MaskPlan::from_removed(model.shape(), &removed).unwrap();
    let means = some_means(model.shape());
    let t = tokens(&model);
    let searched = mean_loss_kept(&model, &plan, Some(&means), t.clone()).unwrap();
    let shipped = prune_compensated(&model, &plan, &means).unwrap();
    let exported = lopper_model::mean_of(shipped.token_nll(t.clone(), None).unwrap()).unwrap();
    assert!(
        (searched - exported).abs() < 1e-5,
        "{searched} vs {exported}"
    );
    // Compensation changes the loss (the biases are really there).
    let plain = mean_loss_kept(&model, &plan, None, t).unwrap();
    assert!((plain - searched).abs() > 1e-4, "{plain} vs {searched}");
}

#[test]
fn a_block_removed_whole_carries_its_mean_output_to_the_previous_kept_projection() {
    let model = tiny();
    let plan = MaskPlan::from_removed(model.shape(), &[PruneUnit::Layer { layer: 2 }]).unwrap();
    let means = some_means(model.shape());
    let extra = compensation_biases(&model, &plan, &means).unwrap();
    assert!(extra[0].o_proj.is_none() && extra[0].down_proj.is_none());
    assert!(extra[1].o_proj.is_none() && extra[2].down_proj.is_none());
    // W^T m over all inputs, burn layout [in, out].
    let mean_out = |lin: &burn::nn::Linear<B>, m: &[f64]| -> Vec<f64> {
        let [n_in, n_out] = lin.weight.dims();
        let w: Vec<f32> = lin.weight.val().into_data().to_vec().unwrap();
        (0..n_out)
            .map(|o| (0..n_in).map(|j| m[j] * w[j * n_out + o] as f64).sum())
            .collect()
    };
    let l2 = &model.layers[2];
    let a = mean_out(&l2.self_attn.as_ref().unwrap().o_proj, &means.o_proj[2]);
    let d = mean_out(&l2.mlp.as_ref().unwrap().down_proj, &means.down_proj[2]);
    let got: Vec<f32> = extra[1]
        .down_proj
        .clone()
        .expect("layer 1's down_proj carries layer 2")
        .into_data()
        .to_vec()
        .unwrap();
    for ((g, a), d) in got.iter().zip(&a).zip(&d) {
        assert!((*g as f64 - (a + d)).abs() < 1e-4, "{g} vs {}", a + d);
    }
    // Layer 0 removed: nothing before it to carry into, so nothing is added anywhere.
    let plan = MaskPlan::from_removed(model.shape(), &[PruneUnit::Layer { layer: 0 }]).unwrap();
    let extra = compensation_biases(&model, &plan, &means).unwrap();
    assert!(
        extra
            .iter()
            .all(|e| e.o_proj.is_none() && e.down_proj.is_none())
    );
}

/// Calibration windows of the tiny model: `n` rows of 13 tokens.
fn calib_windows(n: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| (0..13).map(|_| rng.random_range(0..128u32)).collect())
        .collect()
}

#[test]
fn checked_compensation_is_never_above_flaps_rule_or_none_on_its_windows() {
    let model = tiny();
    let windows = calib_windows(5, 4);
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let mut dropped_some = false;
    for scale in [1.0, 40.0] {
        for _ in 0..3 {
            let plan = random_plan(model.shape(), 0.6, &mut rng);
            let mut means = some_means(model.shape());
            // Large means make some compensations harmful, so that dropping is exercised.
            for v in means.o_proj.iter_mut().chain(means.down_proj.iter_mut()) {
                v.iter_mut().for_each(|x| *x *= scale);
            }
            let mut seen = 0;
            let (extra, sel) =
                select_compensation(&model, &plan, &means, &windows, 2, |_| seen += 1).unwrap();
            assert_eq!(seen, sel.blocks.len());
            // The losses it reports are the cut models' own losses.
            let all = windows_loss_kept(&model, &plan, Some(&means), &windows, 2).unwrap();
            let none = windows_loss_kept(&model, &plan, None, &windows, 2).unwrap();
            assert!(
                (sel.loss_all - all).abs() < 1e-5,
                "{} vs {all}",
                sel.loss_all
            );
            assert!(
                (sel.loss_none - none).abs() < 1e-5,
                "{} vs {none}",
                sel.loss_none
            );
            let built = prune_with_biases(&model, &plan, &extra).unwrap();
            let mut sum = 0.0;
            for b in windows.chunks(2) {
                let nll = built.token_nll(model.tokens(b).unwrap(), None).unwrap();
                sum += lopper_model::mean_of(nll).unwrap() * b.len() as f64;
            }
            let got = sum / windows.len() as f64;
            assert!(
                (got - sel.loss_chosen).abs() < 1e-5,
                "{got} vs {}",
                sel.loss_chosen
            );
            assert!(sel.loss_chosen <= all.min(none) + 1e-9, "{sel:?}");
            // What is reported kept is what is returned.
            for c in &sel.blocks {
                let slot = match c.name {
                    "o_proj" => &extra[c.layer].o_proj,
                    _ => &extra[c.layer].down_proj,
                };
                assert_eq!(slot.is_some(), c.kept, "{c:?}");
            }
            dropped_some |= sel.blocks.iter().any(|c| !c.kept);
            assert!(
                !sel.blocks.is_empty(),
                "a cut plan has compensations to check"
            );
        }
    }
    assert!(dropped_some, "no compensation was ever dropped");
}

#[test]
fn checked_compensation_of_a_keep_all_plan_is_nothing() {
    let model = tiny();
    let plan = MaskPlan::keep_all(model.shape());
    let (extra, sel) = select_compensation(
        &model,
        &plan,
        &some_means(model.shape()),
        &calib_windows(2, 1),
        2,
        |_| {},
    )
    .unwrap();
    assert!(sel.blocks.is_empty());
    assert!(
        extra
            .iter()
            .all(|b| b.o_proj.is_none() && b.down_proj.is_none())
    );
    assert_eq!(sel.loss_all, sel.loss_none);
    let e = select_compensation(&model, &plan, &some_means(model.shape()), &[], 2, |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("calibration window"), "{e}");
}

#[test]
fn a_compensation_gain_within_the_windows_noise_is_not_taken() {
    let without = [4.0, 4.1, 3.9, 4.2, 4.0, 4.05, 3.95, 4.1];
    // A small gain on every window: kept.
    let steady: Vec<f64> = without.iter().map(|x| x - 0.01).collect();
    assert!(crate::significant_gain(&steady, &without).0);
    // A larger mean gain from one window, small losses on the others: a greedy rule by the
    // mean takes it, the paired test does not.
    let mut lucky: Vec<f64> = without.iter().map(|x| x + 0.005).collect();
    lucky[3] -= 0.4;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    assert!(mean(&lucky) < mean(&without));
    let (kept, se) = crate::significant_gain(&lucky, &without);
    assert!(!kept && se > 0.0, "{se}");
    // A loss is never a gain, and one window has no spread: any gain counts.
    assert!(!crate::significant_gain(&without, &steady).0);
    assert!(crate::significant_gain(&[1.0], &[1.1]).0);
    assert!(!crate::significant_gain(&[1.0], &[1.0]).0);
}
