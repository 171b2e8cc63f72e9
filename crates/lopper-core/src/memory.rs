//! How much memory a run may still use: read before any large forward so that a setting that
//! cannot fit is refused with a figure instead of growing until the machine kills the process.

/// The environment variable that caps the memory lopper plans with (bytes, or a number with a
/// `K`, `M`, `G` or `T` suffix, binary units, optionally followed by `B` or `iB`: `512MiB`,
/// `2G`). It takes precedence over what the system reports; tests use it to emulate a small
/// machine.
pub const LIMIT_VAR: &str = "LOPPER_MEMORY_LIMIT";

/// Parses a byte count as [`LIMIT_VAR`] takes it.
pub fn parse_bytes(s: &str) -> Option<u64> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, mult) = match t.chars().last()? {
        'k' | 'K' => (&t[..t.len() - 1], 1u64 << 10),
        'm' | 'M' => (&t[..t.len() - 1], 1 << 20),
        'g' | 'G' => (&t[..t.len() - 1], 1 << 30),
        't' | 'T' => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let v: f64 = num.trim().parse().ok()?;
    (v.is_finite() && v >= 0.0).then_some((v * mult as f64) as u64)
}

/// Memory available to this process in bytes: [`LIMIT_VAR`] if set, else the smaller of the
/// system's `MemAvailable` and the cgroup's remaining allowance (`memory.max - memory.current`).
/// `Ok(None)` where neither can be read (not Linux); an unparsable [`LIMIT_VAR`] is an error.
pub fn available_bytes() -> crate::Result<Option<u64>> {
    if let Some(v) = std::env::var_os(LIMIT_VAR) {
        let s = v.to_string_lossy();
        return parse_bytes(&s).map(Some).ok_or_else(|| {
            crate::Error::Invalid(format!(
                "{LIMIT_VAR}={s} is not a byte count; give bytes or a number with K, M, G or T (e.g. 2G, 512MiB)"
            ))
        });
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    });
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    let cgroup = read("/sys/fs/cgroup/memory.max")
        .map(|max| max.saturating_sub(read("/sys/fs/cgroup/memory.current").unwrap_or(0)));
    Ok(match (meminfo, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    })
}

/// `bytes` for people: `1.5 GiB`, `300.0 MiB`.
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    match bytes {
        n if n >= 1 << 40 => format!("{:.1} TiB", b / (1u64 << 40) as f64),
        n if n >= 1 << 30 => format!("{:.1} GiB", b / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", b / (1u64 << 20) as f64),
        n => format!("{:.1} KiB", n as f64 / 1024.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_parse_with_binary_suffixes() {
        assert_eq!(parse_bytes("1024"), Some(1024));
        assert_eq!(parse_bytes("2G"), Some(2 << 30));
        assert_eq!(parse_bytes("512MiB"), Some(512 << 20));
        assert_eq!(parse_bytes("1.5 GB"), Some(3 << 29));
        assert_eq!(parse_bytes("64k"), Some(64 << 10));
        assert_eq!(parse_bytes("lots"), None);
        assert_eq!(parse_bytes("-1G"), None);
        assert_eq!(human(3 << 29), "1.5 GiB");
    }

    #[test]
    fn this_machine_reports_some_memory() {
        if std::env::var_os(LIMIT_VAR).is_none() && cfg!(target_os = "linux") {
            assert!(available_bytes().unwrap().is_some_and(|b| b > 0));
        }
    }
}
