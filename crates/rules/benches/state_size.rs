//! Bytes of state per user for the nine SPEC segments over a large user base with
//! a realistic event mix (see `common`), including the user map: heap bytes
//! counted by the allocator and resident memory from /proc, both divided by the
//! number of users. Also prints plain wall-clock throughput of the warm-up.
//!
//! `cargo bench -p dynseg-rules --bench state_size` (DYNSEG_BENCH_USERS changes
//! the user count, 1,000,000 by default; DYNSEG_BENCH_EVENTS_PER_USER the history,
//! 25 events per user over 30 days by default). It runs on mimalloc, as the
//! node does; `--features system-allocator` runs it on the system allocator.

#![allow(unsafe_code, clippy::unwrap_used, clippy::print_stdout, missing_docs)]

mod common;

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use common::{Users, Workload, spec_plan};
use dynseg_rules::Span;

/// The allocator underneath: mimalloc, as in the node, or the system's with
/// `--features system-allocator`.
#[cfg(not(feature = "system-allocator"))]
use mimalloc::MiMalloc as Inner;
#[cfg(feature = "system-allocator")]
use std::alloc::System as Inner;

/// Counts live heap bytes.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: defers to the inner allocator and only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { Inner.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { Inner.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { Inner.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Events generated and applied per round.
const CHUNK: usize = 100_000;

fn resident_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn main() {
    // `cargo bench --no-run` never gets here; `cargo test --benches` passes --bench-less args.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let n: usize = std::env::var("DYNSEG_BENCH_USERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let plan = spec_plan();
    let per_user: usize = std::env::var("DYNSEG_BENCH_EVENTS_PER_USER")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(25);
    let events = n * per_user;
    let per_event = Span(Span::days(30).millis() / events as i64);
    let mut workload = Workload::new(n, per_event, 7);
    // The harness's own working set (a chunk of generated events, freed after
    // each round) is resident before counting starts: an allocator that keeps
    // freed memory for reuse by the same sizes, as mimalloc does, would
    // otherwise count it as the users'.
    let mut batch = Vec::with_capacity(CHUNK);
    let mut other = Workload::new(n, per_event, 8);
    batch.extend((0..CHUNK).map(|_| (other.next_event(), other.now())));
    batch.clear();
    drop(other);
    let (heap_before, rss_before) = (LIVE.load(Ordering::Relaxed), resident_bytes());
    let mut users = Users::default();
    users.states.reserve(n);
    let mut changes = Vec::new();
    let mut changed = 0usize;
    let mut busy = std::time::Duration::ZERO;
    let mut done = 0;
    while done < events {
        batch.clear();
        let chunk = (events - done).min(CHUNK);
        batch.extend((0..chunk).map(|_| (workload.next_event(), workload.now())));
        let start = Instant::now();
        for (event, now) in &batch {
            users.apply(&plan, event, *now, &mut changes);
            changed += changes.len();
            changes.clear();
        }
        busy += start.elapsed();
        done += chunk;
    }
    drop(batch);
    let heap = LIVE.load(Ordering::Relaxed) - heap_before;
    let rss = resident_bytes().saturating_sub(rss_before);
    let count = users.states.len();
    let engine_heap: usize = users.states.values().map(|s| s.heap_bytes()).sum();
    println!("users with state:        {count}");
    println!("events applied:          {events} ({changed} membership changes)");
    println!(
        "apply throughput:        {:.2} M events/s (one core, wall clock of apply only)",
        events as f64 / busy.as_secs_f64() / 1e6
    );
    println!(
        "heap per user:           {:.0} bytes (allocator count: map, keys, states)",
        heap as f64 / count as f64
    );
    println!(
        "resident per user:       {:.0} bytes (RSS growth / users)",
        rss as f64 / count as f64
    );
    println!(
        "state-owned heap / user: {:.0} bytes (UserState::heap_bytes, excluding the map)",
        engine_heap as f64 / count as f64
    );
    println!(
        "size_of::<UserState>():  {} bytes",
        std::mem::size_of::<dynseg_rules::UserState>()
    );
    let mut members = [0usize; 9];
    for state in users.states.values() {
        for (i, id) in plan.segment_ids().enumerate() {
            if plan.is_member(state, id.as_str()) {
                members[i] += 1;
            }
        }
    }
    for (id, m) in plan.segment_ids().zip(members) {
        println!("  {id:<20} {m} members");
    }
}
