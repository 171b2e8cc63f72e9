//! The commands the documentation shows are the command line's: every `cargo xtask` command in
//! a fenced block of README.md, ARCHITECTURE.md and docs/ parses (its flags exist and its
//! typed values are valid), every flag an inline command or a synopsis of docs/commands.md
//! names exists on its subcommand, and docs/commands.md names every flag of every subcommand.
//! Running them is the tests' and CI's work; this keeps what the pages show from drifting
//! away from the code.

use super::Cli;
use clap::{Command, CommandFactory, Parser};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// README.md, ARCHITECTURE.md and every Markdown page under docs/.
fn pages() -> Vec<(String, String)> {
    let mut files = vec![root().join("README.md"), root().join("ARCHITECTURE.md")];
    let mut dirs = vec![root().join("docs")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).expect("docs/ is readable") {
            let p = e.expect("a directory entry").path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "md") {
                files.push(p);
            }
        }
    }
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("a readable page");
            let name = p.strip_prefix(root()).unwrap_or(&p).display().to_string();
            (name, text)
        })
        .collect()
}

/// Fenced-block commands: `(page:line, command)`, continuation lines joined, cut at a shell
/// comment, `&&`, `;`, a pipe or a redirection.
fn fenced(page: &str, text: &str) -> Vec<(String, String)> {
    let (mut out, mut inside, mut buf, mut start) = (vec![], false, String::new(), 0);
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            inside = !inside;
            continue;
        }
        let line = line.trim();
        if !inside || (buf.is_empty() && !line.starts_with("cargo xtask ")) {
            continue;
        }
        if buf.is_empty() {
            start = i + 1;
        }
        match line.strip_suffix('\\') {
            Some(head) => {
                buf.push_str(head);
                buf.push(' ');
            }
            None => {
                buf.push_str(line);
                let cmd = buf
                    .split([';', '|', '>', '#'])
                    .next()
                    .and_then(|c| c.split("&&").next())
                    .unwrap_or_default()
                    .trim()
                    .to_string();
                out.push((format!("{page}:{start}"), cmd));
                buf.clear();
            }
        }
    }
    out
}

/// Inline `cargo xtask ...` spans (they may wrap lines).
fn inline(page: &str, text: &str) -> Vec<(String, String)> {
    let mut out = vec![];
    for (n, span) in text.split('`').enumerate() {
        // Odd pieces are inside single backticks; fenced blocks split into empty pieces.
        if n % 2 == 1 && span.starts_with("cargo xtask") {
            out.push((
                page.to_string(),
                span.split_whitespace().collect::<Vec<_>>().join(" "),
            ));
        }
    }
    out
}

/// The deepest subcommand the leading words name (`prune`, `bench forward`), with its path.
fn subcommand<'a>(cli: &'a Command, words: &[&str]) -> Option<(&'a Command, String)> {
    let mut cmd = cli;
    let mut path = vec![];
    for w in words {
        match cmd.find_subcommand(w) {
            Some(sub) => {
                cmd = sub;
                path.push(*w);
            }
            None => break,
        }
    }
    (!path.is_empty()).then(|| (cmd, path.join(" ")))
}

fn flags(span: &str) -> Vec<String> {
    span.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.trim_start_matches('-').to_string())
        .collect()
}

/// A subcommand's long flags; with `shown`, only those `--help` shows (hidden ones are test
/// hooks such as `prune --stop-after`).
fn longs(cmd: &Command, shown: bool) -> Vec<String> {
    cmd.get_arguments()
        .filter(|a| !(shown && a.is_hide_set()))
        .filter_map(|a| a.get_long().map(str::to_string))
        .filter(|l| l != "help" && l != "version")
        .collect()
}

/// A fenced command with its placeholders filled in: optional `[...]` groups taken, `S` (a
/// sparsity in a loop's stead) as 0.3.
fn concrete(cmd: &str) -> Vec<String> {
    let cmd = cmd.replace(['[', ']'], " ");
    shlex::split(&cmd)
        .expect("a command the shell could split")
        .into_iter()
        .skip(1) // `cargo`
        .map(|w| if w == "S" { "0.3".to_string() } else { w })
        .collect()
}

#[test]
fn every_fenced_command_in_the_docs_parses() {
    let mut seen = 0;
    let mut bad = vec![];
    for (page, text) in pages() {
        for (at, cmd) in fenced(&page, &text) {
            seen += 1;
            // clap's program name is the first word: `xtask`.
            if let Err(e) = Cli::try_parse_from(concrete(&cmd)) {
                bad.push(format!("{at}: `{cmd}`\n{}", e.render()));
            }
        }
    }
    assert!(
        seen >= 40,
        "only {seen} fenced commands found: is the scan broken?"
    );
    assert!(
        bad.is_empty(),
        "{} of {seen}:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

#[test]
fn every_flag_an_inline_command_or_a_synopsis_names_exists() {
    let cli = Cli::command();
    let mut seen = 0;
    let mut bad = vec![];
    for (page, text) in pages() {
        for (at, span) in inline(&page, &text) {
            if span == "cargo xtask" {
                continue;
            }
            let words: Vec<&str> = span.split_whitespace().skip(2).collect();
            let Some((cmd, name)) = subcommand(&cli, &words) else {
                bad.push(format!("{at}: `{span}` names no subcommand"));
                continue;
            };
            let known = longs(cmd, false);
            for f in flags(&span) {
                seen += 1;
                if !known.contains(&f) {
                    bad.push(format!(
                        "{at}: `cargo xtask {name}` has no --{f} (`{span}`)"
                    ));
                }
            }
        }
    }
    assert!(seen >= 200, "only {seen} flags found: is the scan broken?");
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// Every leaf subcommand: `(path, command)`.
fn leaves(cmd: &Command, path: &str, out: &mut Vec<(String, Command)>) {
    if cmd.get_subcommands().next().is_none() {
        out.push((path.trim().to_string(), cmd.clone()));
    }
    for sub in cmd.get_subcommands() {
        leaves(sub, &format!("{path} {}", sub.get_name()), out);
    }
}

#[test]
fn docs_commands_names_every_flag_of_every_subcommand() {
    let text = std::fs::read_to_string(root().join("docs/commands.md")).expect("docs/commands.md");
    let cli = Cli::command();
    let spans = inline("docs/commands.md", &text);
    let mut all = vec![];
    leaves(&cli, "", &mut all);
    let mut bad = vec![];
    for (path, cmd) in all.iter().filter(|(p, _)| !p.is_empty()) {
        let prefix = format!("cargo xtask {path}");
        let named: Vec<String> = spans
            .iter()
            .filter(|(_, s)| s == &prefix || s.starts_with(&format!("{prefix} ")))
            .flat_map(|(_, s)| flags(s))
            .collect();
        for long in longs(cmd, true) {
            if !named.contains(&long) {
                bad.push(format!("`{prefix}`: --{long} is not in docs/commands.md"));
            }
        }
    }
    assert!(all.len() > 10, "{} subcommands", all.len());
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}
