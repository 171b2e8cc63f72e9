//! Hugging Face directories and hub ids, tested with local files: the real default model is
//! written as a Hugging Face checkpoint (config.json + safetensors + tokenizer.json), read back
//! directly, as shards, and through a hub cache in offline mode.

mod common;

use std::path::Path;

use common::{B, DEVICE, default_model, golden, ids};
use lopper_model::{
    HostWeights, HubOptions, ModelFiles, ModelSpec, hf_config_json, load_files, resolve,
};

fn paragraph() -> Vec<Vec<u32>> {
    vec![
        ids(&golden()["tokenization"]["texts"]["paragraph"]["ids_canonical_digit_split"])[..48]
            .to_vec(),
    ]
}

fn logits(files: &ModelFiles) -> Vec<f32> {
    let m = load_files::<B>(files, "test", &DEVICE).unwrap();
    m.model
        .forward(m.model.tokens(&paragraph()).unwrap())
        .into_data()
        .to_vec()
        .unwrap()
}

fn write_common(dir: &Path) {
    let d = default_model();
    let shape = d.model.shape();
    let cfg = hf_config_json(shape, d.tokenizer.bos_id, d.tokenizer.eos_id).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&cfg).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("tokenizer.json"), d.tokenizer.to_json()).unwrap();
}

#[test]
fn hf_directory_single_sharded_and_hub_cache_load_the_same_model() {
    let d = default_model();
    let reference: Vec<f32> = d
        .model
        .forward(d.model.tokens(&paragraph()).unwrap())
        .into_data()
        .to_vec()
        .unwrap();
    let weights = d.model.to_host_weights();

    // Single file.
    let single = tempfile::tempdir().unwrap();
    write_common(single.path());
    weights
        .save_safetensors(&single.path().join("model.safetensors"))
        .unwrap();
    let files = resolve(
        &ModelSpec::Path(single.path().to_owned()),
        Path::new("/nonexistent-home"),
        &HubOptions::from_env(),
    )
    .unwrap();
    assert_eq!(files, ModelFiles::HfDir(single.path().to_owned()));
    assert_eq!(logits(&files), reference, "safetensors directory == GGUF");
    let loaded = load_files::<B>(&files, "dir", &DEVICE).unwrap();
    let text = golden()["tokenization"]["texts"]["mixed"]["text"]
        .as_str()
        .unwrap();
    assert_eq!(
        loaded.tokenizer.encode(text).unwrap(),
        d.tokenizer.encode(text).unwrap()
    );

    // Two shards with an index.
    let sharded = tempfile::tempdir().unwrap();
    write_common(sharded.path());
    let (mut a, mut b) = (HostWeights::default(), HostWeights::default());
    let mut map = serde_json::Map::new();
    for (i, (name, t)) in weights.tensors.iter().enumerate() {
        let (shard, file) = if i % 2 == 0 {
            (&mut a, "model-00001-of-00002.safetensors")
        } else {
            (&mut b, "model-00002-of-00002.safetensors")
        };
        shard.tensors.insert(name.clone(), t.clone());
        map.insert(name.clone(), file.into());
    }
    a.save_safetensors(&sharded.path().join("model-00001-of-00002.safetensors"))
        .unwrap();
    b.save_safetensors(&sharded.path().join("model-00002-of-00002.safetensors"))
        .unwrap();
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        sharded.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    assert_eq!(
        logits(&ModelFiles::HfDir(sharded.path().to_owned())),
        reference,
        "sharded == GGUF"
    );

    // A hub cache laid out as hf-hub writes it, read offline.
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--lopper-test--smollm2");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::fs::hard_link(single.path().join(f), snap.join(f)).unwrap();
    }
    let opts = HubOptions {
        cache_dir: cache.path().to_owned(),
        offline: true,
    };
    let spec: ModelSpec = "hub:lopper-test/smollm2".parse().unwrap();
    let files = resolve(&spec, Path::new("/nonexistent-home"), &opts).unwrap();
    assert_eq!(files, ModelFiles::HfDir(snap.clone()));
    assert_eq!(logits(&files), reference, "hub cache == GGUF");

    // Offline and not cached: a clear error that says how to pass a local path.
    let spec: ModelSpec = "hub:lopper-test/absent@v2".parse().unwrap();
    let e = resolve(&spec, Path::new("/nonexistent-home"), &opts)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("hub:lopper-test/absent@v2")
            && e.contains("--model PATH")
            && e.contains("offline"),
        "{e}"
    );
}

#[test]
fn broken_hf_directories_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    // No config.json at all.
    let e = resolve(
        &ModelSpec::Path(dir.path().to_owned()),
        Path::new("/x"),
        &HubOptions::from_env(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("without config.json"), "{e}");
    // A config, a tokenizer, and a truncated safetensors file.
    write_common(dir.path());
    std::fs::write(
        dir.path().join("model.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":",
    )
    .unwrap();
    let e = load_files::<B>(&ModelFiles::HfDir(dir.path().to_owned()), "broken", &DEVICE)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("truncated"),
        "{e}"
    );
    // A config with a missing key.
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"model_type": "llama", "hidden_size": 576}"#,
    )
    .unwrap();
    let e = load_files::<B>(&ModelFiles::HfDir(dir.path().to_owned()), "broken", &DEVICE)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("config.json") && e.contains("num_hidden_layers"),
        "{e}"
    );
}
