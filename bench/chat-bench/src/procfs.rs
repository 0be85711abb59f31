//! Reading a process's memory and CPU time from /proc (Linux).

/// VmRSS of a process, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

/// RssAnon of a process (its resident heap and stacks, without mapped files), in KiB.
pub fn rss_anon_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "RssAnon:")
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// User + system CPU time of a process (None: this process), in seconds.
pub fn cpu_secs(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let s = std::fs::read_to_string(path).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / clock_ticks())
}

fn clock_ticks() -> f64 {
    // USER_HZ is 100 on every Linux architecture this runs on.
    100.0
}

/// CPU use between two samples, in percent of one core.
pub struct CpuMeter {
    pid: Option<u32>,
    start: Option<f64>,
    t: std::time::Instant,
}

impl CpuMeter {
    pub fn start(pid: Option<u32>) -> Self {
        CpuMeter {
            pid,
            start: cpu_secs(pid),
            t: std::time::Instant::now(),
        }
    }

    pub fn percent(&self) -> Option<f64> {
        let end = cpu_secs(self.pid)?;
        let wall = self.t.elapsed().as_secs_f64();
        Some((end - self.start?) / wall.max(1e-9) * 100.0)
    }
}

/// "AMD EPYC ..." from /proc/cpuinfo.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Soft and hard limit on open files of this process.
pub fn nofile_limits() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/self/limits").ok()?;
    let l = s.lines().find(|l| l.starts_with("Max open files"))?;
    let f: Vec<&str> = l.split_whitespace().collect();
    Some((f.get(3)?.parse().ok()?, f.get(4)?.parse().ok()?))
}

/// Busy CPU time of the whole machine (all cores, /proc/stat), in seconds.
pub fn machine_busy_secs() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let l = s.lines().next()?.strip_prefix("cpu ")?;
    let f: Vec<u64> = l
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy = f.first()? + f.get(1)? + f.get(2)? + f.get(5)? + f.get(6)? + f.get(7).unwrap_or(&0);
    Some(busy as f64 / clock_ticks())
}

/// CPU that processes other than the bench and the server used meanwhile: the noise
/// of a shared machine, in percent of one core.
pub struct BackgroundMeter {
    machine: Option<f64>,
    client: CpuMeter,
    server: Option<CpuMeter>,
}

impl BackgroundMeter {
    pub fn start(server_pid: Option<u32>) -> Self {
        BackgroundMeter {
            machine: machine_busy_secs(),
            client: CpuMeter::start(None),
            server: server_pid.map(|p| CpuMeter::start(Some(p))),
        }
    }

    pub fn percent(&self) -> Option<f64> {
        let wall = self.client.t.elapsed().as_secs_f64().max(1e-9);
        let machine = (machine_busy_secs()? - self.machine?) / wall * 100.0;
        let ours = self.client.percent()?
            + self
                .server
                .as_ref()
                .and_then(|s| s.percent())
                .unwrap_or(0.0);
        Some((machine - ours).max(0.0))
    }
}
