//! `--open`: serves the finished trace to the Perfetto UI, as Perfetto's own
//! `tools/open_trace_in_ui` does. The UI (https://ui.perfetto.dev) may fetch
//! a trace from `http://127.0.0.1:9001/` (that origin is allowed by its
//! content security policy), given `#!/?url=http://127.0.0.1:9001/FILE`;
//! the response must allow the UI's origin (CORS). Only the trace's own
//! name is served, only on the loopback interface, and the server stops
//! once the UI has fetched it whole (or after a few requests, or Ctrl-C).

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::Path;

use anyhow::{Context, Result};

/// The port the Perfetto UI is allowed to fetch traces from.
pub const PORT: u16 = 9001;
const UI_ORIGIN: &str = "https://ui.perfetto.dev";
/// Stop after this many requests even if the trace was never fetched whole
/// (someone else's port scan, a browser that gave up).
const MAX_REQUESTS: usize = 32;

/// The ui.perfetto.dev link that loads `file_name` from `port`.
pub fn ui_link(file_name: &str, port: u16) -> String {
    format!(
        "{UI_ORIGIN}/#!/?url=http://127.0.0.1:{port}/{}",
        percent_encode(file_name)
    )
}

/// Binds 127.0.0.1:`port` (0: any free port, for tests).
pub fn bind(port: u16) -> Result<TcpListener> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).with_context(|| {
        format!("cannot serve the trace on 127.0.0.1:{port} (is another one being served?)")
    })
}

/// Serves `trace` on `listener` until it was sent whole once. Returns the
/// number of requests answered.
pub fn serve(listener: &TcpListener, trace: &Path) -> Result<usize> {
    let name = trace
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let wanted = format!("/{}", percent_encode(&name));
    for (answered, stream) in listener.incoming().take(MAX_REQUESTS).enumerate() {
        let Ok(stream) = stream else { continue };
        match answer(stream, &wanted, trace) {
            Ok(true) => return Ok(answered + 1),
            Ok(false) => {}
            Err(err) => log::info!("serving the trace: {err:#}"),
        }
    }
    Ok(MAX_REQUESTS)
}

/// Answers one request; true if it was a GET of the trace, sent whole.
fn answer(stream: TcpStream, wanted: &str, trace: &Path) -> Result<bool> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // Skip the headers.
    let mut line = String::new();
    while reader.read_line(&mut line)? > 2 {
        line.clear();
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let mut out = stream;
    let cors = format!(
        "Access-Control-Allow-Origin: {UI_ORIGIN}\r\nCache-Control: no-cache\r\nConnection: close\r\n"
    );
    match method {
        "OPTIONS" => {
            write!(
                out,
                "HTTP/1.1 204 No Content\r\n{cors}Access-Control-Allow-Methods: GET\r\nAccess-Control-Allow-Headers: *\r\n\r\n"
            )?;
            Ok(false)
        }
        "GET" if path == wanted => {
            let mut file = std::fs::File::open(trace)
                .with_context(|| format!("opening {}", trace.display()))?;
            let len = file.metadata()?.len();
            write!(
                out,
                "HTTP/1.1 200 OK\r\n{cors}Content-Type: application/octet-stream\r\nContent-Length: {len}\r\n\r\n"
            )?;
            std::io::copy(&mut file, &mut out)?;
            out.flush()?;
            Ok(true)
        }
        _ => {
            write!(
                out,
                "HTTP/1.1 404 Not Found\r\n{cors}Content-Length: 0\r\n\r\n"
            )?;
            Ok(false)
        }
    }
}

/// Percent-encodes everything but unreserved URL characters.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn get(port: u16, path: &str) -> String {
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: x\r\nOrigin: {UI_ORIGIN}\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    }

    #[test]
    fn serves_only_the_trace_with_cors_then_stops() {
        let dir = std::env::temp_dir().join(format!("serve-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let trace = dir.join("my trace.pftrace");
        std::fs::write(&trace, b"TRACE").unwrap();
        let listener = bind(0).unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || serve(&listener, &trace).unwrap());

        let missing = get(port, "/etc/passwd");
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        let found = get(port, "/my%20trace.pftrace");
        assert!(found.starts_with("HTTP/1.1 200"), "{found}");
        assert!(found.contains("Access-Control-Allow-Origin: https://ui.perfetto.dev"));
        assert!(found.ends_with("\r\n\r\nTRACE"), "{found}");
        assert_eq!(server.join().unwrap(), 2, "stops once the trace was sent");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_link_loads_from_the_local_server() {
        assert_eq!(
            ui_link("trace.pftrace", PORT),
            "https://ui.perfetto.dev/#!/?url=http://127.0.0.1:9001/trace.pftrace"
        );
    }
}
