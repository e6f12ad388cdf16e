//! The compatibility matrix's traced program: a small service built against
//! every tokio version and build profile of the matrix (see
//! `tests/compat.rs`), so it only uses API that tokio 1.8 already had.
//!
//! `compat-service multi|current SECONDS`: a runtime of that flavour whose
//! `block_on` body (the root future) ticks itself, and that spawns a timer
//! loop, an mpsc pipeline, a `Notify` waiter, a short-lived task per
//! request (spawns, ends, a `JoinHandle` await), a `spawn_blocking` call, a
//! TCP echo over loopback (socket readiness) with nested async fns, and a
//! task that spins its worker for 2 ms at a time (CPU samples inside polls).
//! Every function the matrix looks for in the trace starts `compat_`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, Notify, mpsc};

#[inline(never)]
fn compat_spin(how_long: Duration) -> u64 {
    let start = Instant::now();
    let mut acc = 0u64;
    while start.elapsed() < how_long {
        for i in 0..1000u64 {
            acc = std::hint::black_box(acc.wrapping_mul(31).wrapping_add(i));
        }
    }
    acc
}

async fn compat_ticker(notify: Arc<Notify>) {
    let mut interval = tokio::time::interval(Duration::from_millis(5));
    loop {
        interval.tick().await;
        notify.notify_one();
    }
}

async fn compat_notified(notify: Arc<Notify>, shared: Arc<Mutex<u64>>) {
    loop {
        notify.notified().await;
        *shared.lock().await += 1;
    }
}

async fn compat_producer(tx: mpsc::Sender<u64>) {
    let mut n = 0u64;
    loop {
        tokio::time::sleep(Duration::from_millis(2)).await;
        n += 1;
        if tx.send(n).await.is_err() {
            return;
        }
    }
}

async fn compat_consumer(mut rx: mpsc::Receiver<u64>) {
    let mut total = 0u64;
    while let Some(n) = rx.recv().await {
        total = std::hint::black_box(total.wrapping_add(n));
    }
}

async fn compat_job(n: u64) -> u64 {
    tokio::task::yield_now().await;
    n.wrapping_mul(7)
}

async fn compat_requester() {
    let mut n = 0u64;
    loop {
        n += 1;
        let job = tokio::spawn(compat_job(n));
        let _ = std::hint::black_box(job.await);
        let hashed = tokio::task::spawn_blocking(move || compat_blocking_hash(n));
        let _ = std::hint::black_box(hashed.await);
        tokio::time::sleep(Duration::from_millis(4)).await;
    }
}

#[inline(never)]
fn compat_blocking_hash(n: u64) -> u64 {
    std::thread::sleep(Duration::from_micros(300));
    (0..2000u64).fold(n, |acc, i| std::hint::black_box(acc.rotate_left(5) ^ i))
}

async fn compat_spinner() {
    loop {
        std::hint::black_box(compat_spin(Duration::from_millis(2)));
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
}

async fn compat_read_frame(stream: &mut TcpStream, buffer: &mut [u8]) -> std::io::Result<usize> {
    stream.read(buffer).await
}

async fn compat_handle_connection(mut stream: TcpStream) {
    let mut buffer = [0u8; 256];
    loop {
        match compat_read_frame(&mut stream, &mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if stream.write_all(&buffer[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn compat_echo_server(listener: TcpListener) {
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(compat_handle_connection(stream));
    }
}

async fn compat_echo_client(address: std::net::SocketAddr) {
    let Ok(mut stream) = TcpStream::connect(address).await else {
        return;
    };
    let mut buffer = [0u8; 64];
    loop {
        if stream.write_all(b"ping").await.is_err() {
            return;
        }
        if stream.read_exact(&mut buffer[..4]).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
}

/// The root future: its polls are `block_on`'s, on the thread that called it.
async fn compat_root(run_for: Duration) {
    let notify = Arc::new(Notify::new());
    let shared = Arc::new(Mutex::new(0u64));
    tokio::spawn(compat_ticker(notify.clone()));
    tokio::spawn(compat_notified(notify, shared));
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(compat_producer(tx));
    tokio::spawn(compat_consumer(rx));
    tokio::spawn(compat_requester());
    tokio::spawn(compat_spinner());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(compat_echo_server(listener));
    tokio::spawn(compat_echo_client(address));
    println!("ready");
    let deadline = Instant::now() + run_for;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let flavour = args.next().unwrap_or_else(|| "multi".to_owned());
    let run_for = args
        .next()
        .and_then(|s| s.parse::<f64>().ok())
        .map(Duration::from_secs_f64)
        .unwrap_or(Duration::from_secs(60));
    let runtime = match flavour.as_str() {
        "current" => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        _ => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build(),
    }
    .expect("runtime");
    runtime.block_on(compat_root(run_for));
}
