//! One client connection, served on its own OS thread: peer check, handshake, then
//! request/response until the client leaves or the daemon shuts down.

use super::log;
use super::state::{ConnectionGuard, Daemon};
use crate::handlers::{self, After};
use crate::shm::Peer;
use autozyme_protocol::{
    decode, write_frame, ErrorKind, Request, Response, MAX_FRAME_BYTES, PROTOCOL_VERSION,
};
use interprocess::local_socket::traits::{Stream as _, StreamCommon};
use interprocess::local_socket::Stream;
use std::io::{ErrorKind as IoErrorKind, Read};
use std::sync::atomic::Ordering;
use std::time::Duration;

/// How often a connection blocked in a read re-checks the shutdown flag.
const READ_POLL: Duration = Duration::from_millis(200);
/// A client that stops reading its replies cannot pin a thread forever.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

enum ReadOutcome {
    Frame(Vec<u8>),
    /// The client closed the connection between frames.
    Closed,
    ShuttingDown,
    TooLarge(u32),
    Failed(std::io::Error),
}

/// Reads one frame, waking every [`READ_POLL`] to check for shutdown.
///
/// A frame may arrive in pieces across several timeouts, so all partial state lives
/// in this function's loop and nothing read is ever dropped on a timeout.
fn read_frame(stream: &Stream, daemon: &Daemon) -> ReadOutcome {
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match (&mut &*stream).read(&mut header[got..]) {
            Ok(0) if got == 0 => return ReadOutcome::Closed,
            Ok(0) => return ReadOutcome::Failed(IoErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) => {
                if let Some(outcome) = read_error(e, daemon) {
                    return outcome;
                }
            }
        }
    }
    let len = u32::from_le_bytes(header);
    if len > MAX_FRAME_BYTES {
        return ReadOutcome::TooLarge(len);
    }
    let len = len as usize;
    // Grown as bytes arrive rather than allocated from the announced length.
    let mut payload = Vec::with_capacity(len.min(1 << 20));
    let mut buf = vec![0u8; len.min(1 << 16)];
    while payload.len() < len {
        let want = (len - payload.len()).min(buf.len());
        match (&mut &*stream).read(&mut buf[..want]) {
            Ok(0) => return ReadOutcome::Failed(IoErrorKind::UnexpectedEof.into()),
            Ok(n) => payload.extend_from_slice(&buf[..n]),
            Err(e) => {
                if let Some(outcome) = read_error(e, daemon) {
                    return outcome;
                }
            }
        }
    }
    ReadOutcome::Frame(payload)
}

/// `None` to keep reading (a timeout or interrupt while the daemon runs on).
fn read_error(e: std::io::Error, daemon: &Daemon) -> Option<ReadOutcome> {
    match e.kind() {
        IoErrorKind::WouldBlock | IoErrorKind::TimedOut | IoErrorKind::Interrupted => {
            daemon.shutting_down().then_some(ReadOutcome::ShuttingDown)
        }
        _ => Some(ReadOutcome::Failed(e)),
    }
}

/// Sends `response`; false if the client is gone (its reply is simply dropped).
fn send(stream: &Stream, response: &Response) -> bool {
    write_frame(&mut &*stream, response).is_ok()
}

fn count(daemon: &Daemon, response: &Response) {
    let counter = if matches!(response, Response::Error { .. }) {
        &daemon.requests_failed
    } else {
        &daemon.requests_served
    };
    counter.fetch_add(1, Ordering::SeqCst);
}

/// Serves one connection to the end. Never panics on anything the client sends.
pub fn serve(daemon: &Daemon, stream: Stream, id: u64) {
    let _open = ConnectionGuard::new(daemon);

    // Only our own user may use us: the segments we map and the memory we write
    // belong to whoever connects.
    let (peer_uid, peer_pid) = match stream.peer_creds().map(|c| (c.euid(), c.pid())) {
        Ok((Some(uid), Some(pid))) => (uid, pid),
        other => {
            log(&format!(
                "connection {id}: cannot read peer credentials ({other:?}); closing"
            ));
            return;
        }
    };
    if peer_uid != daemon.euid {
        log(&format!(
            "connection {id}: peer uid {peer_uid} is not ours ({}); closing",
            daemon.euid
        ));
        return;
    }
    if let Err(e) = stream
        .set_recv_timeout(Some(READ_POLL))
        .and_then(|()| stream.set_send_timeout(Some(WRITE_TIMEOUT)))
    {
        log(&format!(
            "connection {id}: cannot set socket timeouts: {e}; closing"
        ));
        return;
    }

    if !handshake(daemon, &stream, id) {
        return;
    }

    loop {
        let payload = match read_frame(&stream, daemon) {
            ReadOutcome::Frame(p) => p,
            ReadOutcome::Closed | ReadOutcome::ShuttingDown => return,
            ReadOutcome::TooLarge(len) => {
                log(&format!(
                    "connection {id}: frame of {len} bytes exceeds {MAX_FRAME_BYTES}; closing"
                ));
                return;
            }
            ReadOutcome::Failed(e) => {
                log(&format!("connection {id}: read failed: {e}; closing"));
                return;
            }
        };
        if daemon.shutting_down() {
            // Arrived after shutdown began: not started, the client sees EOF.
            return;
        }
        let in_flight = daemon.begin_request();
        let request: Request = match decode(&payload) {
            Ok(r) => r,
            Err(e) => {
                let response = Response::error(ErrorKind::BadRequest, e.to_string());
                count(daemon, &response);
                send(&stream, &response);
                log(&format!("connection {id}: {e}; closing"));
                return;
            }
        };
        let (response, after) = handlers::handle(
            daemon,
            Peer {
                uid: peer_uid,
                pid: peer_pid,
            },
            request,
        );
        count(daemon, &response);
        if let Response::Error { kind, message } = &response {
            log(&format!("connection {id}: {kind:?}: {message}"));
        }
        let sent = send(&stream, &response);
        drop(in_flight);
        if after == After::Shutdown {
            log(&format!("connection {id}: shutdown requested"));
            daemon.request_shutdown();
            return;
        }
        if !sent {
            return;
        }
    }
}

/// Reads the first frame, which must be a `Hello` with our protocol version, and
/// answers it. False if the connection should close.
fn handshake(daemon: &Daemon, stream: &Stream, id: u64) -> bool {
    let payload = match read_frame(stream, daemon) {
        ReadOutcome::Frame(p) => p,
        _ => return false,
    };
    daemon.touch();
    let failure = match decode::<Request>(&payload) {
        Ok(Request::Hello {
            protocol_version, ..
        }) if protocol_version == PROTOCOL_VERSION => {
            // A build-id mismatch is for the client to act on, not us.
            let reply = handlers::hello(daemon);
            count(daemon, &reply);
            return send(stream, &reply);
        }
        Ok(Request::Hello {
            protocol_version, ..
        }) => format!(
            "client speaks protocol version {protocol_version}, this daemon speaks {PROTOCOL_VERSION}"
        ),
        Ok(other) => format!("the first message must be Hello, not {}", variant_name(&other)),
        Err(e) => format!("the first message must be Hello ({e})"),
    };
    log(&format!("connection {id}: handshake failed: {failure}"));
    let reply = Response::error(ErrorKind::Handshake, failure);
    count(daemon, &reply);
    send(stream, &reply);
    false
}

pub(crate) fn variant_name(request: &Request) -> &'static str {
    match request {
        Request::Hello { .. } => "Hello",
        Request::Ping => "Ping",
        Request::Status => "Status",
        Request::Shutdown => "Shutdown",
        Request::RowSums { .. } => "RowSums",
        Request::DivideRows { .. } => "DivideRows",
        Request::Prefault { .. } => "Prefault",
        Request::Lease { .. } => "Lease",
        Request::Release { .. } => "Release",
        Request::Sleep { .. } => "Sleep",
        Request::ScaleStats { .. } => "ScaleStats",
        Request::ScaleApply { .. } => "ScaleApply",
        Request::HvgMeanVar { .. } => "HvgMeanVar",
        Request::HvgClippedSums { .. } => "HvgClippedSums",
        Request::RankGenesGroups { .. } => "RankGenesGroups",
        Request::Leiden { .. } => "Leiden",
        Request::Fingerprint { .. } => "Fingerprint",
        Request::RankGenesGroupsGroupSums { .. } => "RankGenesGroupsGroupSums",
        Request::HvgBatchWelford { .. } => "HvgBatchWelford",
        Request::ScaleChunkStats { .. } => "ScaleChunkStats",
        Request::HvgClippedSumsFrom { .. } => "HvgClippedSumsFrom",
        Request::UmapLayout { .. } => "UmapLayout",
    }
}
