//! Scratch: OBS scores and their global-params plans.
#![allow(clippy::print_stdout)]

use anyhow::Result;
use lopper::backend::{Flex, FlexDevice};
use lopper::data::{DataDirs, Sampler, load_documents, sample};
use lopper::model::{ModelSpec, load, lopper_home};

fn main() -> Result<()> {
    let spec: ModelSpec = "default".parse()?;
    let out = std::path::PathBuf::from(std::env::args().nth(1).unwrap_or("runs/exp/obs".into()));
    std::fs::create_dir_all(&out)?;
    let loaded = load::<Flex>(&spec, &FlexDevice)?;
    let (model, tok) = (&loaded.model, &loaded.tokenizer);
    let dirs = DataDirs::from_env(&lopper_home());
    let (path, docs) = load_documents("c4", &dirs)?;
    let encode = |t: &str| tok.encode(t).map_err(|e| e.to_string());
    let calib = sample(
        "c4",
        &path,
        &docs,
        &encode,
        Sampler::ConcatChunks,
        64,
        512,
        42,
    )?;
    let t = std::time::Instant::now();
    let scores = lopper::sparse::obs_scores(model, &calib.windows, 4, 0.01, |l, n| {
        println!("layer {l}/{n} {:.1}s", t.elapsed().as_secs_f64())
    })?;
    std::fs::write(out.join("scores.json"), serde_json::to_string(&scores)?)?;
    for keep in [0.8, 0.7, 0.5] {
        let plan = scores.plan(model.shape(), keep, lopper::core::Allocation::GlobalParams)?;
        let desc: Vec<String> = plan
            .layers
            .iter()
            .map(|l| format!("{}/{}", l.kv_groups.len(), l.channels.len()))
            .collect();
        println!("keep {keep}: {}", desc.join(" "));
        std::fs::write(
            out.join(format!("plan{}.json", (keep * 100.0) as u32)),
            serde_json::to_string_pretty(&plan)?,
        )?;
    }
    Ok(())
}
