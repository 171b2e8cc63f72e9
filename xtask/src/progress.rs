//! Progress bars and log lines that share the terminal: every bar joins one `MultiProgress`,
//! and log lines are printed above the bars instead of through them. Where stderr is not a
//! terminal (CI, `nohup`, a batch queue) the bars cannot be drawn, and each one is logged as a
//! line instead, every [`LOG_EVERY_ENV`] seconds while it runs.

use std::io::Write;
use std::sync::LazyLock;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Result;
use indicatif::{HumanDuration, MultiProgress, ProgressBar, ProgressStyle};

static MULTI: LazyLock<MultiProgress> = LazyLock::new(MultiProgress::new);

/// Seconds between the log lines of a bar that cannot be drawn (default 60; 0: none).
pub const LOG_EVERY_ENV: &str = "LOPPER_PROGRESS_SECS";

/// A bar of `len` steps drawn with `template` (indicatif syntax), below the bars already shown;
/// logged every [`LOG_EVERY_ENV`] seconds instead where it cannot be drawn.
pub fn bar(len: u64, template: &str) -> Result<ProgressBar> {
    let bar = MULTI.add(ProgressBar::new(len).with_style(ProgressStyle::with_template(template)?));
    let secs = log_every_secs()?;
    if bar.is_hidden() && secs > 0 {
        log_while_running(&bar, template, Duration::from_secs(secs), |line| {
            tracing::info!("{line}")
        })?;
    }
    Ok(bar)
}

/// [`LOG_EVERY_ENV`], read and checked once (the xtask checks it before any work starts).
pub fn log_every_secs() -> Result<u64> {
    static SECS: LazyLock<std::result::Result<u64, String>> = LazyLock::new(|| {
        match std::env::var(LOG_EVERY_ENV) {
            Ok(v) => v.trim().parse::<u64>().map_err(|_| {
                format!(
                    "{LOG_EVERY_ENV}={v:?} is not a number of seconds: give a whole number (0 turns the progress lines off)"
                )
            }),
            Err(_) => Ok(60),
        }
    });
    SECS.clone().map_err(anyhow::Error::msg)
}

/// Calls `sink` with the bar's state ([`render`]) every `every` until the bar is finished or
/// dropped (the thread holds no strong reference, so it never keeps a bar alive).
fn log_while_running(
    bar: &ProgressBar,
    template: &str,
    every: Duration,
    sink: impl Fn(String) + Send + 'static,
) -> Result<JoinHandle<()>> {
    let weak = bar.downgrade();
    let template = template.to_string();
    Ok(std::thread::Builder::new()
        .name("progress-log".into())
        .spawn(move || {
            // The first position this thread saw and when: the rate of the steps since then
            // gives the time left (a resumed bar's earlier steps took no time here).
            let mut first: Option<(u64, Instant)> = None;
            loop {
                std::thread::sleep(every);
                let b = match weak.upgrade() {
                    Some(b) if !b.is_finished() => b,
                    _ => return,
                };
                let (pos, now) = (b.position(), Instant::now());
                let (p0, t0) = *first.get_or_insert((pos, now));
                // Before a second look, the mean rate since the bar was made.
                let (steps, secs) = if pos > p0 || t0 != now {
                    (pos.saturating_sub(p0), now - t0)
                } else {
                    (pos, b.elapsed())
                };
                let eta = b
                    .length()
                    .and_then(|len| time_left(secs, steps, len - pos.min(len)));
                sink(render(&template, &b, eta));
            }
        })?)
}

/// The time `left` more steps take at the rate of `done` steps in `spent` (`None` before any).
pub fn time_left(spent: Duration, done: u64, left: u64) -> Option<Duration> {
    (done > 0).then(|| spent.mul_f64(left as f64 / done as f64))
}

/// The bar's `template` as one line of text: the bar itself left out, `{msg}`, `{pos}`,
/// `{len}` and `{eta}` filled in (`?` where no time left is known), the elapsed time appended.
fn render(template: &str, bar: &ProgressBar, eta: Option<Duration>) -> String {
    let eta = eta.map_or("?".to_string(), |d| HumanDuration(d).to_string());
    let line = template
        .replace("[{bar:30}]", "")
        .replace("{msg}", &bar.message())
        .replace("{pos}", &bar.position().to_string())
        .replace("{len}", &bar.length().map_or("?".into(), |l| l.to_string()))
        .replace("{eta}", &eta);
    let line = line.split_whitespace().collect::<Vec<_>>().join(" ");
    format!("{line} (elapsed {})", HumanDuration(bar.elapsed()))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn a_hidden_bar_renders_as_one_line() {
        let b = ProgressBar::hidden();
        b.set_length(60);
        b.set_message("loss 5.1");
        let line = render("pg [{bar:30}] step {pos}/{len} {msg} eta {eta}", &b, None);
        assert!(
            line.starts_with("pg step 0/60 loss 5.1 eta ? (elapsed "),
            "{line}"
        );
        b.set_position(12);
        let eta = Some(Duration::from_secs(180));
        let line = render("{msg} [{bar:30}] {pos}/{len} windows, eta {eta}", &b, eta);
        assert!(
            line.starts_with("loss 5.1 12/60 windows, eta 3 minutes (elapsed "),
            "{line}"
        );
        assert!(!line.contains('{'), "{line}");
    }

    #[test]
    fn the_log_thread_reports_until_the_bar_is_gone() {
        let b = ProgressBar::hidden();
        b.set_length(10);
        b.set_position(3);
        let (tx, rx) = mpsc::channel();
        let h = log_while_running(
            &b,
            "{pos}/{len} eta {eta}",
            Duration::from_millis(5),
            move |l| {
                let _ = tx.send(l);
            },
        )
        .unwrap();
        let first = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(first.starts_with("3/10 eta "), "{first}");
        assert!(!first.contains("eta ?"), "{first}");
        // Later lines take the time left from the rate of the steps since the first look.
        std::thread::sleep(Duration::from_millis(40));
        b.set_position(5);
        let later = loop {
            let l = rx.recv_timeout(Duration::from_secs(10)).unwrap();
            if l.starts_with("5/10") {
                break l;
            }
        };
        assert!(!later.contains("eta ?"), "{later}");
        drop(b);
        // Without a strong reference the thread ends at its next tick.
        h.join().unwrap();
        let finished = ProgressBar::hidden();
        finished.finish();
        let h = log_while_running(&finished, "{pos}", Duration::from_millis(1), |l| {
            panic!("a finished bar was logged: {l}")
        })
        .unwrap();
        h.join().unwrap();
    }
}
