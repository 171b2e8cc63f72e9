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

/// A `/proc/self/status` memory line in MiB (`None` where the kernel does not report it).
fn status_mib(key: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Peak resident memory of this process so far, in MiB (`VmHWM`).
pub fn peak_rss_mib() -> Option<f64> {
    status_mib("VmHWM:")
}

/// Resident memory of this process now, in MiB (`VmRSS`).
pub fn rss_mib() -> Option<f64> {
    status_mib("VmRSS:")
}

/// Resets the peak resident memory of this process to its current resident memory (writes `5`
/// to /proc/self/clear_refs), so that `peak_rss_mib` measures one phase; false where the kernel
/// does not allow it.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// `; peak resident memory N MiB` when known.
pub fn peak_rss_note() -> String {
    peak_rss_mib().map_or(String::new(), |m| {
        format!("; peak resident memory {m:.0} MiB")
    })
}
