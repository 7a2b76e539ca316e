//! A memory cgroup of its own for the server: cgroup v1's memory controller or a cgroup v2 child group,
//! created under the group this process runs in (so whatever limits and accounting already apply to this
//! process still apply to the server), with the memory limit to test, and what it reports.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

const MIB: u64 = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// A memory cgroup this process created; removed (once its processes are gone) when dropped.
pub struct Group {
    files: Files,
}

/// A group's files, to read what it reports.
#[derive(Clone, Debug)]
pub struct Files {
    dir: PathBuf,
    version: Version,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Version::V1 => "cgroup v1",
            Version::V2 => "cgroup v2",
        })
    }
}

/// Why no group could be made: the test is skipped, loudly.
#[derive(Debug)]
pub struct Unavailable(pub String);

impl Group {
    /// A new group named `arrowport-memlimit-<pid>-<n>` with `limit` bytes of memory and no swap beyond
    /// it (`None`: no limit, the group only measures). Tries, in order: beside or under this process's own
    /// group, then the hierarchy's root.
    pub fn create(n: u32, limit: Option<u64>) -> Result<Self, Unavailable> {
        let name = format!("arrowport-memlimit-{}-{n}", std::process::id());
        let root = Path::new("/sys/fs/cgroup");
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let mut tried = Vec::new();
        let (version, parents) = if root.join("cgroup.controllers").exists() {
            (Version::V2, v2_parents(root, &own))
        } else if root.join("memory/memory.limit_in_bytes").exists() {
            (Version::V1, v1_parents(&root.join("memory"), &own))
        } else {
            return Err(Unavailable(
                "no memory cgroup hierarchy: neither /sys/fs/cgroup/cgroup.controllers (v2) nor \
                 /sys/fs/cgroup/memory (v1) exists"
                    .into(),
            ));
        };
        for parent in parents {
            match Self::create_under(&parent, &name, version, limit) {
                Ok(group) => return Ok(group),
                Err(reason) => tried.push(format!("{}: {reason}", parent.display())),
            }
        }
        Err(Unavailable(format!("cannot create a {version} memory group ({})", tried.join("; "))))
    }

    fn create_under(parent: &Path, name: &str, version: Version, limit: Option<u64>) -> Result<Self, String> {
        if !parent.is_dir() {
            return Err("not a directory".into());
        }
        if version == Version::V2 {
            let controllers = std::fs::read_to_string(parent.join("cgroup.controllers")).unwrap_or_default();
            if !controllers.split_whitespace().any(|c| c == "memory") {
                return Err("the memory controller is not available here".into());
            }
            let subtree = std::fs::read_to_string(parent.join("cgroup.subtree_control")).unwrap_or_default();
            if !subtree.split_whitespace().any(|c| c == "memory") {
                std::fs::write(parent.join("cgroup.subtree_control"), "+memory")
                    .map_err(|e| format!("cannot enable the memory controller for children: {e}"))?;
            }
        }
        let dir = parent.join(name);
        std::fs::create_dir(&dir).map_err(|e| format!("mkdir: {e}"))?;
        // From here on, dropping the group removes the directory.
        let group = Self { files: Files { dir, version } };
        let Some(limit) = limit else { return Ok(group) };
        match version {
            Version::V1 => {
                group.write("memory.limit_in_bytes", &limit.to_string())?;
                // Memory plus swap: the same figure, so swap is no way out (set after the memory limit,
                // which it may not be below).
                if group.files.dir.join("memory.memsw.limit_in_bytes").exists() {
                    group.write("memory.memsw.limit_in_bytes", &limit.to_string())?;
                }
            }
            Version::V2 => {
                group.write("memory.max", &limit.to_string())?;
                if group.files.dir.join("memory.swap.max").exists() {
                    group.write("memory.swap.max", "0")?;
                }
            }
        }
        let written = group.files.read_u64(match version {
            Version::V1 => "memory.limit_in_bytes",
            Version::V2 => "memory.max",
        });
        // v1 rounds the limit down to whole pages.
        if written.is_none_or(|w| w > limit || w + 4096 * 16 < limit) {
            return Err(format!("the limit did not take: wrote {limit}, reads {written:?}"));
        }
        Ok(group)
    }

    fn write(&self, file: &str, value: &str) -> Result<(), String> {
        std::fs::write(self.files.dir.join(file), value).map_err(|e| format!("writing {value} to {file}: {e}"))
    }

    pub fn files(&self) -> &Files {
        &self.files
    }

    pub fn dir(&self) -> &Path {
        &self.files.dir
    }

    pub fn version(&self) -> Version {
        self.files.version
    }

    /// The file a process's pid is written to, to move it into the group.
    pub fn procs(&self) -> PathBuf {
        self.files.dir.join("cgroup.procs")
    }
}

impl Files {
    fn read(&self, file: &str) -> Option<String> {
        std::fs::read_to_string(self.dir.join(file)).ok()
    }

    fn read_u64(&self, file: &str) -> Option<u64> {
        self.read(file)?.trim().parse().ok()
    }

    /// `key value` lines (`memory.stat`, `memory.events`, v1's `memory.oom_control`).
    fn keyed(&self, file: &str, key: &str) -> Option<u64> {
        keyed(&self.read(file)?, key)
    }

    /// What the group uses now: all memory charged to it, and its anonymous (process) part.
    pub fn sample(&self) -> Sample {
        match self.version {
            Version::V1 => Sample {
                usage: self.read_u64("memory.usage_in_bytes").unwrap_or(0),
                anon: self.keyed("memory.stat", "total_rss").unwrap_or(0),
                file: self.keyed("memory.stat", "total_cache").unwrap_or(0),
            },
            Version::V2 => Sample {
                usage: self.read_u64("memory.current").unwrap_or(0),
                anon: self.keyed("memory.stat", "anon").unwrap_or(0),
                file: self.keyed("memory.stat", "file").unwrap_or(0),
            },
        }
    }

    /// The group's counters: its peak, how often it hit its limit, and OOM kills.
    pub fn counters(&self) -> Counters {
        match self.version {
            Version::V1 => Counters {
                peak: self.read_u64("memory.max_usage_in_bytes"),
                failcnt: self.read_u64("memory.failcnt"),
                memsw_failcnt: self.read_u64("memory.memsw.failcnt"),
                oom_kill: self.keyed("memory.oom_control", "oom_kill"),
                under_oom: self.keyed("memory.oom_control", "under_oom"),
                oom: None,
            },
            Version::V2 => Counters {
                peak: self.read_u64("memory.peak"),
                failcnt: self.keyed("memory.events", "max"),
                memsw_failcnt: None,
                oom_kill: self.keyed("memory.events", "oom_kill"),
                under_oom: None,
                oom: self.keyed("memory.events", "oom"),
            },
        }
    }

    /// Pids still in the group.
    fn members(&self) -> Vec<String> {
        self.read("cgroup.procs").unwrap_or_default().split_whitespace().map(str::to_owned).collect()
    }
}

impl Drop for Group {
    /// Removes the group once it is empty: the server was waited for before, so this only waits for the
    /// kernel to see it gone. A process still in the group (never expected) is left alone and named.
    fn drop(&mut self) {
        for _ in 0..50 {
            match std::fs::remove_dir(&self.files.dir) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        eprintln!(
            "warning: could not remove {} (processes in it: {:?}); remove it with rmdir once they exit",
            self.files.dir.display(),
            self.files.members()
        );
    }
}

/// Parent directories to try under the v1 memory hierarchy at `memory`: this process's own group (a
/// child of it is limited by both), then the root.
fn v1_parents(memory: &Path, own: &str) -> Vec<PathBuf> {
    let mut parents = Vec::new();
    for line in own.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        if controllers.split(',').any(|c| c == "memory") {
            parents.push(memory.join(path.trim_start_matches('/')));
        }
    }
    parents.push(memory.to_owned());
    parents.dedup();
    parents
}

/// Parent directories to try under the v2 hierarchy at `root`. A v2 group with processes cannot enable
/// controllers for children, so this process's own group comes last: first its parent (the server's
/// group is then a sibling of this one), then the root (exempt from that rule).
fn v2_parents(root: &Path, own: &str) -> Vec<PathBuf> {
    let path = own.lines().find_map(|line| line.strip_prefix("0::")).unwrap_or("/").trim_start_matches('/');
    let own_dir = root.join(path);
    let mut parents = Vec::new();
    if !path.is_empty()
        && let Some(parent) = own_dir.parent()
    {
        parents.push(parent.to_owned());
    }
    parents.push(root.to_owned());
    parents.push(own_dir);
    parents.dedup();
    parents
}

fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// Memory charged to the group at one moment.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    /// Everything charged: the process's memory, page cache of the files it wrote, kernel memory.
    pub usage: u64,
    /// Anonymous memory (v1 `total_rss`, v2 `anon`): the process's own, which only an OOM kill frees.
    pub anon: u64,
    /// Page cache (v1 `total_cache`, v2 `file`): reclaimable by writing it back.
    pub file: u64,
}

/// The group's counters, where the kernel has them.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    /// Peak of everything charged (v1 `memory.max_usage_in_bytes`, v2 `memory.peak`).
    pub peak: Option<u64>,
    /// Times the group hit its limit and had to reclaim (v1 `memory.failcnt`, v2 `memory.events` `max`).
    pub failcnt: Option<u64>,
    /// v1 `memory.memsw.failcnt`.
    pub memsw_failcnt: Option<u64>,
    /// Processes the OOM killer killed in the group.
    pub oom_kill: Option<u64>,
    /// v1: the group is in an OOM state now.
    pub under_oom: Option<u64>,
    /// v2 `memory.events` `oom`: times reclaim failed.
    pub oom: Option<u64>,
}

/// `bytes` in MiB, for tables.
pub fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / MIB as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_tries_the_own_memory_group_then_the_root() {
        let own = "9:name=systemd:/\n4:memory:/process_api/abc\n3:cpuset:/\n";
        let parents = v1_parents(Path::new("/sys/fs/cgroup/memory"), own);
        assert_eq!(
            parents,
            [PathBuf::from("/sys/fs/cgroup/memory/process_api/abc"), PathBuf::from("/sys/fs/cgroup/memory")]
        );
        assert_eq!(v1_parents(Path::new("/m"), "4:memory:/\n"), [PathBuf::from("/m")]);
    }

    #[test]
    fn v2_tries_a_sibling_then_the_root_then_the_own_group() {
        let parents = v2_parents(Path::new("/sys/fs/cgroup"), "0::/user.slice/session-1.scope\n");
        assert_eq!(
            parents,
            [
                PathBuf::from("/sys/fs/cgroup/user.slice"),
                PathBuf::from("/sys/fs/cgroup"),
                PathBuf::from("/sys/fs/cgroup/user.slice/session-1.scope"),
            ]
        );
        // Inside a cgroup namespace the own group is the root.
        assert_eq!(v2_parents(Path::new("/sys/fs/cgroup"), "0::/\n"), [PathBuf::from("/sys/fs/cgroup")]);
    }

    #[test]
    fn keyed_files_are_read_by_key() {
        let oom_control = "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n";
        assert_eq!(keyed(oom_control, "oom_kill"), Some(2));
        assert_eq!(keyed(oom_control, "under_oom"), Some(0));
        assert_eq!(keyed("low 0\nhigh 0\nmax 17\noom 1\noom_kill 1\n", "max"), Some(17));
        assert_eq!(keyed("total_rss 4096\n", "rss"), None);
    }
}
