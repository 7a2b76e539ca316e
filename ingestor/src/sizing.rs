//! The memory plan when the configuration leaves it open: the memory budget (what requests in flight
//! hold) and DuckDB's memory limit, from the memory this process may use.
//!
//! DuckDB's own default is 80% of the memory it sees (the container's cgroup limit, or the machine's
//! RAM), and its buffer pool keeps every block it writes until that limit: a long-running ingester grows
//! by about a quarter of what it loads until then. The budget comes on top, and the process itself
//! (code, runtime, HTTP/2 windows, allocator slack) on top of both, so DuckDB's default alone lets a busy
//! pod pass its memory limit and be killed. The plan splits the memory three ways instead.

use std::fmt;
use std::path::Path;

const MIB: u64 = 1 << 20;

/// The budget when unset: a quarter of the memory available, within these bounds.
const MIN_BUDGET_BYTES: u64 = 64 * MIB;
pub const MAX_BUDGET_BYTES: u64 = 512 * MIB;
/// What the process needs beside DuckDB and the budget: a fifth of the memory available, and at least
/// this. Measured under `arrowport-memlimit`'s load: 250–300 MiB besides both for tables of 16 columns,
/// about 380 MiB for 32 (code, runtime and DuckDB's threads, HTTP/2 windows, DuckDB's allocations
/// outside its buffer pool, which grow with the columns, allocator arenas).
const MIN_PROCESS_BYTES: u64 = 384 * MIB;
/// DuckDB's limit is never derived below this. Less memory costs speed, not safety: DuckDB bulk-inserts
/// on at most `limit / 4 / (4 MiB × columns) + 1` threads, so 384 MiB keeps both of two cores busy for
/// tables of up to 24 columns (measured on 16: 200 MiB halved the load rate); a 768 MiB pod gets 192 MiB.
pub const MIN_DUCKDB_BYTES: u64 = 128 * MIB;

/// The memory budget by default: a quarter of `available`, at least 64 MiB and at most 512 MiB.
pub fn default_budget(available: u64) -> u64 {
    (available / 4).clamp(MIN_BUDGET_BYTES, MAX_BUDGET_BYTES)
}

/// DuckDB's `memory_limit` by default: what `available` leaves after the `budget` and the process's own
/// share (a fifth, at least 384 MiB), and never less than [`MIN_DUCKDB_BYTES`].
pub fn default_duckdb_limit(available: u64, budget: u64) -> u64 {
    let process = (available / 5).max(MIN_PROCESS_BYTES);
    available.saturating_sub(process).saturating_sub(budget).max(MIN_DUCKDB_BYTES)
}

/// The memory this process may use, and what says so.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Available {
    pub bytes: u64,
    pub source: Source,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The memory limit of the process's cgroup (a container's `resources.limits.memory`).
    Cgroup,
    /// The machine's physical memory.
    Ram,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Cgroup => "the cgroup memory limit",
            Source::Ram => "the machine's memory",
        })
    }
}

/// The memory this process may use: its cgroup's limit where that is below the machine's memory.
/// `None` where neither can be read.
pub fn available() -> Option<Available> {
    let ram = physical_memory();
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|cgroups| cgroup_limit(&cgroups, Path::new("/sys/fs/cgroup")));
    match (cgroup, ram) {
        (Some(limit), Some(ram)) if limit >= ram => Some(Available { bytes: ram, source: Source::Ram }),
        (Some(limit), _) => Some(Available { bytes: limit, source: Source::Cgroup }),
        (None, Some(ram)) => Some(Available { bytes: ram, source: Source::Ram }),
        (None, None) => None,
    }
}

/// `MemTotal` of `/proc/meminfo`.
fn physical_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = meminfo.lines().find_map(|line| line.strip_prefix("MemTotal:"))?.trim().strip_suffix("kB")?;
    kib.trim().parse::<u64>().ok().map(|kib| kib * 1024)
}

/// The memory limit of the cgroup that `/proc/self/cgroup` (given as `cgroups`) names, under the cgroup
/// filesystem at `root`: cgroup v2's `memory.max`, or v1's `memory.limit_in_bytes`. Where the named
/// group is not visible (a container without its own cgroup namespace), the root's files are tried.
fn cgroup_limit(cgroups: &str, root: &Path) -> Option<u64> {
    for line in cgroups.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_id), Some(controllers), Some(path)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        let relative = path.trim_start_matches('/');
        let (dir, file) = if controllers.is_empty() {
            (root.to_owned(), "memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            (root.join("memory"), "memory.limit_in_bytes")
        } else {
            continue;
        };
        for candidate in [dir.join(relative).join(file), dir.join(file)] {
            if let Ok(text) = std::fs::read_to_string(&candidate) {
                // `max` (v2) means no limit; v1 writes an enormous number instead, which the caller's
                // comparison with the machine's memory discards.
                return text.trim().parse().ok();
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn the_memory_is_split_between_budget_duckdb_and_the_process() {
        // The chart's default pod, 2 GiB: a 512 MiB budget, DuckDB 80% less the budget.
        assert_eq!(default_budget(2 * GIB), 512 * MIB);
        assert_eq!(default_duckdb_limit(2 * GIB, 512 * MIB), 2 * GIB - 2 * GIB / 5 - 512 * MIB);
        // Large machines: the budget stops at 512 MiB, DuckDB takes the rest of its share.
        assert_eq!(default_budget(24 * GIB), 512 * MIB);
        assert_eq!(default_duckdb_limit(24 * GIB, 512 * MIB), 24 * GIB - 24 * GIB / 5 - 512 * MIB);
        // A 768 MiB pod: 192 MiB budget, 384 MiB for the process, 192 MiB for DuckDB; 1 GiB: 256/384/384.
        assert_eq!(default_budget(768 * MIB), 192 * MIB);
        assert_eq!(default_duckdb_limit(768 * MIB, 192 * MIB), 192 * MIB);
        assert_eq!(default_budget(GIB), 256 * MIB);
        assert_eq!(default_duckdb_limit(GIB, 256 * MIB), 384 * MIB);
    }

    #[test]
    fn small_pods_still_give_each_part_its_minimum() {
        assert_eq!(default_budget(128 * MIB), 64 * MIB);
        assert_eq!(default_duckdb_limit(512 * MIB, default_budget(512 * MIB)), MIN_DUCKDB_BYTES);
        assert_eq!(default_duckdb_limit(256 * MIB, 4 * GIB), MIN_DUCKDB_BYTES);
    }

    fn write(root: &Path, file: &str, text: &str) {
        let path = root.join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn reads_cgroup_v2_memory_max_of_the_named_group() {
        let root = tempfile::tempdir().unwrap();
        write(root.path(), "kubepods/pod1/memory.max", "2147483648\n");
        write(root.path(), "memory.max", "max\n");
        assert_eq!(cgroup_limit("0::/kubepods/pod1\n", root.path()), Some(2 * GIB));
    }

    #[test]
    fn cgroup_v2_without_a_limit_is_none() {
        let root = tempfile::tempdir().unwrap();
        write(root.path(), "memory.max", "max\n");
        // Inside a cgroup namespace the group is `/` and its files sit at the root.
        assert_eq!(cgroup_limit("0::/\n", root.path()), None);
    }

    #[test]
    fn reads_cgroup_v1_memory_controller_and_falls_back_to_the_root() {
        let root = tempfile::tempdir().unwrap();
        write(root.path(), "memory/memory.limit_in_bytes", "1073741824\n");
        let cgroups = "12:cpu,cpuacct:/docker/abc\n11:memory:/docker/abc\n";
        assert_eq!(cgroup_limit(cgroups, root.path()), Some(GIB));
    }

    #[test]
    fn no_memory_controller_is_none() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(cgroup_limit("12:cpu,cpuacct:/x\n", root.path()), None);
        assert_eq!(cgroup_limit("garbage", root.path()), None);
    }

    #[test]
    fn this_process_has_some_memory_available() {
        let available = available().expect("the machine's memory is readable on Linux");
        assert!(available.bytes > 64 * MIB, "{available:?}");
    }
}
