//! This process's memory as `/proc/self/status` reports it, for tests and
//! benchmarks that bound memory growth (run them under nextest: one process
//! per test, so nothing else shares the figure).

/// A `/proc/self/status` field given in kB (`"VmRSS:"`, `"VmHWM:"`), in bytes;
/// 0 where it cannot be read.
pub fn proc_status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Resident memory of this process now, in bytes.
pub fn rss_bytes() -> u64 {
    proc_status_bytes("VmRSS:")
}

/// Peak resident memory of this process (`VmHWM`), in bytes.
pub fn peak_rss_bytes() -> u64 {
    proc_status_bytes("VmHWM:")
}
