//! Progress bars and log lines that share the terminal: every bar joins one `MultiProgress`,
//! and log lines are printed above the bars instead of through them.

use std::io::Write;
use std::sync::LazyLock;

use anyhow::Result;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

static MULTI: LazyLock<MultiProgress> = LazyLock::new(MultiProgress::new);

/// A bar of `len` steps drawn with `template` (indicatif syntax), below the bars already shown.
pub fn bar(len: u64, template: &str) -> Result<ProgressBar> {
    Ok(MULTI.add(ProgressBar::new(len).with_style(ProgressStyle::with_template(template)?)))
}

/// The writer of the tracing subscriber: stderr, with the bars hidden while a line is written.
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        MULTI.suspend(|| std::io::stderr().write(buf))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}
