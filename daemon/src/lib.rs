//! `autozymed`: the autozyme daemon. It maps the Python shim's shared-memory
//! segments and runs scanpy's heavy kernels on them, bit-identically to upstream.
//!
//! Layout: `server` (lifecycle, accept loop, connections), `shm` (segments and
//! checked views), `kernels` (pure numerical functions), `handlers` (requests to
//! kernels), `config` (command line, environment, runtime dir).

pub mod cache;
pub mod config;
pub mod error;
pub mod faults;
pub mod handlers;
pub mod kernels;
pub mod peer_csr;
pub mod server;
pub mod shm;
pub mod streaming;
