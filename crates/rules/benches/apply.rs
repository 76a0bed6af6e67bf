//! Events per second through `apply` for the nine SPEC segments over a large user
//! base with a realistic event mix (see `common`). Two variants: `direct` finds
//! each user's state by index (the engine alone), `user_map` looks it up in a hash
//! map keyed by user id, as a node would. Generating the events is not timed.
//!
//! `cargo bench -p dynseg-rules --bench apply` (set DYNSEG_BENCH_USERS to change
//! the user count, 1,000,000 by default). It runs on mimalloc, as the node does;
//! `--features system-allocator` runs it on the system allocator.

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

// The node's allocator (`--features system-allocator`: the system's).
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::hint::black_box;
use std::time::{Duration, Instant};

use common::{Users, Workload, spec_plan};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dynseg_rules::{Event, Span, Timestamp, UserState};

fn users() -> usize {
    std::env::var("DYNSEG_BENCH_USERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

fn bench_apply(c: &mut Criterion) {
    let plan = spec_plan();
    let n = users();
    // 30 simulated days of history: 25 events per user.
    let warm_events = n * 25;
    let per_event = Span(Span::days(30).millis() / warm_events as i64);
    let mut workload = Workload::new(n, per_event, 7);
    let mut direct: Vec<UserState> = (0..n).map(|_| plan.new_state()).collect();
    let mut users = Users::default();
    let mut changes = Vec::new();
    for _ in 0..warm_events {
        let (index, event) = workload.next_indexed();
        plan.apply(&mut direct[index], &event, workload.now(), &mut changes);
        users.apply(&plan, &event, workload.now(), &mut changes);
        changes.clear();
    }
    let mut group = c.benchmark_group("apply");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(10));
    group.bench_function(format!("direct/{n}_users"), |b| {
        b.iter_custom(|iters| {
            timed_chunks(iters, &mut workload, |(index, event), now| {
                plan.apply(&mut direct[*index], event, now, &mut changes);
                changes.clear();
            })
        });
    });
    group.bench_function(format!("direct_prefetch/{n}_users"), |b| {
        b.iter_custom(|iters| {
            timed_batches(iters, &mut workload, |batch| {
                // What a node's shard loop does with a batch: ask for each state
                // eight events ahead and for its arena four ahead, so cache misses
                // overlap with applying the events before.
                for (i, ((index, event), now)) in batch.iter().enumerate() {
                    if let Some(((ahead, _), _)) = batch.get(i + 8) {
                        dynseg_rules::prefetch_line(&direct[*ahead]);
                    }
                    if let Some(((ahead, _), _)) = batch.get(i + 4) {
                        direct[*ahead].prefetch();
                    }
                    plan.apply(&mut direct[*index], event, *now, &mut changes);
                    changes.clear();
                }
            })
        });
    });
    group.bench_function(format!("user_map/{n}_users"), |b| {
        b.iter_custom(|iters| {
            timed_chunks(iters, &mut workload, |(_, event), now| {
                users.apply(&plan, event, now, &mut changes);
                changes.clear();
            })
        });
    });
    group.finish();
    black_box((&direct, &users));
}

/// Runs `apply` on each of `iters` fresh events, generated in chunks outside the
/// timing.
fn timed_chunks(
    iters: u64,
    workload: &mut Workload,
    mut apply: impl FnMut(&(usize, Event), Timestamp),
) -> Duration {
    timed_batches(iters, workload, |batch| {
        for (event, now) in batch {
            apply(event, *now);
        }
    })
}

/// Runs `apply` on chunks of `iters` fresh events in total; generating them is
/// not timed.
fn timed_batches(
    iters: u64,
    workload: &mut Workload,
    mut apply: impl FnMut(&[((usize, Event), Timestamp)]),
) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let chunk = left.min(100_000);
        let events: Vec<_> = (0..chunk)
            .map(|_| (workload.next_indexed(), workload.now()))
            .collect();
        let start = Instant::now();
        apply(&events);
        total += start.elapsed();
        left -= chunk;
    }
    total
}

criterion_group!(benches, bench_apply);
criterion_main!(benches);
