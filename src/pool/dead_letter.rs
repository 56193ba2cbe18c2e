//! Items a pipeline could not process, and where they go.

use std::any::Any;
use std::error::Error;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use super::BoxFut;
use crate::runtime::offload;
use crate::sync::lock_std as lock;

/// An item that failed a pipeline stage after its retries.
///
/// The item is kept twice: as JSON (what a file or another process can
/// store) and, until taken with [`downcast`](DeadLetter::downcast), as the
/// typed value itself.
#[non_exhaustive]
pub struct DeadLetter {
    /// The stage's name (`"sink"` for the sink).
    pub stage: String,
    /// The last error, as text.
    pub error: String,
    /// Attempts made (1 without a retry policy).
    pub attempts: u32,
    /// The input positions the item came from.
    pub positions: Vec<u64>,
    /// The item as JSON.
    pub item: serde_json::Value,
    raw: Option<Box<dyn Any + Send>>,
}

#[derive(Serialize)]
struct Line<'a> {
    stage: &'a str,
    error: &'a str,
    attempts: u32,
    positions: &'a [u64],
    item: &'a serde_json::Value,
}

impl DeadLetter {
    pub(crate) fn new<T: Serialize + Send + 'static>(
        stage: &str,
        item: T,
        error: String,
        attempts: u32,
        positions: Vec<u64>,
    ) -> Self {
        let json = serde_json::to_value(&item)
            .unwrap_or_else(|e| serde_json::Value::String(format!("<item not serializable: {e}>")));
        DeadLetter {
            stage: stage.to_owned(),
            error,
            attempts,
            positions,
            item: json,
            raw: Some(Box::new(item)),
        }
    }

    /// Takes the typed item, if it is a `T` and was not taken before.
    pub fn downcast<T: 'static>(&mut self) -> Option<T> {
        match self.raw.take()?.downcast::<T>() {
            Ok(v) => Some(*v),
            Err(raw) => {
                self.raw = Some(raw);
                None
            }
        }
    }

    /// One line of JSON: `{"stage":…,"error":…,"attempts":…,"positions":[…],"item":…}`.
    pub fn to_json_line(&self) -> String {
        serde_json::to_string(&Line {
            stage: &self.stage,
            error: &self.error,
            attempts: self.attempts,
            positions: &self.positions,
            item: &self.item,
        })
        .unwrap_or_default()
    }
}

impl fmt::Debug for DeadLetter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetter")
            .field("stage", &self.stage)
            .field("error", &self.error)
            .field("attempts", &self.attempts)
            .field("positions", &self.positions)
            .field("item", &self.item)
            .finish()
    }
}

/// A dead letter could not be stored. The pipeline stops on it (without
/// moving its checkpoint past the item), since going on would lose the
/// item.
#[derive(Debug)]
#[non_exhaustive]
pub enum DeadLetterError {
    /// The channel's receiver is gone.
    Closed,
    /// Writing the file failed.
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Another sink's failure.
    Other(String),
}

impl fmt::Display for DeadLetterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeadLetterError::Closed => f.write_str("dead-letter channel is closed"),
            DeadLetterError::Io { path, source } => {
                write!(f, "dead-letter file {}: {source}", path.display())
            }
            DeadLetterError::Other(e) => write!(f, "dead-letter sink: {e}"),
        }
    }
}

impl Error for DeadLetterError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            DeadLetterError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Where dead letters go. Implemented for an `async_channel::Sender`
/// (waits while a bounded channel is full) and [`JsonLinesFile`]; by
/// default a pipeline keeps them in its report.
pub trait DeadLetterSink: Send + Sync {
    /// Stores one dead letter.
    fn send(&self, letter: DeadLetter) -> BoxFut<'_, Result<(), DeadLetterError>>;
}

impl DeadLetterSink for async_channel::Sender<DeadLetter> {
    fn send(&self, letter: DeadLetter) -> BoxFut<'_, Result<(), DeadLetterError>> {
        Box::pin(async move {
            async_channel::Sender::send(self, letter)
                .await
                .map_err(|_| DeadLetterError::Closed)
        })
    }
}

/// Dead letters appended to a file, one JSON object a line (see
/// [`DeadLetter::to_json_line`]). Each line is written and flushed before
/// the item counts as done; with [`with_sync`](JsonLinesFile::with_sync)
/// it is also synced to disk.
///
/// # A torn last line
///
/// A crash in the middle of a write can leave a last line without its
/// newline. Opening such a file starts on a fresh line, so the torn line
/// stays alone (and unparsable) and the next letter is whole: a reader
/// skips a line that is not valid JSON, which can only be a torn one.
///
/// # Default
///
/// Appends; each line is written whole; no fsync per line (turn it on with
/// [`with_sync`](JsonLinesFile::with_sync)).
///
/// # Examples
///
/// ```
/// use smolkit::pool::JsonLinesFile;
///
/// let dir = tempfile::tempdir().unwrap();
/// let sink = JsonLinesFile::open(dir.path().join("dead.jsonl")).unwrap();
/// assert!(sink.path().ends_with("dead.jsonl"));
/// ```
#[derive(Debug, Clone)]
pub struct JsonLinesFile {
    path: PathBuf,
    file: Arc<Mutex<File>>,
    sync: bool,
}

impl JsonLinesFile {
    /// Opens (creating if needed) `path` for appending, on a fresh line
    /// (see "A torn last line").
    ///
    /// # Errors
    ///
    /// [`DeadLetterError::Io`] if the file cannot be opened or read.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, DeadLetterError> {
        let path = path.into();
        let io = |source| DeadLetterError::Io {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        if ends_torn(&mut file).map_err(io)? {
            file.write_all(b"\n").map_err(io)?;
        }
        Ok(JsonLinesFile {
            path,
            file: Arc::new(Mutex::new(file)),
            sync: false,
        })
    }

    /// Syncs the file after every line (slower; survives a power cut, not
    /// just a crash).
    pub fn with_sync(mut self, sync: bool) -> Self {
        self.sync = sync;
        self
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl DeadLetterSink for JsonLinesFile {
    fn send(&self, letter: DeadLetter) -> BoxFut<'_, Result<(), DeadLetterError>> {
        let file = self.file.clone();
        let sync = self.sync;
        Box::pin(async move {
            let mut line = letter.to_json_line();
            line.push('\n');
            let written = offload::blocking(move || {
                let mut f = lock(&file);
                f.write_all(line.as_bytes())?;
                f.flush()?;
                if sync {
                    f.sync_data()?;
                }
                Ok::<_, std::io::Error>(())
            })
            .await
            .map_err(|e| DeadLetterError::Other(e.to_string()))?;
            written.map_err(|source| DeadLetterError::Io {
                path: self.path.clone(),
                source,
            })
        })
    }
}

/// The default sink: dead letters kept for the pipeline's report.
#[derive(Debug, Default)]
pub(crate) struct Collect {
    pub(crate) letters: Mutex<Vec<DeadLetter>>,
}

impl DeadLetterSink for Collect {
    fn send(&self, letter: DeadLetter) -> BoxFut<'_, Result<(), DeadLetterError>> {
        lock(&self.letters).push(letter);
        Box::pin(async { Ok(()) })
    }
}

/// Whether the file is non-empty and its last byte is not a newline.
fn ends_torn(file: &mut File) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    if file.metadata()?.len() == 0 {
        return Ok(false);
    }
    file.seek(SeekFrom::End(-1))?;
    let mut last = [0u8];
    file.read_exact(&mut last)?;
    Ok(last[0] != b'\n')
}
