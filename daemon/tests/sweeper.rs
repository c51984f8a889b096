//! The segment sweeper. In a test binary of its own, so no other daemon of this
//! suite runs meanwhile. Any daemon of the same user (another one on the machine)
//! sweeps the same segments, so the test checks that they go, not who removed them.

mod common;

use common::*;
use std::time::Duration;

#[test]
fn sweeper_unlinks_segments_of_dead_clients() {
    let dead = dead_pid() as u64;
    let mut before = Segment::named_for_pid(dead);
    before.f32s(&[1.0]);
    before.write();
    let mut alive = Segment::new();
    alive.f32s(&[1.0]);
    alive.write();

    let d = TestDaemon::start(&[], &[]);
    // Swept once at startup, before READY.
    assert!(!before.path.exists(), "startup sweep\n{}", d.log());

    // And periodically (every 10 s) afterwards.
    let mut after = Segment::named_for_pid(dead);
    after.f32s(&[1.0]);
    after.write();
    assert!(
        wait_for(Duration::from_secs(15), || !after.path.exists()),
        "periodic sweep\n{}",
        d.log()
    );
    assert!(alive.path.exists(), "a live client's segment must stay");
}
