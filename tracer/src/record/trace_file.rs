//! The trace file on disk: created before anything is attached (so an
//! unwritable path fails early), written through one large buffer, gzipped
//! when its name ends in `.gz`, and only renamed to its name once complete
//! and synced, so a file at that path is always a whole, valid trace. A
//! `TraceFile` dropped unfinished (an error, a panic) deletes its partial
//! file. The trace's content is `tracer_timeline::writer`'s job.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use flate2::write::GzEncoder;
use tracer_timeline::writer::Format;

/// Large enough that writes reach the kernel in big chunks even at millions
/// of events per second.
const BUFFER_BYTES: usize = 1 << 20;

pub struct TraceFile {
    path: PathBuf,
    partial_path: PathBuf,
    format: Format,
    /// `None` once finished.
    out: Option<Output>,
    finished: bool,
}

enum Output {
    Plain(BufWriter<File>),
    /// Fast compression: rendering must keep up with millions of events a
    /// second, and the interned protobuf is already compact.
    Gzip(GzEncoder<BufWriter<File>>),
}

impl TraceFile {
    /// Creates `<path>.partial` now. The format follows the name (see
    /// [`Format::for_path`]).
    pub fn create(path: &Path) -> Result<Self> {
        if path.is_dir() {
            bail!(
                "cannot write trace file {}: it is a directory",
                path.display()
            );
        }
        let (format, gzip) = Format::for_path(path);
        let partial_path = {
            let mut partial = OsString::from(path.as_os_str());
            partial.push(".partial");
            PathBuf::from(partial)
        };
        let file = File::create(&partial_path)
            .map_err(|err| anyhow!("cannot create trace file {}: {err}", partial_path.display()))?;
        let buffered = BufWriter::with_capacity(BUFFER_BYTES, file);
        let out = if gzip {
            Output::Gzip(GzEncoder::new(buffered, flate2::Compression::fast()))
        } else {
            Output::Plain(buffered)
        };
        Ok(TraceFile {
            path: path.to_owned(),
            partial_path,
            format,
            out: Some(out),
            finished: false,
        })
    }

    pub fn format(&self) -> Format {
        self.format
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Flushes (and ends the gzip stream), syncs and renames the file to
    /// its final path. Returns its size in bytes.
    pub fn finish(mut self) -> Result<u64> {
        let buffered = match self.out.take() {
            Some(Output::Plain(buffered)) => buffered,
            Some(Output::Gzip(gzip)) => gzip.finish().context("finishing the gzip stream")?,
            None => bail!("{} was already finished", self.partial_path.display()),
        };
        let file = buffered
            .into_inner()
            .map_err(|err| anyhow!("writing {}: {}", self.partial_path.display(), err.error()))?;
        // The trace is the whole point of the run: make sure it is on disk
        // before it appears under its final name.
        file.sync_all()
            .with_context(|| format!("syncing {}", self.partial_path.display()))?;
        let bytes = file.metadata()?.len();
        fs::rename(&self.partial_path, &self.path).with_context(|| {
            format!(
                "renaming {} to {}",
                self.partial_path.display(),
                self.path.display()
            )
        })?;
        self.finished = true;
        Ok(bytes)
    }
}

impl TraceFile {
    fn output(&mut self) -> io::Result<&mut dyn Write> {
        match &mut self.out {
            Some(Output::Plain(out)) => Ok(out),
            Some(Output::Gzip(out)) => Ok(out),
            None => Err(io::Error::other("the trace file was already finished")),
        }
    }
}

impl Write for TraceFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output()?.write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.output()?.write_all(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.output()?.flush()
    }
}

impl Drop for TraceFile {
    /// Never leave a half-written trace behind. (Best effort: there is no
    /// one to report a failure to.)
    fn drop(&mut self) {
        if !self.finished {
            let _ = fs::remove_file(&self.partial_path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("trace-file-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn appears_only_when_finished_and_gzips_by_name() {
        let dir = temp_dir("gz");
        let path = dir.join("t.json.gz");
        let mut file = TraceFile::create(&path).unwrap();
        assert_eq!(file.format(), Format::Json);
        file.write_all(b"{}").unwrap();
        assert!(!path.exists());
        let bytes = file.finish().unwrap();
        assert_eq!(bytes, fs::metadata(&path).unwrap().len());
        let mut text = String::new();
        std::io::Read::read_to_string(
            &mut flate2::read::GzDecoder::new(File::open(&path).unwrap()),
            &mut text,
        )
        .unwrap();
        assert_eq!(text, "{}");
        assert_eq!(
            fs::read_dir(&dir).unwrap().count(),
            1,
            "no partial file left"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn dropped_unfinished_leaves_nothing() {
        let dir = temp_dir("drop");
        let path = dir.join("t.pftrace");
        let mut file = TraceFile::create(&path).unwrap();
        file.write_all(b"partial").unwrap();
        drop(file);
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_directory_is_named() {
        let path = Path::new("/nonexistent-dir/trace.pftrace");
        let message = format!("{:#}", TraceFile::create(path).err().unwrap());
        assert!(
            message.contains("/nonexistent-dir/trace.pftrace"),
            "{message}"
        );
    }
}
