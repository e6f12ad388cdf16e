//! The scheduler-bound workloads: `bench-work yield|pingpong|spawn`, each
//! done in batches for `--seconds S`, flat out or at a fixed offered load of
//! `--rate R` batches a second. Options: `--workers W` (runtime workers,
//! default 1), `--batch B` (ops per batch).
//!
//! Each prints `ready`, waits for a line on stdin, does its work, and prints
//! one `result ...` line (see `bench_workloads::print_result`). All the work
//! runs inside spawned tasks, never in `block_on`'s own future, because only
//! tasks are polled through the functions the tracer probes.

use std::time::Duration;

use bench_workloads::{Args, Latencies, Load, drive, fail, print_result, runtime, wait_for_go};
use tokio::sync::mpsc;

fn main() {
    let args = Args::from_env();
    let workload = args.positional.first().map(String::as_str).unwrap_or("");
    let workers = args.count("workers", 1) as usize;
    let runtime = runtime(workers);
    wait_for_go();
    let report = match workload {
        "yield" => runtime.block_on(yield_loop(&args)),
        "pingpong" => runtime.block_on(ping_pong(&args)),
        "spawn" => runtime.block_on(spawn_many(&args)),
        other => fail(&format!(
            "unknown workload '{other}' (yield, pingpong or spawn)"
        )),
    };
    let (ops, elapsed, polls, mut latencies) = report;
    print_result(ops, elapsed, polls, &mut latencies);
}

type Report = (u64, Duration, u64, Latencies);

/// A batch is one task that yields `batch` times: each yield is one poll
/// that returns Pending and one more poll later, so this is the workload
/// with the least work per poll.
async fn yield_loop(args: &Args) -> Report {
    let batch = args.count("batch", 4000);
    let load = Load::from_args(args);
    let (elapsed, latencies) = tokio::spawn(drive(load, (), move |()| async move {
        tokio::spawn(async move {
            for _ in 0..batch {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the yielding task does not panic");
    }))
    .await
    .expect("the driver does not panic");
    let batches = latencies.len() as u64;
    // Per batch: batch + 1 polls of the yielding task, one of the driver
    // when the yielding task's end wakes it.
    (batches * batch, elapsed, batches * (batch + 2), latencies)
}

/// A batch is `batch` round trips between two tasks over bounded channels:
/// every message wakes the other task, the pattern of request/response
/// pipelines inside a service.
async fn ping_pong(args: &Args) -> Report {
    let batch = args.count("batch", 2000);
    let load = Load::from_args(args);
    let (to_pong, mut pong_inbox) = mpsc::channel::<u64>(1);
    let (to_ping, ping_inbox) = mpsc::channel::<u64>(1);
    tokio::spawn(async move {
        while let Some(n) = pong_inbox.recv().await {
            if to_ping.send(n).await.is_err() {
                break;
            }
        }
    });
    let channels = (to_pong, ping_inbox);
    let (elapsed, latencies) = tokio::spawn(drive(load, channels, move |channels| async move {
        let (to_pong, mut inbox) = channels;
        for n in 0..batch {
            to_pong.send(n).await.expect("the pong task is running");
            inbox.recv().await.expect("the pong task answers");
        }
        (to_pong, inbox)
    }))
    .await
    .expect("the driver does not panic");
    let batches = latencies.len() as u64;
    // Each round trip wakes and polls each side once.
    (batches * batch, elapsed, batches * batch * 2, latencies)
}

/// A batch spawns `batch` short tasks and waits for them all: the
/// spawn-heavy pattern of a server that spawns a task per request.
async fn spawn_many(args: &Args) -> Report {
    let batch = args.count("batch", 1000);
    let load = Load::from_args(args);
    let (elapsed, latencies) = tokio::spawn(drive(load, (), move |()| async move {
        let handles: Vec<_> = (0..batch)
            .map(|i| tokio::spawn(async move { std::hint::black_box(i) * 2 }))
            .collect();
        for handle in handles {
            handle.await.expect("a short task does not panic");
        }
    }))
    .await
    .expect("the driver does not panic");
    let batches = latencies.len() as u64;
    // Each short task is polled once; the driver at least once per batch
    // (more when it waits on a task not yet run: hence only an estimate).
    (batches * batch, elapsed, batches * (batch + 1), latencies)
}
