//! The syscall-heavy workload: a Redis-like key-value server on 127.0.0.1.
//! One request per line (`SET key value` → `+OK`, `GET key` → `$value` or
//! `$-`), a task per connection, one read and one write syscall per
//! request, a store shared behind a `std::sync::Mutex` held only for the
//! map operation (as many real servers do). Multi-thread runtime with
//! `--workers W` (default 2). Prints `ready ADDRESS` and serves until killed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bench_workloads::{Args, fail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

type Store = Arc<Mutex<HashMap<Vec<u8>, Vec<u8>>>>;

fn main() {
    let args = Args::from_env();
    let store: Store = Arc::default();
    bench_workloads::serve(args.count("workers", 2) as usize, |listener| {
        accept_loop(listener, store)
    });
}

async fn accept_loop(listener: TcpListener, store: Store) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(connection) => connection,
            Err(err) => fail(&format!("accept failed: {err}")),
        };
        stream.set_nodelay(true).ok();
        tokio::spawn(serve(stream, store.clone()));
    }
}

/// Serves one connection until the client closes it.
async fn serve(stream: TcpStream, store: Store) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    let mut line = Vec::with_capacity(128);
    let mut reply = Vec::with_capacity(128);
    loop {
        line.clear();
        match lines.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        reply.clear();
        answer(line.trim_ascii_end(), &store, &mut reply);
        if write.write_all(&reply).await.is_err() {
            return;
        }
    }
}

fn answer(request: &[u8], store: &Store, reply: &mut Vec<u8>) {
    let mut words = request.splitn(3, |&b| b == b' ');
    let command = words.next().unwrap_or_default();
    let key = words.next().unwrap_or_default();
    match command {
        b"SET" => {
            let value = words.next().unwrap_or_default().to_vec();
            store
                .lock()
                .expect("no panics while held")
                .insert(key.to_vec(), value);
            reply.extend_from_slice(b"+OK\n");
        }
        b"GET" => {
            let value = store
                .lock()
                .expect("no panics while held")
                .get(key)
                .cloned();
            match value {
                Some(value) => {
                    reply.push(b'$');
                    reply.extend_from_slice(&value);
                    reply.push(b'\n');
                }
                None => reply.extend_from_slice(b"$-\n"),
            }
        }
        _ => reply.extend_from_slice(b"-ERR unknown command\n"),
    }
}
