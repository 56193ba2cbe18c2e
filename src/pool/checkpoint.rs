//! Where a pipeline records how far its input is done.

use std::error::Error;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::BoxFut;
use crate::runtime::offload;
use crate::sync::lock_std as lock;

/// A store for a pipeline's *watermark*: the number of input positions
/// from the start that are completely done (every item derived from them
/// reached the sink, a filter or the dead letters). A restarted pipeline
/// skips that many items of its source.
///
/// Methods return boxed futures so the trait is object-safe.
pub trait Checkpoint: Send + Sync {
    /// The saved watermark, or `None` if nothing was saved yet.
    fn load(&self) -> BoxFut<'_, Result<Option<u64>, CheckpointError>>;

    /// Saves `watermark`, replacing the previous one. It must be durable
    /// (or as durable as the store promises) when the future completes.
    fn save(&self, watermark: u64) -> BoxFut<'_, Result<(), CheckpointError>>;
}

/// A checkpoint store failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum CheckpointError {
    /// Reading or writing the file failed.
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file does not hold a watermark.
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The start of what it holds.
        content: String,
    },
    /// Another store's failure (for example a Redis error).
    Backend(String),
}

impl fmt::Display for CheckpointError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckpointError::Io { path, source } => {
                write!(f, "checkpoint file {}: {source}", path.display())
            }
            CheckpointError::Corrupt { path, content } => write!(
                f,
                "checkpoint file {} holds no watermark: {content:?}",
                path.display()
            ),
            CheckpointError::Backend(e) => write!(f, "checkpoint store: {e}"),
        }
    }
}

impl Error for CheckpointError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            CheckpointError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// A [`Checkpoint`] in a file, replaced atomically: the watermark is
/// written to `<file>.tmp`, synced, and renamed over the file (then the
/// folder is synced), so a crash leaves either the old or the new
/// watermark, never a torn one. The file holds `{"watermark":N}`.
///
/// # Examples
///
/// ```
/// use smolkit::pool::{Checkpoint, FileCheckpoint};
///
/// let dir = tempfile::tempdir().unwrap();
/// let store = FileCheckpoint::new(dir.path().join("job.checkpoint"));
/// smol::block_on(async {
///     assert_eq!(store.load().await.unwrap(), None);
///     store.save(42).await.unwrap();
///     assert_eq!(store.load().await.unwrap(), Some(42));
/// });
/// ```
#[derive(Debug, Clone)]
pub struct FileCheckpoint {
    path: PathBuf,
}

impl FileCheckpoint {
    /// A store in `path` (its folder must exist).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FileCheckpoint { path: path.into() }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read(path: &Path) -> Result<Option<u64>, CheckpointError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(CheckpointError::Io {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        #[derive(serde::Deserialize)]
        struct Saved {
            watermark: u64,
        }
        serde_json::from_str::<Saved>(&text)
            .map(|s| Some(s.watermark))
            .map_err(|_| CheckpointError::Corrupt {
                path: path.to_owned(),
                content: text.chars().take(64).collect(),
            })
    }

    fn write(path: &Path, watermark: u64) -> Result<(), CheckpointError> {
        let io = |source| CheckpointError::Io {
            path: path.to_owned(),
            source,
        };
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut file = std::fs::File::create(&tmp).map_err(io)?;
        writeln!(file, "{{\"watermark\":{watermark}}}").map_err(io)?;
        file.sync_all().map_err(io)?;
        drop(file);
        std::fs::rename(&tmp, path).map_err(io)?;
        // NOTE: the rename is durable only once the folder is synced; not
        // every platform can open a folder, so failing to is not an error.
        if let Some(dir) = path.parent()
            && let Ok(d) = std::fs::File::open(if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            })
        {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

impl Checkpoint for FileCheckpoint {
    fn load(&self) -> BoxFut<'_, Result<Option<u64>, CheckpointError>> {
        let path = self.path.clone();
        Box::pin(async move {
            let p = path.clone();
            offload::blocking(move || Self::read(&p))
                .await
                .map_err(|e| CheckpointError::Backend(e.to_string()))?
        })
    }

    fn save(&self, watermark: u64) -> BoxFut<'_, Result<(), CheckpointError>> {
        let path = self.path.clone();
        Box::pin(async move {
            offload::blocking(move || Self::write(&path, watermark))
                .await
                .map_err(|e| CheckpointError::Backend(e.to_string()))?
        })
    }
}

/// A [`Checkpoint`] in memory, for tests and for pipelines restarted
/// within one process.
#[derive(Debug, Default)]
pub struct MemoryCheckpoint {
    value: Mutex<Option<u64>>,
}

impl MemoryCheckpoint {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// The saved watermark.
    pub fn get(&self) -> Option<u64> {
        *lock(&self.value)
    }
}

impl Checkpoint for MemoryCheckpoint {
    fn load(&self) -> BoxFut<'_, Result<Option<u64>, CheckpointError>> {
        Box::pin(async move { Ok(self.get()) })
    }

    fn save(&self, watermark: u64) -> BoxFut<'_, Result<(), CheckpointError>> {
        Box::pin(async move {
            *lock(&self.value) = Some(watermark);
            Ok(())
        })
    }
}
