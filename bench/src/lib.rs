//! What the benchmark workloads share: their small command line, the
//! start signal from the harness, the servers' listening and the load
//! clients' connections, pacing at a fixed offered load, latency
//! percentiles, and the one result line `cargo xtask bench` parses.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::future::Future;
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// `--name value` pairs. The workloads take a handful of numbers; a parser
/// of our own keeps them free of dependencies that would add tokio-unrelated
/// code to the binaries being traced.
pub struct Args {
    values: HashMap<String, String>,
    /// Words that are not options (the workload's name, for bench-work).
    pub positional: Vec<String>,
}

impl Args {
    pub fn from_env() -> Args {
        let mut values = HashMap::new();
        let mut positional = Vec::new();
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            match arg.strip_prefix("--") {
                Some(name) => {
                    let value = args
                        .next()
                        .unwrap_or_else(|| fail(&format!("--{name} needs a value")));
                    values.insert(name.to_owned(), value);
                }
                None => positional.push(arg),
            }
        }
        Args { values, positional }
    }

    /// The number given as `--name`, or `default`.
    pub fn number(&self, name: &str, default: f64) -> f64 {
        match self.values.get(name) {
            Some(text) => text
                .parse()
                .unwrap_or_else(|_| fail(&format!("--{name} {text}: not a number"))),
            None => default,
        }
    }

    pub fn count(&self, name: &str, default: u64) -> u64 {
        self.number(name, default as f64) as u64
    }

    /// The text given as `--name`, if any.
    pub fn text(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    pub fn has(&self, name: &str) -> bool {
        self.values.contains_key(name)
    }
}

/// Prints the error and exits: the harness shows our stderr when we fail.
pub fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(2);
}

/// A multi-thread runtime with `workers` workers: the scheduler that
/// production services use, whose poll and park functions the tracer probes.
pub fn runtime(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap_or_else(|err| fail(&format!("cannot build the runtime: {err}")))
}

/// Says "ready" and waits for a line on stdin. The harness answers once the
/// tracer under test has attached, so the measured work is traced from its
/// first poll and the attach itself is not timed.
pub fn wait_for_go() {
    println!("ready");
    std::io::stdout().flush().ok();
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).ok();
}

/// A server's start: listens on a free port of 127.0.0.1, prints `ready
/// ADDRESS`, and runs `accept_loop` on a `workers` runtime until killed.
/// The accept loop is a task of its own, as in a real server, so its polls
/// are traced like the connections'.
pub fn serve<F, Fut>(workers: usize, accept_loop: F)
where
    F: FnOnce(tokio::net::TcpListener) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    runtime(workers).block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|err| fail(&format!("cannot listen on 127.0.0.1: {err}")));
        let address = listener
            .local_addr()
            .expect("a bound socket has an address");
        println!("ready {address}");
        tokio::spawn(accept_loop(listener))
            .await
            .expect("the accept loop does not panic");
    });
}

/// A load client's `--address`: a loopback address, nothing else.
pub fn loopback_address(args: &Args) -> SocketAddr {
    let address: SocketAddr = args
        .text("address")
        .unwrap_or_default()
        .parse()
        .unwrap_or_else(|_| fail("give --address 127.0.0.1:PORT"));
    if !address.ip().is_loopback() {
        fail("the load client only talks to loopback addresses");
    }
    address
}

/// A load client's run: `connections` connections, the one numbered
/// `first` sending requests `first`, `first + connections`, … until `end`
/// (`client(first, end)`), `seconds` long; then the result line. One
/// thread: the client shares two cores with the server and the tracer.
pub fn run_clients<F, Fut>(connections: u64, seconds: f64, client: F)
where
    F: Fn(u64, Instant) -> Fut,
    Fut: Future<Output = Latencies> + Send + 'static,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|err| fail(&format!("cannot build the runtime: {err}")));
    let (ops, elapsed, mut latencies) = runtime.block_on(async move {
        let started = Instant::now();
        let end = started + Duration::from_secs_f64(seconds);
        let clients: Vec<_> = (0..connections)
            .map(|first| tokio::spawn(client(first, end)))
            .collect();
        let mut latencies = Latencies::default();
        for client in clients {
            latencies.merge(client.await.expect("a client does not panic"));
        }
        (latencies.len() as u64, started.elapsed(), latencies)
    });
    print_result(ops, elapsed, 0, &mut latencies);
}

/// Latencies in nanoseconds, for percentiles.
#[derive(Default)]
pub struct Latencies(Vec<u64>);

impl Latencies {
    pub fn record(&mut self, latency: Duration) {
        self.0.push(latency.as_nanos() as u64);
    }

    pub fn merge(&mut self, other: Latencies) {
        self.0.extend(other.0);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The `q` quantile (0..=1) by nearest rank; 0 when nothing was recorded.
    pub fn quantile(&mut self, q: f64) -> u64 {
        if self.0.is_empty() {
            return 0;
        }
        self.0.sort_unstable();
        let rank = ((q * self.0.len() as f64).ceil() as usize).clamp(1, self.0.len());
        self.0[rank - 1]
    }
}

/// The line the harness parses: `result key=value ...`, always with ops,
/// elapsed_ns and the latency percentiles; `polls` is the workload's own
/// estimate of the task polls it caused (0 when it can't know).
pub fn print_result(ops: u64, elapsed: Duration, polls: u64, latencies: &mut Latencies) {
    let mut line = String::from("result");
    let fields = [
        ("ops", ops),
        ("elapsed_ns", elapsed.as_nanos() as u64),
        ("polls", polls),
        ("samples", latencies.len() as u64),
        ("p50_ns", latencies.quantile(0.50)),
        ("p99_ns", latencies.quantile(0.99)),
        ("max_ns", latencies.quantile(1.0)),
    ];
    for (name, value) in fields {
        write!(line, " {name}={value}").expect("writing to a String");
    }
    println!("{line}");
    std::io::stdout().flush().ok();
}

/// A fixed offered load: op `k` is due at `start + k / rate`, like wrk2.
#[derive(Clone, Copy)]
pub struct Schedule {
    start: Instant,
    interval: Duration,
}

impl Schedule {
    pub fn new(rate_per_second: f64) -> Schedule {
        if !(rate_per_second > 0.0 && rate_per_second.is_finite()) {
            fail("the rate must be a positive number");
        }
        Schedule {
            start: Instant::now(),
            interval: Duration::from_secs_f64(1.0 / rate_per_second),
        }
    }

    pub fn due(&self, k: u64) -> Instant {
        self.start + self.interval.mul_f64(k as f64)
    }

    /// Waits for op `k`'s due time and returns the instant its latency is
    /// measured from. When the previous op ended after this one was due, the
    /// load generator fell behind because the system under test was slow, so
    /// the latency counts from the due time (no coordinated omission).
    /// Otherwise it counts from the actual start: tokio's timer wakes up to a
    /// millisecond late, and that lateness is the generator's, not the
    /// measured system's.
    pub async fn wait(&self, k: u64, previous_end: Instant) -> Instant {
        let due = self.due(k);
        if previous_end > due {
            return due;
        }
        tokio::time::sleep_until(due.into()).await;
        Instant::now()
    }
}

/// Runs `op` back to back (flat out), or `rate` times a second (fixed
/// load), for `seconds`, timing each. Both stop issuing at the end even when
/// behind schedule, as wrk2 does, so a workload slowed down by tracing shows
/// it as lost throughput rather than as a longer run. `op` takes the
/// workload's state and hands it back, so that a batch may hold it across
/// awaits. Returns the wall time of the whole run and the batch latencies.
pub async fn drive<S, F, Fut>(load: Load, mut state: S, mut op: F) -> (Duration, Latencies)
where
    F: FnMut(S) -> Fut,
    Fut: Future<Output = S>,
{
    let mut latencies = Latencies::default();
    let started = Instant::now();
    let end = started + Duration::from_secs_f64(load.seconds);
    match load.rate {
        None => {
            while Instant::now() < end {
                let begin = Instant::now();
                state = op(state).await;
                latencies.record(begin.elapsed());
            }
        }
        Some(rate) => {
            let schedule = Schedule::new(rate);
            let mut previous_end = started;
            for k in 0.. {
                if schedule.due(k) >= end || previous_end >= end {
                    break;
                }
                let from = schedule.wait(k, previous_end).await;
                state = op(state).await;
                previous_end = Instant::now();
                latencies.record(previous_end - from);
            }
        }
    }
    (started.elapsed(), latencies)
}

/// How hard and how long a workload is driven: `--seconds S`, and
/// `--rate R` for a fixed load of R batches a second (else flat out).
#[derive(Clone, Copy)]
pub struct Load {
    pub rate: Option<f64>,
    pub seconds: f64,
}

impl Load {
    pub fn from_args(args: &Args) -> Load {
        Load {
            rate: args.has("rate").then(|| args.number("rate", 0.0)),
            seconds: args.number("seconds", 2.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let mut latencies = Latencies::default();
        for ns in (1..=100).rev() {
            latencies.record(Duration::from_nanos(ns));
        }
        assert_eq!(latencies.quantile(0.5), 50);
        assert_eq!(latencies.quantile(0.99), 99);
        assert_eq!(latencies.quantile(1.0), 100);
        assert_eq!(Latencies::default().quantile(0.99), 0);
    }
}
