//! Settings resolved from the command line, then the environment, then defaults.

use std::ffi::OsString;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub const DEFAULT_IDLE_TIMEOUT_S: u64 = 1800;

/// The daemon's build id, `<version>+<hash of protocol and daemon sources>` (see
/// build.rs).
pub const BUILD_ID: &str = env!("AUTOZYMED_BUILD_ID");
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What the command line said; `None` means "not given".
#[derive(Debug, Default, Clone, PartialEq)]
pub struct CliOptions {
    pub runtime_dir: Option<PathBuf>,
    pub threads: Option<usize>,
    pub idle_timeout_s: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub runtime_dir: PathBuf,
    pub threads: usize,
    /// 0 means never exit for idleness.
    pub idle_timeout_s: u64,
    /// `AUTOZYME_TEST_HOOKS=1`: allow the `Sleep` request.
    pub test_hooks: bool,
}

impl Config {
    pub fn socket_path(&self) -> PathBuf {
        self.runtime_dir.join("daemon.sock")
    }

    pub fn pid_path(&self) -> PathBuf {
        self.runtime_dir.join("daemon.pid")
    }
}

fn env_nonempty(key: &str) -> Option<OsString> {
    std::env::var_os(key).filter(|v| !v.is_empty())
}

fn env_parsed<T: std::str::FromStr>(key: &str) -> Result<Option<T>, String> {
    match env_nonempty(key) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .and_then(|s| s.trim().parse().ok())
            .map(Some)
            .ok_or_else(|| format!("{key}={v:?} is not a valid number")),
    }
}

/// A field of `/proc/meminfo` in bytes (`MemAvailable`, `MemTotal`, ...); 0 when
/// it cannot be read.
pub fn meminfo_bytes(field: &str) -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    kib * 1024
}

pub fn euid() -> u32 {
    // SAFETY: geteuid cannot fail and has no preconditions.
    unsafe { libc::geteuid() }
}

/// `--runtime-dir`, else `AUTOZYME_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/autozyme`
/// when that is an existing directory, else `<temp dir>/autozyme-<euid>`.
pub fn default_runtime_dir(cli: Option<&Path>) -> PathBuf {
    if let Some(dir) = cli {
        return dir.to_path_buf();
    }
    if let Some(dir) = env_nonempty("AUTOZYME_RUNTIME_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(xdg) = env_nonempty("XDG_RUNTIME_DIR").map(PathBuf::from) {
        if xdg.is_dir() {
            return xdg.join("autozyme");
        }
    }
    std::env::temp_dir().join(format!("autozyme-{}", euid()))
}

/// Creates the runtime dir (only its last component) with mode 0700 and checks it
/// is a real directory, ours, and closed to group and others: the socket and pid
/// file inside must not be reachable or replaceable by anyone else.
pub fn prepare_runtime_dir(dir: &Path) -> Result<(), String> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("cannot create runtime dir {}: {e}", dir.display())),
    }
    let meta = std::fs::symlink_metadata(dir)
        .map_err(|e| format!("cannot stat runtime dir {}: {e}", dir.display()))?;
    if !meta.file_type().is_dir() {
        return Err(format!(
            "runtime dir {} is not a directory (a symlink or other file is in the way)",
            dir.display()
        ));
    }
    if meta.uid() != euid() {
        return Err(format!(
            "runtime dir {} is owned by uid {}, not by us (uid {})",
            dir.display(),
            meta.uid(),
            euid()
        ));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "runtime dir {} has mode {mode:o}; it must not be accessible to group or others (chmod 700)",
            dir.display()
        ));
    }
    Ok(())
}

/// Resolves every setting. Errors are for the user (bad environment values).
pub fn resolve(cli: &CliOptions) -> Result<Config, String> {
    let threads = match cli.threads {
        Some(n) => n,
        None => match env_parsed::<usize>("AUTOZYME_THREADS")? {
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        },
    };
    if threads == 0 {
        return Err("the thread count must be at least 1".to_string());
    }
    let idle_timeout_s = match cli.idle_timeout_s {
        Some(s) => s,
        None => env_parsed::<u64>("AUTOZYME_IDLE_TIMEOUT")?.unwrap_or(DEFAULT_IDLE_TIMEOUT_S),
    };
    Ok(Config {
        runtime_dir: default_runtime_dir(cli.runtime_dir.as_deref()),
        threads,
        idle_timeout_s,
        test_hooks: std::env::var_os("AUTOZYME_TEST_HOOKS").is_some_and(|v| v == "1"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_fields_are_read_exactly_by_name() {
        let total = meminfo_bytes("MemTotal");
        assert!(total > 0);
        assert!(meminfo_bytes("MemAvailable") <= total);
        assert_eq!(meminfo_bytes("Mem"), 0); // a prefix of a name is not a field
        assert_eq!(meminfo_bytes("NoSuchField"), 0);
    }

    #[test]
    fn build_id_has_version_and_16_hex_digits() {
        let (version, hash) = BUILD_ID.split_once('+').expect("a '+' in the build id");
        assert_eq!(version, VERSION);
        assert_eq!(hash.len(), 16);
        assert!(hash.bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn runtime_dir_checks() {
        let base = std::env::temp_dir().join(format!("azm-config-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir(&base).unwrap();

        let good = base.join("good");
        prepare_runtime_dir(&good).unwrap();
        let mode = std::fs::metadata(&good).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        // Existing and fine: still fine.
        prepare_runtime_dir(&good).unwrap();

        let open = base.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(prepare_runtime_dir(&open).unwrap_err().contains("mode"));

        let link = base.join("link");
        std::os::unix::fs::symlink(&good, &link).unwrap();
        assert!(prepare_runtime_dir(&link)
            .unwrap_err()
            .contains("not a directory"));

        let file = base.join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(prepare_runtime_dir(&file).is_err());

        // Only the last component is created.
        assert!(prepare_runtime_dir(&base.join("missing/deeper")).is_err());

        std::fs::remove_dir_all(&base).unwrap();
    }
}
