//! Zero-shot multiple-choice tasks, built exactly as lm-evaluation-harness 0.4 builds them
//! (prompt templates, target delimiter " ", choices, answer mapping; facts from its task YAMLs).

use std::path::PathBuf;

use serde_json::Value;

use crate::{DataDirs, Error, Result};

/// A multiple-choice task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum McTask {
    /// SuperGLUE BoolQ validation: `{passage}\nQuestion: {question}?\nAnswer:` -> ` no` / ` yes`.
    Boolq,
    /// PIQA validation: `Question: {goal}\nAnswer:` -> ` {sol1}` / ` {sol2}`.
    Piqa,
    /// ARC-Easy test: `Question: {stem}\nAnswer:` -> ` {choice}`.
    ArcEasy,
    /// ARC-Challenge test, same template.
    ArcChallenge,
    /// OpenBookQA main test: `{question_stem}` -> ` {choice}`.
    Openbookqa,
    /// WinoGrande (xl) validation, partial scoring: each option substituted into the context,
    /// the shared suffix scored.
    Winogrande,
    /// HellaSwag validation: `{activity}: {context}` -> ` {ending}`, from the staged llama.cpp
    /// text form (6 lines per example), with lm-eval's text preprocessing applied again. It
    /// differs from lm-eval's own preprocessing in one way the text form cannot undo: the second
    /// part of the context (`ctx_b`) is not capitalised.
    Hellaswag,
}

/// One document: the (context, continuation) requests, one per choice, the choice strings whose
/// character lengths normalise `acc_norm`, and the gold index.
#[derive(Debug, Clone, PartialEq)]
pub struct McDoc {
    /// `(context, continuation)` per choice.
    pub requests: Vec<(String, String)>,
    /// The task's choice strings (lm-eval's `doc_to_choice`).
    pub choices: Vec<String>,
    /// Index of the right choice.
    pub gold: usize,
}

impl McTask {
    /// All tasks.
    pub const ALL: [McTask; 7] = [
        McTask::Hellaswag,
        McTask::Boolq,
        McTask::Piqa,
        McTask::ArcEasy,
        McTask::ArcChallenge,
        McTask::Openbookqa,
        McTask::Winogrande,
    ];

    /// Parses a task name.
    pub fn from_task(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    /// The task name.
    pub fn name(self) -> &'static str {
        match self {
            McTask::Boolq => "boolq",
            McTask::Piqa => "piqa",
            McTask::ArcEasy => "arc_easy",
            McTask::ArcChallenge => "arc_challenge",
            McTask::Openbookqa => "openbookqa",
            McTask::Winogrande => "winogrande",
            McTask::Hellaswag => "hellaswag",
        }
    }

    /// Official example count of the evaluated split.
    pub fn official_count(self) -> usize {
        match self {
            McTask::Boolq => 3270,
            McTask::Piqa => 1838,
            McTask::ArcEasy => 2376,
            McTask::ArcChallenge => 1172,
            McTask::Openbookqa => 500,
            McTask::Winogrande => 1267,
            McTask::Hellaswag => 10042,
        }
    }

    /// Whether lm-eval reports `acc_norm` for the task.
    pub fn has_acc_norm(self) -> bool {
        !matches!(self, McTask::Boolq | McTask::Winogrande)
    }

    fn file(self) -> (&'static str, &'static str) {
        match self {
            McTask::Boolq => ("boolq", "val.jsonl"),
            McTask::Piqa => ("piqa", "valid.jsonl"),
            McTask::ArcEasy => ("arc", "ARC-Easy-Test.jsonl"),
            McTask::ArcChallenge => ("arc", "ARC-Challenge-Test.jsonl"),
            McTask::Openbookqa => ("openbookqa", "main_test.jsonl"),
            McTask::Winogrande => ("winogrande", "winogrande_xl_validation.jsonl"),
            McTask::Hellaswag => ("hellaswag", "hellaswag_val_full.txt.bz2"),
        }
    }

    /// Reads every document, checking the count against the official one.
    pub fn load(self, dirs: &DataDirs) -> Result<(PathBuf, Vec<McDoc>)> {
        let (name, file) = self.file();
        let path = dirs.find(name, file)?;
        let read = |p: &PathBuf| {
            std::fs::read_to_string(p).map_err(|source| Error::Io {
                path: p.clone(),
                source,
            })
        };
        if self == McTask::Hellaswag {
            let docs = hellaswag_docs(&path)?;
            return self.check_count(&path, docs);
        }
        let text = read(&path)?;
        let labels: Option<Vec<String>> = match self {
            McTask::Piqa => {
                let lp = dirs.find(name, "valid-labels.lst")?;
                Some(read(&lp)?.lines().map(|l| l.trim().to_string()).collect())
            }
            _ => None,
        };
        let mut docs = Vec::new();
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let bad = |msg: String| Error::Invalid(format!("{}:{}: {msg}", path.display(), i + 1));
            let v: Value =
                serde_json::from_str(line).map_err(|e| bad(format!("not valid JSON: {e}")))?;
            let label = labels
                .as_ref()
                .map(|l| l.get(i).cloned().unwrap_or_default());
            docs.push(self.doc(&v, label.as_deref()).map_err(bad)?);
        }
        self.check_count(&path, docs)
    }

    fn check_count(
        self,
        path: &std::path::Path,
        docs: Vec<McDoc>,
    ) -> Result<(PathBuf, Vec<McDoc>)> {
        if docs.len() != self.official_count() {
            return Err(Error::Invalid(format!(
                "{}: {} examples, but the official {} split has {}; the file is incomplete or not the right split",
                path.display(),
                docs.len(),
                self.name(),
                self.official_count()
            )));
        }
        Ok((path.to_owned(), docs))
    }

    /// Builds one document from its JSON record (`label`: PIQA's line from valid-labels.lst).
    pub fn doc(self, v: &Value, label: Option<&str>) -> std::result::Result<McDoc, String> {
        let s = |v: &Value, k: &str| -> std::result::Result<String, String> {
            v.get(k)
                .and_then(Value::as_str)
                .map(String::from)
                .ok_or_else(|| format!("field `{k}` is missing or not a string"))
        };
        let simple = |ctx: String,
                      choices: Vec<String>,
                      gold: usize|
         -> std::result::Result<McDoc, String> {
            if gold >= choices.len() {
                return Err(format!(
                    "answer index {gold} out of {} choices",
                    choices.len()
                ));
            }
            Ok(McDoc {
                requests: choices
                    .iter()
                    .map(|c| (ctx.clone(), format!(" {c}")))
                    .collect(),
                choices,
                gold,
            })
        };
        match self {
            McTask::Boolq => {
                let gold = match v.get("label") {
                    Some(Value::String(l)) if l == "true" => 1,
                    Some(Value::String(l)) if l == "false" => 0,
                    Some(Value::Bool(b)) => *b as usize,
                    Some(Value::Number(n)) => n.as_u64().unwrap_or(0) as usize,
                    _ => return Err("field `label` is missing".into()),
                };
                let ctx = format!(
                    "{}\nQuestion: {}?\nAnswer:",
                    s(v, "passage")?,
                    s(v, "question")?
                );
                simple(ctx, vec!["no".into(), "yes".into()], gold)
            }
            McTask::Piqa => {
                let gold: usize = label
                    .and_then(|l| l.parse().ok())
                    .ok_or("no label in valid-labels.lst for this line")?;
                simple(
                    format!("Question: {}\nAnswer:", s(v, "goal")?),
                    vec![s(v, "sol1")?, s(v, "sol2")?],
                    gold,
                )
            }
            McTask::ArcEasy | McTask::ArcChallenge => {
                let q = v.get("question").ok_or("field `question` is missing")?;
                let choices = q
                    .get("choices")
                    .and_then(Value::as_array)
                    .ok_or("field `question.choices` is missing")?;
                let texts = choices
                    .iter()
                    .map(|c| s(c, "text"))
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                let labels = choices
                    .iter()
                    .map(|c| s(c, "label"))
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                let key = s(v, "answerKey")?;
                let gold = labels.iter().position(|l| *l == key).ok_or(format!(
                    "answerKey `{key}` is not among the labels {labels:?}"
                ))?;
                simple(format!("Question: {}\nAnswer:", s(q, "stem")?), texts, gold)
            }
            McTask::Openbookqa => {
                let c = v.get("choices").ok_or("field `choices` is missing")?;
                let strings = |k: &str| -> std::result::Result<Vec<String>, String> {
                    c.get(k)
                        .and_then(Value::as_array)
                        .ok_or(format!("field `choices.{k}` is missing"))?
                        .iter()
                        .map(|x| {
                            x.as_str()
                                .map(String::from)
                                .ok_or(format!("`choices.{k}` holds a non-string"))
                        })
                        .collect()
                };
                let key = s(v, "answerKey")?;
                let key = key.trim_start();
                let labels = strings("label")?;
                let gold = labels
                    .iter()
                    .position(|l| l == key)
                    .ok_or(format!("answerKey `{key}` is not among {labels:?}"))?;
                simple(s(v, "question_stem")?, strings("text")?, gold)
            }
            McTask::Hellaswag => Err("HellaSwag is read from its text form, not JSON".into()),
            McTask::Winogrande => {
                let sentence = s(v, "sentence")?;
                let idx = sentence.find('_').ok_or("the sentence has no `_` blank")?;
                let target = format!(" {}", sentence[idx + 1..].trim());
                let contexts = vec![
                    format!("{}{}", &sentence[..idx], s(v, "option1")?),
                    format!("{}{}", &sentence[..idx], s(v, "option2")?),
                ];
                let gold = match s(v, "answer")?.as_str() {
                    "1" => 0,
                    "2" => 1,
                    a => return Err(format!("answer `{a}` is neither 1 nor 2")),
                };
                Ok(McDoc {
                    requests: contexts
                        .iter()
                        .map(|c| (c.clone(), target.clone()))
                        .collect(),
                    choices: contexts,
                    gold,
                })
            }
        }
    }
}

/// LAMBADA (OpenAI's detokenised test set, lm-eval `lambada_openai`): per example the context
/// (every word but the last, joined by single spaces) and the target (" " + last word), scored
/// with no extra delimiter. Checks the official count (5153).
pub fn load_lambada(dirs: &DataDirs) -> Result<(PathBuf, Vec<(String, String)>)> {
    let path = dirs.find("lambada", "lambada_test.jsonl")?;
    let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
        path: path.clone(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let bad = |msg: &str| Error::Invalid(format!("{}:{}: {msg}", path.display(), i + 1));
        let v: Value = serde_json::from_str(line).map_err(|_| bad("not valid JSON"))?;
        let t = v
            .get("text")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("field `text` is missing"))?;
        let words: Vec<&str> = t.split(' ').collect();
        if words.len() < 2 {
            return Err(bad("fewer than two words"));
        }
        out.push((
            words[..words.len() - 1].join(" "),
            format!(" {}", words[words.len() - 1]),
        ));
    }
    if out.len() != 5153 {
        return Err(Error::Invalid(format!(
            "{}: {} examples, but LAMBADA's test set has 5153",
            path.display(),
            out.len()
        )));
    }
    Ok((path, out))
}

/// lm-eval's HellaSwag text preprocessing: strip, " [title]" -> ". ", drop `[...]` tags, collapse
/// double spaces.
pub fn hellaswag_preprocess(text: &str) -> String {
    let t = text.trim().replace(" [title]", ". ");
    let mut out = String::with_capacity(t.len());
    let mut rest = t.as_str();
    while let Some(open) = rest.find('[') {
        match rest[open..].find(']') {
            Some(close) => {
                out.push_str(&rest[..open]);
                rest = &rest[open + close + 1..];
            }
            None => break,
        }
    }
    out.push_str(rest);
    out.replace("  ", " ")
}

fn hellaswag_docs(path: &std::path::Path) -> Result<Vec<McDoc>> {
    use std::io::Read;
    let io = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    let mut text = String::new();
    bzip2::read::BzDecoder::new(std::fs::File::open(path).map_err(io)?)
        .read_to_string(&mut text)
        .map_err(io)?;
    let lines: Vec<&str> = text.lines().collect();
    if !lines.len().is_multiple_of(6) {
        return Err(Error::Invalid(format!(
            "{}: {} lines, not a multiple of 6 (context, label, 4 endings)",
            path.display(),
            lines.len()
        )));
    }
    lines
        .chunks_exact(6)
        .enumerate()
        .map(|(i, c)| {
            let gold: usize = c[1].trim().parse().map_err(|_| {
                Error::Invalid(format!(
                    "{}: example {i}: label `{}` is not a number",
                    path.display(),
                    c[1]
                ))
            })?;
            let query = hellaswag_preprocess(c[0]);
            let choices: Vec<String> = c[2..].iter().map(|e| hellaswag_preprocess(e)).collect();
            if gold >= choices.len() {
                return Err(Error::Invalid(format!(
                    "{}: example {i}: label {gold} out of range",
                    path.display()
                )));
            }
            Ok(McDoc {
                requests: choices
                    .iter()
                    .map(|e| (query.clone(), format!(" {e}")))
                    .collect(),
                choices,
                gold,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hellaswag_preprocessing_matches_lm_eval() {
        assert_eq!(
            hellaswag_preprocess(
                " Making a cake: [header] How to bake [title] Mix flour.  Then [step] bake "
            ),
            "Making a cake: How to bake. Mix flour. Then bake"
        );
    }
}

#[cfg(test)]
mod load_tests {
    use super::*;

    #[test]
    fn a_corrupt_jsonl_line_is_named_with_its_file_and_line() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("openbookqa");
        std::fs::create_dir_all(&dir).unwrap();
        let good = r#"{"id": "1", "question_stem": "Q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "B"}"#;
        std::fs::write(dir.join("main_test.jsonl"), format!("{good}\n{{broken\n")).unwrap();
        let dirs = DataDirs {
            roots: vec![root.path().to_owned()],
            hub: None,
        };
        let e = McTask::Openbookqa.load(&dirs).unwrap_err().to_string();
        assert!(
            e.contains("main_test.jsonl:2") && e.contains("not valid JSON"),
            "{e}"
        );
        // A well-formed but short file fails the official count check.
        std::fs::write(dir.join("main_test.jsonl"), format!("{good}\n")).unwrap();
        let e = McTask::Openbookqa.load(&dirs).unwrap_err().to_string();
        assert!(e.contains("1 examples") && e.contains("500"), "{e}");
        // A gold answer that is not among the labels.
        let bad = good.replace(r#""answerKey": "B""#, r#""answerKey": "E""#);
        std::fs::write(dir.join("main_test.jsonl"), format!("{bad}\n")).unwrap();
        let e = McTask::Openbookqa.load(&dirs).unwrap_err().to_string();
        assert!(e.contains("answerKey `E`"), "{e}");
    }
}
