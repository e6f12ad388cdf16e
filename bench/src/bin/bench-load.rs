//! A paced HTTP/1.1 load client for the fixed-load point, since wrk can't
//! hold a request rate: `bench-load --address 127.0.0.1:PORT --rate RPS
//! --seconds S [--connections C]`. Request `k` is due at `k / rate` (spread
//! over C keep-alive connections, round robin); latencies count from the due
//! time when the client fell behind (see `Schedule::wait`). Prints one
//! `result ...` line. Refuses any address but loopback.

use std::net::SocketAddr;
use std::time::Instant;

use bench_workloads::{Args, Latencies, Schedule, fail, loopback_address, run_clients};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n";

fn main() {
    let args = Args::from_env();
    let address = loopback_address(&args);
    let schedule = Schedule::new(args.number("rate", 0.0));
    let connections = args.count("connections", 16).max(1);
    run_clients(connections, args.number("seconds", 2.0), |first, end| {
        client(address, schedule, first, connections, end)
    });
}

/// One keep-alive connection sending requests `first`, `first + step`, …
/// until the run's end.
async fn client(
    address: SocketAddr,
    schedule: Schedule,
    first: u64,
    step: u64,
    end: Instant,
) -> Latencies {
    let mut stream = TcpStream::connect(address)
        .await
        .unwrap_or_else(|err| fail(&format!("cannot connect to {address}: {err}")));
    stream.set_nodelay(true).ok();
    let mut latencies = Latencies::default();
    let mut buffer = Vec::with_capacity(4096);
    let mut previous_end = Instant::now();
    let mut k = first;
    // Like wrk2, stop at the end even when behind: a slowed server shows
    // as lost throughput, not as a longer run.
    while schedule.due(k) < end && previous_end < end {
        let from = schedule.wait(k, previous_end).await;
        stream
            .write_all(REQUEST)
            .await
            .unwrap_or_else(|err| fail(&format!("sending a request failed: {err}")));
        read_response(&mut stream, &mut buffer).await;
        previous_end = Instant::now();
        latencies.record(previous_end - from);
        k += step;
    }
    latencies
}

/// Reads one response (headers, then a Content-Length body). The server
/// never pipelines, so nothing after the response is in the buffer.
async fn read_response(stream: &mut TcpStream, buffer: &mut Vec<u8>) {
    buffer.clear();
    loop {
        if let Some(total) = response_length(buffer)
            && buffer.len() >= total
        {
            return;
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) => fail("the server closed the connection"),
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            Err(err) => fail(&format!("reading a response failed: {err}")),
        }
    }
}

/// The whole response's length once its headers are in, from Content-Length.
fn response_length(buffer: &[u8]) -> Option<usize> {
    let header_end = buffer.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let headers = std::str::from_utf8(&buffer[..header_end]).ok()?;
    let body = headers.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse::<usize>().ok())?
    })?;
    Some(header_end + body)
}
