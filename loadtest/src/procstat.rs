//! Peak RSS and CPU time of a process, from `/proc` (Linux).

use serde::Serialize;

/// What the kernel reports for one process.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ProcStat {
    pub(crate) process: String,
    pub(crate) pid: u32,
    pub(crate) rss_mib: f64,
    pub(crate) peak_rss_mib: f64,
    pub(crate) cpu_user_s: f64,
    pub(crate) cpu_system_s: f64,
}

/// Linux reports CPU time in clock ticks; USER_HZ is 100 on every mainstream
/// architecture.
const TICKS_PER_SECOND: f64 = 100.0;

pub(crate) fn read(process: &str, pid: u32) -> Option<ProcStat> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |field: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(field))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line; `rest` starts at field 3.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Some(ProcStat {
        process: process.to_owned(),
        pid,
        rss_mib: kib("VmRSS:") / 1024.0,
        peak_rss_mib: kib("VmHWM:") / 1024.0,
        cpu_user_s: ticks(11) / TICKS_PER_SECOND,
        cpu_system_s: ticks(12) / TICKS_PER_SECOND,
    })
}

/// This process.
pub(crate) fn this(process: &str) -> Option<ProcStat> {
    read(process, std::process::id())
}
