//! Mapping client segments, with a cache keyed by name.
//!
//! Mapping a large segment and faulting its pages in costs real time, and the shim
//! sends the same segments again and again (adopted AnnData buffers), so mappings
//! are kept. Every use still re-opens the name and compares device, inode and size
//! (one open + fstat), so a segment that was replaced or resized is remapped, never
//! served from a stale mapping.

use super::names::{self, SHM_DIR};
use crate::error::{Failure, Result};
use memmap2::{MmapOptions, MmapRaw};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::sync::{Arc, Mutex, MutexGuard};

/// One shared read-write mapping of a whole segment file.
#[derive(Debug)]
pub struct Mapping {
    pub name: String,
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    map: MmapRaw,
}

impl Mapping {
    /// Start of the mapping. Writes through it are how in-place kernels reach the
    /// client's arrays; see `view` for how slices are made from it.
    pub fn base(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// Same file as `other` (hard links or a reused name included).
    pub fn same_file(&self, other: &Mapping) -> bool {
        self.dev == other.dev && self.ino == other.ino
    }
}

#[derive(Default)]
pub struct SegmentCache {
    mappings: Mutex<HashMap<String, Arc<Mapping>>>,
}

impl SegmentCache {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<Mapping>>> {
        // A panic elsewhere never leaves the map half-updated (single inserts and
        // removes), so a poisoned lock is still usable.
        self.mappings.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The mapping of segment `name` on behalf of a peer with effective uid
    /// `peer_uid`: the name must be `azm_<peer_uid>_<pid>_<seq>` and the file a
    /// regular file owned by that uid.
    pub fn get(&self, name: &str, peer_uid: u32) -> Result<Arc<Mapping>> {
        names::validate_for_uid(name, peer_uid).map_err(Failure::segment)?;
        let file = open_segment(name)?;
        let meta = file
            .metadata()
            .map_err(|e| Failure::segment(format!("cannot stat segment {name}: {e}")))?;
        if !meta.file_type().is_file() {
            return Err(Failure::segment(format!(
                "segment {name} is not a regular file"
            )));
        }
        if meta.uid() != peer_uid {
            return Err(Failure::segment(format!(
                "segment {name} is owned by uid {}, not by the connected user (uid {peer_uid})",
                meta.uid()
            )));
        }
        let (dev, ino, size) = (meta.dev(), meta.ino(), meta.size());

        if let Some(m) = self.lock().get(name) {
            if m.dev == dev && m.ino == ino && m.size == size {
                return Ok(Arc::clone(m));
            }
        }
        let len = usize::try_from(size)
            .map_err(|_| Failure::segment(format!("segment {name} is too large to map")))?;
        // Populate the whole mapping at once: faulting tmpfs pages in one by one
        // (4 KiB each, as shared memory rarely gets huge pages) costs about ten
        // times more than the kernel filling the page table in bulk.
        let map = MmapOptions::new()
            .len(len)
            .populate()
            .map_raw(&file)
            .map_err(|e| Failure::segment(format!("cannot map segment {name}: {e}")))?;
        Ok(self.keep(name, dev, ino, size, map))
    }

    /// Caches `map` as segment `name`'s mapping. A request still using an older
    /// mapping of the name keeps that alive through its Arc.
    fn keep(&self, name: &str, dev: u64, ino: u64, size: u64, map: MmapRaw) -> Arc<Mapping> {
        let mapping = Arc::new(Mapping {
            name: name.to_string(),
            dev,
            ino,
            size,
            map,
        });
        self.lock().insert(name.to_string(), Arc::clone(&mapping));
        mapping
    }

    /// Caches the mapping of segment `name`, which this daemon has just created as
    /// `file` for a client with uid `peer_uid`: `map`, the mapping its pages were
    /// populated through, when there is one, else a new one as [`Self::get`] makes.
    pub fn insert_created(
        &self,
        name: &str,
        peer_uid: u32,
        file: &File,
        map: Option<MmapRaw>,
    ) -> Result<Arc<Mapping>> {
        let Some(map) = map else {
            return self.get(name, peer_uid);
        };
        names::validate_for_uid(name, peer_uid).map_err(Failure::segment)?;
        let meta = file
            .metadata()
            .map_err(|e| Failure::segment(format!("cannot stat segment {name}: {e}")))?;
        if map.len() as u64 != meta.size() {
            return Err(Failure::segment(format!(
                "segment {name} changed size while it was created"
            )));
        }
        Ok(self.keep(name, meta.dev(), meta.ino(), meta.size(), map))
    }

    /// Number of cached mappings and their total size.
    pub fn stats(&self) -> (u32, u64) {
        let map = self.lock();
        let bytes = map.values().map(|m| m.size).sum();
        (u32::try_from(map.len()).unwrap_or(u32::MAX), bytes)
    }

    /// Drops mappings whose name is gone from `/dev/shm` or now names a different
    /// file, so memory of segments the client has released is returned. Returns how
    /// many were dropped.
    pub fn prune(&self) -> usize {
        let names: Vec<(String, u64, u64)> = self
            .lock()
            .values()
            .map(|m| (m.name.clone(), m.dev, m.ino))
            .collect();
        let stale: Vec<(String, u64, u64)> = names
            .into_iter()
            .filter(
                |(name, dev, ino)| match std::fs::symlink_metadata(names::path_of(name)) {
                    Ok(meta) => meta.dev() != *dev || meta.ino() != *ino,
                    Err(_) => true,
                },
            )
            .collect();
        let mut map = self.lock();
        let mut dropped = 0;
        for (name, dev, ino) in &stale {
            // Only if a request did not remap the name in the meantime.
            if map
                .get(name)
                .is_some_and(|m| m.dev == *dev && m.ino == *ino)
            {
                map.remove(name);
                dropped += 1;
            }
        }
        dropped
    }
}

/// Opens `/dev/shm/<name>` read-write without following a symlink there.
fn open_segment(name: &str) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        // O_CLOEXEC is added by std on every open. O_NONBLOCK keeps a FIFO planted
        // under a segment's name from blocking the open; the fstat then rejects it.
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(names::path_of(name))
        .map_err(|e| Failure::segment(format!("cannot open segment {name} in {SHM_DIR}: {e}")))
}
