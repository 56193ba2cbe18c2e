//! [`RedisCheckpoint`]: a pipeline watermark in Redis.

use std::fmt;
use std::sync::Arc;

use ::redis::Script;

use super::RedisLink;
use crate::pool::{BoxFut, Checkpoint, CheckpointError};

/// `KEYS`: the key. `ARGV`: the watermark. Stores it only if it is ahead
/// of the stored one; returns the watermark stored afterwards.
const SAVE: &str = r"
local cur = redis.call('GET', KEYS[1])
local new = tonumber(ARGV[1])
if cur and tonumber(cur) and tonumber(cur) >= new then return cur end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
";

/// A [`Checkpoint`] in a Redis key, for pipelines that run on several
/// machines or move between them.
///
/// The watermark only moves forward: [`save`](Checkpoint::save) compares
/// and sets in one Lua script, so when two writers race the larger
/// watermark stays whatever order they arrive in; a save behind the
/// stored watermark leaves it as it is (and is not an error). Durability
/// is the server's (its AOF/RDB settings).
///
/// # Examples
///
/// ```no_run
/// use smolkit::pool::Checkpoint;
/// use smolkit::redis::{RedisCheckpoint, RedisLink};
///
/// # smol::block_on(async {
/// let link = RedisLink::open("redis://127.0.0.1:6379/")?;
/// let cp = RedisCheckpoint::new(link, "import:orders:watermark");
/// cp.save(1200).await?;
/// cp.save(900).await?; // behind: ignored
/// assert_eq!(cp.load().await?, Some(1200));
/// # Ok::<_, Box<dyn std::error::Error>>(())
/// # });
/// ```
#[derive(Clone)]
pub struct RedisCheckpoint {
    link: RedisLink,
    key: String,
    script: Arc<Script>,
}

impl fmt::Debug for RedisCheckpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisCheckpoint")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl RedisCheckpoint {
    /// A checkpoint in `key`.
    pub fn new(link: RedisLink, key: impl Into<String>) -> Self {
        RedisCheckpoint {
            link,
            key: key.into(),
            script: Arc::new(Script::new(SAVE)),
        }
    }

    /// Deletes the stored watermark (a pipeline started afterwards begins
    /// at its source's start).
    ///
    /// # Errors
    ///
    /// [`CheckpointError::Backend`] if Redis cannot be reached.
    ///
    /// # Cancel safety
    ///
    /// If dropped, the key may or may not be deleted.
    pub async fn reset(&self) -> Result<(), CheckpointError> {
        let key = &self.key;
        self.link
            .run("DEL", |mut c, _| async move {
                ::redis::cmd("DEL").arg(key).query_async::<()>(&mut c).await
            })
            .await
            .map_err(|e| CheckpointError::Backend(e.to_string()))
    }
}

impl Checkpoint for RedisCheckpoint {
    fn load(&self) -> BoxFut<'_, Result<Option<u64>, CheckpointError>> {
        Box::pin(async move {
            let key = &self.key;
            let v: Option<String> = self
                .link
                .run("GET", |mut c, _| async move {
                    ::redis::cmd("GET").arg(key).query_async(&mut c).await
                })
                .await
                .map_err(|e| CheckpointError::Backend(e.to_string()))?;
            match v {
                None => Ok(None),
                Some(s) => s.parse().map(Some).map_err(|_| {
                    CheckpointError::Backend(format!(
                        "redis key {key} holds no watermark: {:?}",
                        s.chars().take(64).collect::<String>()
                    ))
                }),
            }
        })
    }

    fn save(&self, watermark: u64) -> BoxFut<'_, Result<(), CheckpointError>> {
        Box::pin(async move {
            let (key, script) = (&self.key, &self.script);
            let stored: String = self
                .link
                .run("checkpoint", |mut c, _| async move {
                    script.key(key).arg(watermark).invoke_async(&mut c).await
                })
                .await
                .map_err(|e| CheckpointError::Backend(e.to_string()))?;
            if stored != watermark.to_string() {
                tracing::debug!(key = %key, watermark, %stored, "checkpoint behind the stored one; kept");
            }
            Ok(())
        })
    }
}
