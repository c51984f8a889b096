//! Any decodable request, handled by a real daemon state with this process as the
//! peer: validation must turn everything into a response (mostly errors), never a
//! panic or abort. Requests that only consume resources by design are tamed first:
//! leases never create segments, sleeps are refused (test hooks are off), and the
//! peer is a pid that does not exist, so a `Peer` address is never really read
//! or written (here it would be the fuzzer's own memory).
#![no_main]
use autozyme_protocol::{decode, Request};
use autozymed::config::Config;
use autozymed::handlers::handle;
use autozymed::server::state::Daemon;
use autozymed::shm::Peer;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn daemon() -> &'static Daemon {
    static DAEMON: OnceLock<Daemon> = OnceLock::new();
    DAEMON.get_or_init(|| {
        // A small memory budget: requests may allocate up to it by design (per-task
        // partials, unbacked dimensions, copies of peer arrays), and the fuzzer's
        // RSS limit is there to catch what exceeds the budget, not what honours it.
        std::env::set_var("AUTOZYME_MAX_BYTES", (256u64 << 20).to_string());
        Daemon::new(Config {
            runtime_dir: std::env::temp_dir(),
            threads: 2,
            idle_timeout_s: 0,
            test_hooks: false,
        })
    })
}

fuzz_target!(|bytes: &[u8]| {
    let Ok(mut request) = decode::<Request>(bytes) else {
        return;
    };
    if let Request::Lease { create, .. } = &mut request {
        *create = false;
    }
    let peer = Peer {
        uid: daemon().euid,
        pid: i32::MAX,
    };
    let _ = handle(daemon(), peer, request);
});
