//! The HTTP workload: a hyper server on 127.0.0.1 answering every request
//! with a short body, a task per connection, on a multi-thread runtime with
//! `--workers W` workers (default 2). Prints `ready ADDRESS` once listening
//! and serves until killed; the load comes from wrk or bench-load.

use std::convert::Infallible;

use bench_workloads::{Args, fail, serve};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

fn main() {
    let args = Args::from_env();
    serve(args.count("workers", 2) as usize, accept_loop);
}

async fn accept_loop(listener: TcpListener) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(connection) => connection,
            Err(err) => fail(&format!("accept failed: {err}")),
        };
        stream.set_nodelay(true).ok();
        tokio::spawn(async move {
            // A client closing its connection mid-request is not our error.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service_fn(hello))
                .await;
        });
    }
}

async fn hello(_request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::new(Bytes::from_static(
        b"Hello from the rt-ebpf-trace benchmark\n",
    ))))
}
