//! A small service for `cargo xtask demo` to trace: a TCP echo server on
//! loopback with a few clients, a request pipeline over channels, periodic
//! timers, and now and then a task that hashes for ~20 ms in one poll (the
//! kind of thing the tracer is there to find).
//!
//! Runs until killed, or for the number of seconds given as first argument.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const CLIENTS: usize = 4;

static ECHOED: AtomicU64 = AtomicU64::new(0);
static PROCESSED: AtomicU64 = AtomicU64::new(0);
static DIGESTS: AtomicU64 = AtomicU64::new(0);

fn main() {
    let run_for = std::env::args().nth(1).map(|arg| {
        let seconds: f64 = arg.parse().unwrap_or_else(|_| {
            eprintln!("usage: demo-service [seconds to run]");
            std::process::exit(2)
        });
        Duration::from_secs_f64(seconds)
    });

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("build the tokio runtime");
    runtime.block_on(async move {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind on loopback");
        let addr = listener.local_addr().expect("listener address");
        tokio::spawn(echo_server(listener));
        for client in 0..CLIENTS {
            tokio::spawn(echo_client(addr, client));
        }

        let (requests, incoming) = mpsc::channel(64);
        let (results, outgoing) = mpsc::channel(64);
        tokio::spawn(produce(requests));
        tokio::spawn(transform(incoming, results));
        tokio::spawn(consume(outgoing));

        tokio::spawn(digest_now_and_then());
        tokio::spawn(report_every_second());

        println!(
            "demo-service pid={} listening on {addr}",
            std::process::id()
        );
        match run_for {
            Some(run_for) => tokio::time::sleep(run_for).await,
            None => std::future::pending().await,
        }
    });
    // The clients' and server's tasks are still blocked on their sockets;
    // don't wait for them.
    runtime.shutdown_background();
    report("done");
}

/// Accepts connections and echoes each line back.
async fn echo_server(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if write
                    .write_all(format!("{line}\n").as_bytes())
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
    }
}

/// Sends a line every few milliseconds and waits for its echo.
async fn echo_client(addr: std::net::SocketAddr, client: usize) {
    let Ok(stream) = TcpStream::connect(addr).await else {
        return;
    };
    let (read, mut write) = stream.into_split();
    let mut replies = BufReader::new(read).lines();
    let mut tick = tokio::time::interval(Duration::from_millis(5 + 3 * client as u64));
    for n in 0u64.. {
        tick.tick().await;
        let message = format!("client {client} message {n}\n");
        if write.write_all(message.as_bytes()).await.is_err() {
            return;
        }
        match replies.next_line().await {
            Ok(Some(_)) => ECHOED.fetch_add(1, Ordering::Relaxed),
            _ => return,
        };
    }
}

/// The pipeline's source: a request every millisecond.
async fn produce(requests: mpsc::Sender<u64>) {
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    for n in 0u64.. {
        tick.tick().await;
        if requests.send(n).await.is_err() {
            return;
        }
    }
}

/// The pipeline's middle: a little work on each request.
async fn transform(mut incoming: mpsc::Receiver<u64>, results: mpsc::Sender<u64>) {
    while let Some(n) = incoming.recv().await {
        if results.send(hash(&n)).await.is_err() {
            return;
        }
    }
}

/// The pipeline's sink.
async fn consume(mut outgoing: mpsc::Receiver<u64>) {
    while outgoing.recv().await.is_some() {
        PROCESSED.fetch_add(1, Ordering::Relaxed);
    }
}

/// Every half second spawns a task that hashes for ~20 ms without yielding:
/// a long poll that holds up its worker thread.
async fn digest_now_and_then() {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        tokio::spawn(async {
            std::hint::black_box(hash_for(Duration::from_millis(20)));
            DIGESTS.fetch_add(1, Ordering::Relaxed);
        });
    }
}

async fn report_every_second() {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tick.tick().await;
        report("so far");
    }
}

fn report(when: &str) {
    println!(
        "demo-service {when}: {} echoes, {} pipeline items, {} digests",
        ECHOED.load(Ordering::Relaxed),
        PROCESSED.load(Ordering::Relaxed),
        DIGESTS.load(Ordering::Relaxed)
    );
}

fn hash(value: &impl Hash) -> u64 {
    let mut hasher = DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

/// Hashes in a loop for `how_long`.
#[inline(never)]
fn hash_for(how_long: Duration) -> u64 {
    let start = Instant::now();
    let mut digest = 0u64;
    while start.elapsed() < how_long {
        for _ in 0..1000 {
            digest = hash(&digest);
        }
    }
    digest
}
