//! Tokenizers: from a `tokenizer.json`, or rebuilt from a GGUF file's vocabulary and merges.

use std::path::Path;

use serde_json::{Value as Json, json};

use crate::error::{Error, Result};
use crate::gguf::{GgufFile, Value};

/// A text tokenizer with the model's special ids. Encoding never adds special tokens: the
/// BOS policy is the caller's, explicit choice.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    json: String,
    /// Beginning-of-sequence id, if the model has one.
    pub bos_id: Option<u32>,
    /// End-of-sequence id, if the model has one.
    pub eos_id: Option<u32>,
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let json = std::fs::read_to_string(path).map_err(crate::error::io_err(path))?;
        Self::from_json(json, &path.display().to_string())
    }

    /// A word-level tokenizer over `t0` .. `t{n-1}` (whitespace-split; unknown words are `t0`):
    /// the tokenizer of synthetic models such as [`lopper_core::ModelShape::tiny`].
    pub fn word_level(n: usize) -> Self {
        let vocab: serde_json::Map<String, Json> =
            (0..n).map(|i| (format!("t{i}"), json!(i))).collect();
        let doc = json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
            "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}
        });
        Self::from_json(doc.to_string(), "word-level tokenizer")
            .expect("a valid word-level tokenizer")
    }

    /// A byte-level tokenizer: each UTF-8 byte of the text is one token, ids 0-255 (GPT-2's
    /// byte-to-character table, no merges); the tokenizer of synthetic models, whose
    /// vocabularies all have at least 256 entries.
    pub fn byte_level() -> Self {
        // GPT-2's table: printable bytes stand for themselves, the others for 256 + n.
        let mut n = 0;
        let vocab: serde_json::Map<String, Json> = (0u32..256)
            .map(|b| {
                let printable = matches!(b, 33..=126 | 161..=172 | 174..=255);
                let c = if printable {
                    char::from_u32(b)
                } else {
                    n += 1;
                    char::from_u32(255 + n)
                };
                (c.expect("a valid char").to_string(), json!(b))
            })
            .collect();
        let doc = json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
            "model": {"type": "BPE", "vocab": vocab, "merges": [], "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
                      "byte_fallback": false, "ignore_merges": false}
        });
        Self::from_json(doc.to_string(), "byte-level tokenizer")
            .expect("a valid byte-level tokenizer")
    }

    /// Parses a `tokenizer.json` held in memory; `what` names it in errors.
    pub fn from_json(json: String, what: &str) -> Result<Self> {
        let inner: tokenizers::Tokenizer = json.parse().map_err(|e| Error::Tokenizer {
            what: what.into(),
            msg: format!("cannot parse: {e}"),
        })?;
        let id = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
        let bos_id = id(&["<|im_start|>", "<s>", "<|begin_of_text|>", "<|endoftext|>"]);
        let eos_id = id(&["<|im_end|>", "</s>", "<|end_of_text|>", "<|endoftext|>"]);
        Ok(Self {
            inner,
            json,
            bos_id,
            eos_id,
        })
    }

    /// The `tokenizer.ggml.*` GGUF metadata of this tokenizer (byte-level BPE only), as
    /// llama.cpp reads it: tokens by id, token types (1 normal, 3 control, 4 user-defined),
    /// merges, BOS/EOS ids, and the pre-tokenizer (`smollm` when digits are split first).
    pub fn gguf_metadata(&self) -> Result<Vec<(String, crate::gguf::Value)>> {
        use crate::gguf::Value as V;
        let err = |msg: String| Error::Tokenizer {
            what: "GGUF export".into(),
            msg,
        };
        let doc: Json = serde_json::from_str(&self.json).map_err(|e| err(e.to_string()))?;
        let model = &doc["model"];
        if model["type"] != "BPE" {
            return Err(err(format!(
                "only byte-level BPE tokenizers can be written to GGUF, this one is {}",
                model["type"]
            )));
        }
        let mut tokens: Vec<Option<String>> = Vec::new();
        let mut put = |id: usize, t: &str| {
            if tokens.len() <= id {
                tokens.resize(id + 1, None);
            }
            tokens[id] = Some(t.to_string());
        };
        for (t, id) in model["vocab"].as_object().into_iter().flatten() {
            put(id.as_u64().unwrap_or(0) as usize, t);
        }
        let mut types = Vec::new();
        let added = doc["added_tokens"].as_array().cloned().unwrap_or_default();
        for a in &added {
            put(
                a["id"].as_u64().unwrap_or(0) as usize,
                a["content"].as_str().unwrap_or(""),
            );
        }
        let tokens: Vec<String> = tokens
            .into_iter()
            .enumerate()
            .map(|(i, t)| t.ok_or_else(|| err(format!("token id {i} has no token"))))
            .collect::<Result<_>>()?;
        types.resize(tokens.len(), 1i64);
        for a in &added {
            let id = a["id"].as_u64().unwrap_or(0) as usize;
            types[id] = if a["special"].as_bool().unwrap_or(false) {
                3
            } else {
                4
            };
        }
        let merges: Vec<V> = model["merges"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| match m {
                Json::String(s) => Ok(V::Str(s.clone())),
                Json::Array(p) if p.len() == 2 => Ok(V::Str(format!(
                    "{} {}",
                    p[0].as_str().unwrap_or(""),
                    p[1].as_str().unwrap_or("")
                ))),
                o => Err(err(format!("unreadable merge {o}"))),
            })
            .collect::<Result<_>>()?;
        let digits = doc["pre_tokenizer"].to_string().contains("\"Digits\"");
        let mut out = vec![
            ("tokenizer.ggml.model".to_string(), V::Str("gpt2".into())),
            (
                "tokenizer.ggml.pre".to_string(),
                V::Str(if digits { "smollm" } else { "gpt2" }.into()),
            ),
            (
                "tokenizer.ggml.tokens".to_string(),
                V::Array(tokens.into_iter().map(V::Str).collect()),
            ),
            (
                "tokenizer.ggml.token_type".to_string(),
                V::Array(types.into_iter().map(V::I).collect()),
            ),
            ("tokenizer.ggml.merges".to_string(), V::Array(merges)),
        ];
        if let Some(b) = self.bos_id {
            out.push(("tokenizer.ggml.bos_token_id".into(), V::U(b as u64)));
        }
        if let Some(e) = self.eos_id {
            out.push(("tokenizer.ggml.eos_token_id".into(), V::U(e as u64)));
        }
        out.push(("tokenizer.ggml.add_bos_token".into(), V::Bool(false)));
        Ok(out)
    }

    /// Rebuilds the tokenizer from GGUF metadata (`tokenizer.ggml.*`). Supported: byte-level BPE
    /// (`tokenizer.ggml.model = gpt2`) with the GPT-2 pre-tokenizer, and SmolLM's variant that
    /// first splits every digit (`tokenizer.ggml.pre = smollm`), as llama.cpp does.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let what = format!("GGUF file {}", file.path().display());
        let err = |msg: String| Error::Tokenizer {
            what: what.clone(),
            msg,
        };
        let model = file
            .get("tokenizer.ggml.model")
            .and_then(Value::as_str)
            .ok_or_else(|| err("metadata key `tokenizer.ggml.model` is missing".into()))?;
        if model != "gpt2" {
            return Err(err(format!(
                "tokenizer model `{model}` is not supported from GGUF metadata (only byte-level BPE, `gpt2`); pass the model's tokenizer.json instead"
            )));
        }
        let pre = file
            .get("tokenizer.ggml.pre")
            .and_then(Value::as_str)
            .unwrap_or("default");
        let digits_first = match pre {
            "smollm" => true,
            "gpt2" | "default" => false,
            other => {
                return Err(err(format!(
                    "pre-tokenizer `{other}` is not supported from GGUF metadata (smollm, gpt2 and default are); pass the model's tokenizer.json instead"
                )));
            }
        };
        let strings = |key: &str| -> Result<Vec<&str>> {
            file.get(key)
                .and_then(Value::as_array)
                .ok_or_else(|| err(format!("metadata key `{key}` is missing")))?
                .iter()
                .map(|v| {
                    v.as_str()
                        .ok_or_else(|| err(format!("`{key}` holds a non-string")))
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let types: Vec<i64> = match file
            .get("tokenizer.ggml.token_type")
            .and_then(Value::as_array)
        {
            Some(a) => a.iter().map(|v| v.as_f64().unwrap_or(1.0) as i64).collect(),
            None => vec![1; tokens.len()],
        };
        let vocab: serde_json::Map<String, Json> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), json!(i)))
            .collect();
        let merges: Vec<Json> = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| json!([a, b]))
                    .ok_or_else(|| err(format!("merge `{m}` is not two space-separated tokens")))
            })
            .collect::<Result<_>>()?;
        // CONTROL (3) and USER_DEFINED (4) tokens are matched whole, never split.
        let added: Vec<Json> = tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| matches!(types.get(*i), Some(3 | 4)))
            .map(|(i, t)| {
                json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": types[i] == 3})
            })
            .collect();
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
        let pre_tokenizer = if digits_first {
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level.clone()]})
        } else {
            byte_level.clone()
        };
        let doc = json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": added, "normalizer": null,
            "pre_tokenizer": pre_tokenizer, "post_processor": null, "decoder": byte_level,
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": merges}
        });
        let mut tok = Self::from_json(doc.to_string(), &what)?;
        let id = |k: &str| file.get(k).and_then(Value::as_u64).map(|v| v as u32);
        tok.bos_id = id("tokenizer.ggml.bos_token_id").or(tok.bos_id);
        tok.eos_id = id("tokenizer.ggml.eos_token_id").or(tok.eos_id);
        Ok(tok)
    }

    /// Token ids of `text`, without any special token added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer {
                what: "encode".into(),
                msg: e.to_string(),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// The token strings of `ids` (byte-level symbols, e.g. `Ġquick`).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Text of `ids` (special tokens kept).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| Error::Tokenizer {
            what: "decode".into(),
            msg: e.to_string(),
        })
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The `tokenizer.json` text (for export next to a pruned model).
    pub fn to_json(&self) -> &str {
        &self.json
    }
}

#[cfg(test)]
mod byte_tests {
    use super::Tokenizer;

    #[test]
    fn the_byte_level_tokenizer_maps_each_byte_to_its_value() {
        let t = Tokenizer::byte_level();
        let text = "Héllo, world\n\t!";
        let ids = t.encode(text).unwrap();
        assert_eq!(ids, text.bytes().map(u32::from).collect::<Vec<_>>());
        assert_eq!(t.decode(&ids).unwrap(), text);
        assert_eq!(t.vocab_size(), 256);
    }
}
