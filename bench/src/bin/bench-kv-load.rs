//! Load for bench-kv-server, flat out or paced: `bench-kv-load --address
//! 127.0.0.1:PORT --seconds S [--rate RPS] [--connections C]` (default 64
//! connections, many like a cache's clients). Each connection sends one
//! request at a time, alternating `SET` and `GET` on 1000 keys; with
//! `--rate`, request `k` is due at `k / rate` (latency from the due time
//! when behind, as bench-load). Prints one `result ...` line.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bench_workloads::{Args, Latencies, Schedule, fail, print_result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

fn main() {
    let args = Args::from_env();
    let address: SocketAddr = args
        .text("address")
        .unwrap_or_default()
        .parse()
        .unwrap_or_else(|_| fail("give --address 127.0.0.1:PORT"));
    if !address.ip().is_loopback() {
        fail("the load client only talks to loopback addresses");
    }
    let rate = args.number("rate", 0.0);
    let seconds = args.number("seconds", 2.0);
    let connections = args.count("connections", 64).max(1);
    // One thread: the client shares two cores with the server and tracer.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|err| fail(&format!("cannot build the runtime: {err}")));
    let (ops, elapsed, mut latencies) = runtime.block_on(async move {
        let schedule = (rate > 0.0).then(|| Schedule::new(rate));
        let started = Instant::now();
        let end = started + Duration::from_secs_f64(seconds);
        let clients: Vec<_> = (0..connections)
            .map(|first| tokio::spawn(client(address, schedule, first, connections, end)))
            .collect();
        let mut latencies = Latencies::default();
        for client in clients {
            latencies.merge(client.await.expect("a client does not panic"));
        }
        (latencies.len() as u64, started.elapsed(), latencies)
    });
    print_result(ops, elapsed, 0, &mut latencies);
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
