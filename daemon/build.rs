//! Computes the daemon's build id: `<version>+<16 hex digits>`, where the digits are
//! an FNV-1a 64 hash over every file under `protocol/src` and `daemon/src` (relative
//! path and contents, sorted by path). The Python shim compares it with the id it was
//! built against, so it must change whenever either crate's source changes.

use std::fs;
use std::path::{Path, PathBuf};

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            collect_files(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn main() {
    let daemon_dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let workspace = daemon_dir
        .parent()
        .expect("daemon/ sits inside the workspace");
    let roots = [workspace.join("protocol/src"), daemon_dir.join("src")];

    let mut files = Vec::new();
    for root in &roots {
        // A directory given to rerun-if-changed makes cargo rerun us when anything
        // inside it changes (added, removed or edited files).
        println!("cargo:rerun-if-changed={}", root.display());
        collect_files(root, &mut files);
    }
    // Hash paths relative to the workspace so the id does not depend on where the
    // checkout lives, and sort them so it does not depend on directory order.
    let mut relative: Vec<(String, PathBuf)> = files
        .into_iter()
        .map(|p| {
            let rel = p
                .strip_prefix(workspace)
                .unwrap_or(&p)
                .to_string_lossy()
                .into_owned();
            (rel, p)
        })
        .collect();
    relative.sort();

    let mut hash = FNV_OFFSET;
    for (rel, path) in &relative {
        let contents = fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        // Length prefixes keep "ab"+"c" and "a"+"bc" from hashing alike.
        hash = fnv1a(hash, &(rel.len() as u64).to_le_bytes());
        hash = fnv1a(hash, rel.as_bytes());
        hash = fnv1a(hash, &(contents.len() as u64).to_le_bytes());
        hash = fnv1a(hash, &contents);
    }
    let version = std::env::var("CARGO_PKG_VERSION").expect("CARGO_PKG_VERSION");
    println!("cargo:rustc-env=AUTOZYMED_BUILD_ID={version}+{hash:016x}");
}
