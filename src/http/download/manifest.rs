//! The manifest: one JSON line per finished URL, each written and synced
//! whole, so a rerun skips what is done and a killed run loses at most the
//! line being written (a torn last line is ignored when read back).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::sync::lock_std as lock;

/// The manifest's file name inside the target folder.
pub const MANIFEST: &str = ".smolkit-downloads.jsonl";

/// One finished download as the manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Entry {
    pub url: String,
    /// The file name inside the target folder.
    pub path: String,
    pub bytes: u64,
    /// Lower-case hex SHA-256 of the file.
    pub sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_modified: Option<String>,
}

pub(super) struct Manifest {
    path: PathBuf,
    entries: Mutex<HashMap<String, Entry>>,
    file: Arc<Mutex<File>>,
}

impl Manifest {
    /// Reads the manifest in `dir` (missing = empty) and opens it for
    /// appending. A torn line starts the next entry on a fresh line.
    pub(super) fn open(dir: &Path) -> io::Result<Manifest> {
        let path = dir.join(MANIFEST);
        let mut entries = HashMap::new();
        let mut torn = false;
        match File::open(&path) {
            Ok(f) => {
                let mut reader = BufReader::new(f);
                let mut line = Vec::new();
                loop {
                    line.clear();
                    if reader.read_until(b'\n', &mut line)? == 0 {
                        break;
                    }
                    torn = line.last() != Some(&b'\n');
                    match serde_json::from_slice::<Entry>(&line) {
                        Ok(e) => {
                            entries.insert(e.url.clone(), e);
                        }
                        Err(e) => tracing::warn!(
                            manifest = %path.display(),
                            error = %e,
                            "skipping an unreadable manifest line"
                        ),
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut file = OpenOptions::new().create(true).append(true).open(&path)?;
        if torn {
            file.write_all(b"\n")?;
        }
        Ok(Manifest {
            path,
            entries: Mutex::new(entries),
            file: Arc::new(Mutex::new(file)),
        })
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// The entry for `url`, if that file is done.
    pub(super) fn get(&self, url: &str) -> Option<Entry> {
        lock(&self.entries).get(url).cloned()
    }

    /// Every file name the manifest knows.
    pub(super) fn names(&self) -> Vec<String> {
        lock(&self.entries)
            .values()
            .map(|e| e.path.clone())
            .collect()
    }

    /// Appends `entry` as one line with one write, then syncs the file.
    pub(super) async fn append(&self, entry: Entry) -> io::Result<()> {
        let mut line = serde_json::to_vec(&entry).map_err(io::Error::other)?;
        line.push(b'\n');
        let file = self.file.clone();
        blocking::unblock(move || {
            let mut f = lock(&file);
            f.write_all(&line)?;
            f.sync_data()
        })
        .await?;
        lock(&self.entries).insert(entry.url.clone(), entry);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(url: &str) -> Entry {
        Entry {
            url: url.into(),
            path: "f".into(),
            bytes: 3,
            sha256: "00".into(),
            etag: Some("\"e\"".into()),
            last_modified: None,
        }
    }

    #[test]
    fn a_torn_line_is_skipped_and_the_next_entry_starts_a_fresh_line() {
        let dir = tempfile::tempdir().unwrap();
        let m = Manifest::open(dir.path()).unwrap();
        futures_lite::future::block_on(m.append(entry("http://a/1"))).unwrap();
        drop(m);
        // A kill in the middle of the second line.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(MANIFEST))
            .unwrap();
        f.write_all(br#"{"url":"http://a/2","pa"#).unwrap();
        drop(f);
        let m = Manifest::open(dir.path()).unwrap();
        assert!(m.get("http://a/1").is_some());
        assert!(m.get("http://a/2").is_none());
        futures_lite::future::block_on(m.append(entry("http://a/3"))).unwrap();
        drop(m);
        let m = Manifest::open(dir.path()).unwrap();
        assert_eq!(m.get("http://a/3"), Some(entry("http://a/3")));
        assert_eq!(m.get("http://a/1"), Some(entry("http://a/1")));
    }
}
