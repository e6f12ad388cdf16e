//! Parks tasks in known places, writes tokio's own task dump
//! (`Handle::dump()`) to the file named by its first argument, prints
//! `ready <pid>` and waits until killed.
//!
//! The places: a `Mutex` held by another task (`holder` holds it and sleeps;
//! `lock_waiter` waits for it), a channel nobody sends on (`channel_waiter`),
//! a `sleep` (`sleeper`), the `JoinHandle` of a task blocked elsewhere
//! (`joiner` awaits a second `lock_waiter`), a `select!` over a channel and a
//! `Notify` (`selector`), nested async fns five deep (`nest1` … `nest5`,
//! waiting on a `Notify`), a `Pin<Box<dyn Future>>` (`boxed` awaits
//! `boxed_inner` through one), a `timeout` (`timed`), and `IDLE` (second argument, default 20) copies
//! of `idle` waiting on a `Notify`, to be grouped. 200 short tasks run and
//! end before the dump: their freed cells are stale look-alikes.
//!
//! tokio's dump polls every task once in tracing mode; it is taken after the
//! tasks have all reached their waits, and nothing wakes them afterwards, so
//! an external dump at any later moment sees the same state.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, Notify, mpsc};

async fn holder(lock: Arc<Mutex<u64>>, held: Arc<Notify>) {
    let _guard = lock.lock().await;
    held.notify_one();
    tokio::time::sleep(Duration::from_secs(86_400)).await;
}

async fn lock_waiter(lock: Arc<Mutex<u64>>) -> u64 {
    let guard = lock.lock().await;
    *guard
}

async fn channel_waiter(mut rx: mpsc::Receiver<u64>) {
    while let Some(value) = rx.recv().await {
        std::hint::black_box(value);
    }
}

async fn sleeper() {
    tokio::time::sleep(Duration::from_secs(86_400)).await;
}

async fn joiner(lock: Arc<Mutex<u64>>) {
    let blocked = tokio::spawn(lock_waiter(lock));
    let _ = blocked.await;
}

async fn selector(mut rx: mpsc::Receiver<u64>, never: Arc<Notify>) {
    tokio::select! {
        value = rx.recv() => { std::hint::black_box(value); }
        _ = never.notified() => {}
    }
}

async fn nest1(never: Arc<Notify>) {
    nest2(&never).await;
}

async fn nest2(never: &Notify) {
    nest3(never).await;
}

async fn nest3(never: &Notify) {
    nest4(never).await;
}

async fn nest4(never: &Notify) {
    nest5(never).await;
}

async fn nest5(never: &Notify) {
    never.notified().await;
}

async fn boxed_inner(never: Arc<Notify>) {
    never.notified().await;
}

async fn boxed(never: Arc<Notify>) {
    let inner: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
        Box::pin(boxed_inner(never));
    inner.await;
}

async fn timed(never: Arc<Notify>) {
    let _ = tokio::time::timeout(Duration::from_secs(86_400), never.notified()).await;
}

async fn idle(never: Arc<Notify>) {
    never.notified().await;
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dump_path = args
        .next()
        .expect("usage: dump-fixture DUMP_FILE [IDLE_TASKS]");
    let idle_tasks: usize = args.next().map_or(20, |n| n.parse().expect("a task count"));

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let (_tx, rx) = mpsc::channel::<u64>(1);
    let (_select_tx, select_rx) = mpsc::channel::<u64>(1);
    runtime.block_on(async move {
        let lock = Arc::new(Mutex::new(0));
        let never = Arc::new(Notify::new());
        let held = Arc::new(Notify::new());
        tokio::spawn(holder(lock.clone(), held.clone()));
        held.notified().await;
        tokio::spawn(lock_waiter(lock.clone()));
        tokio::spawn(channel_waiter(rx));
        tokio::spawn(sleeper());
        tokio::spawn(joiner(lock.clone()));
        tokio::spawn(selector(select_rx, never.clone()));
        tokio::spawn(nest1(never.clone()));
        tokio::spawn(boxed(never.clone()));
        tokio::spawn(timed(never.clone()));
        for _ in 0..idle_tasks {
            tokio::spawn(idle(never.clone()));
        }
        // Tasks that ran and were freed: their cells stay in the heap with
        // their vtable pointers, and must not be dumped as live tasks.
        for n in 0..200u64 {
            let _ = tokio::spawn(async move { std::hint::black_box(n) }).await;
        }
        // Let every task reach its wait.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let dump = tokio::runtime::Handle::current().dump().await;
        let mut text = String::new();
        for task in dump.tasks().iter() {
            text.push_str(&format!("task {}\n{}\n\n", task.id(), task.trace()));
        }
        std::fs::write(&dump_path, text).expect("write the dump");
        println!("ready {}", std::process::id());
        std::future::pending::<()>().await;
    });
}
