//! Load for bench-kv-server, flat out or paced: `bench-kv-load --address
//! 127.0.0.1:PORT --seconds S [--rate RPS] [--connections C]` (default 64
//! connections, many like a cache's clients). Each connection sends one
//! request at a time, alternating `SET` and `GET` on 1000 keys; with
//! `--rate`, request `k` is due at `k / rate` (latency from the due time
//! when behind, as bench-load). Prints one `result ...` line.

use std::net::SocketAddr;
use std::time::Instant;

use bench_workloads::{Args, Latencies, Schedule, fail, loopback_address, run_clients};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

fn main() {
    let args = Args::from_env();
    let address = loopback_address(&args);
    let rate = args.number("rate", 0.0);
    let schedule = (rate > 0.0).then(|| Schedule::new(rate));
    let connections = args.count("connections", 64).max(1);
    run_clients(connections, args.number("seconds", 2.0), |first, end| {
        client(address, schedule, first, connections, end)
    });
}

/// One connection sending requests `first`, `first + step`, … until the end.
async fn client(
    address: SocketAddr,
    schedule: Option<Schedule>,
    first: u64,
    step: u64,
    end: Instant,
) -> Latencies {
    let stream = TcpStream::connect(address)
        .await
        .unwrap_or_else(|err| fail(&format!("cannot connect to {address}: {err}")));
    stream.set_nodelay(true).ok();
    let (read, mut write) = stream.into_split();
    let mut replies = BufReader::new(read);
    let mut latencies = Latencies::default();
    let mut reply = Vec::with_capacity(128);
    let mut previous_end = Instant::now();
    let mut k = first;
    while previous_end < end && schedule.is_none_or(|s| s.due(k) < end) {
        let from = match &schedule {
            Some(schedule) => schedule.wait(k, previous_end).await,
            None => Instant::now(),
        };
        let key = k % 1000;
        let request = if k.is_multiple_of(2) {
            format!("SET key:{key} value-{k}\n")
        } else {
            format!("GET key:{key}\n")
        };
        write
            .write_all(request.as_bytes())
            .await
            .unwrap_or_else(|err| fail(&format!("sending a request failed: {err}")));
        reply.clear();
        match replies.read_until(b'\n', &mut reply).await {
            Ok(0) => fail("the server closed the connection"),
            Ok(_) => {}
            Err(err) => fail(&format!("reading a reply failed: {err}")),
        }
        previous_end = Instant::now();
        latencies.record(previous_end - from);
        k += step;
    }
    latencies
}
