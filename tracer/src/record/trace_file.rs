//! The trace file on disk: written through one large buffer, gzipped when
//! its name ends in `.gz`, into the unnamed temporary file of an
//! [`OutputFile`] (checked before anything was attached), which gets its name
//! only once complete and synced ([`OutputFile::publish`]): a file at that
//! path is always a whole, valid trace, and an unfinished one (an error, a
//! panic, a kill) leaves nothing. The trace's content is
//! `tracer_timeline::writer`'s job.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use flate2::write::GzEncoder;
use tracer_timeline::writer::Format;

use crate::output_file::{OutputFile, Temporary, TemporaryName};

/// Large enough that writes reach the kernel in big chunks even at millions
/// of events per second. The Perfetto writer hands over chunks of this size
/// (its `PENDING_BYTES`), which `BufWriter` passes on without copying them.
const BUFFER_BYTES: usize = 1 << 20;

pub struct TraceFile {
    output: OutputFile,
    format: Format,
    /// The temporary file's name, if it has one (dropped unpublished, it
    /// removes the file).
    name: Option<TemporaryName>,
    /// `None` once finished.
    out: Option<Output>,
}

enum Output {
    Plain(BufWriter<File>),
    /// Fast compression: rendering must keep up with millions of events a
    /// second, and the interned protobuf is already compact.
    Gzip(GzEncoder<BufWriter<File>>),
}

impl TraceFile {
    /// Starts writing `output`'s temporary file. The format follows the name
    /// (see [`Format::for_path`]).
    pub fn create(output: OutputFile) -> Result<Self> {
        let (format, gzip) = Format::for_path(output.path());
        let Temporary { file, name } = output.temporary()?;
        let buffered = BufWriter::with_capacity(BUFFER_BYTES, file);
        let out = if gzip {
            Output::Gzip(GzEncoder::new(buffered, flate2::Compression::fast()))
        } else {
            Output::Plain(buffered)
        };
        Ok(TraceFile {
            output,
            format,
            name: Some(name),
            out: Some(out),
        })
    }

    pub fn format(&self) -> Format {
        self.format
    }

    pub fn path(&self) -> &Path {
        self.output.path()
    }

    /// Flushes (and ends the gzip stream), then publishes the file under
    /// its name. Returns its size in bytes.
    pub fn finish(mut self) -> Result<u64> {
        let shown = self.output.path().display().to_string();
        let buffered = match self.out.take() {
            Some(Output::Plain(buffered)) => buffered,
            Some(Output::Gzip(gzip)) => gzip.finish().context("finishing the gzip stream")?,
            None => bail!("{shown} was already finished"),
        };
        let file = buffered
            .into_inner()
            .map_err(|err| anyhow!("writing {shown}: {}", err.error()))?;
        let name = self
            .name
            .take()
            .expect("a trace file has its temporary's name until finished");
        self.output.publish(Temporary { file, name })
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::path::PathBuf;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("trace-file-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn create(path: &Path) -> Result<TraceFile> {
        TraceFile::create(OutputFile::check(path)?)
    }

    #[test]
    fn appears_only_when_finished_and_gzips_by_name() {
        let dir = temp_dir("gz");
        let path = dir.join("t.json.gz");
        let mut file = create(&path).unwrap();
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
        let mut file = create(&path).unwrap();
        file.write_all(b"partial").unwrap();
        drop(file);
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_directory_is_named() {
        let path = Path::new("/nonexistent-dir/trace.pftrace");
        let message = format!("{:#}", create(path).err().unwrap());
        assert!(
            message.contains("/nonexistent-dir/trace.pftrace"),
            "{message}"
        );
    }
}
