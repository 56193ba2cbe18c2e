//! `ws::Error` and `SendError`.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use super::Message;
use crate::ConfigError;

/// What went wrong with a session, a connection or a frame.
///
/// Cloneable (I/O causes are shared) so one error can be reported in an
/// event and returned to every caller waiting on the session.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Error {
    /// The URL does not parse or has no host.
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// Why it was refused.
        reason: String,
    },
    /// A builder setting that cannot work (the URL included).
    Config(ConfigError),
    /// The TCP connection failed.
    Connect {
        /// `host:port`.
        addr: String,
        /// The cause.
        source: Arc<io::Error>,
    },
    /// TCP, TLS and the upgrade did not finish within the connect timeout.
    ConnectTimeout {
        /// `host:port`.
        addr: String,
        /// The timeout.
        after: Duration,
    },
    /// The TLS handshake failed (an untrusted certificate, for one).
    Tls {
        /// The server name.
        host: String,
        /// The cause.
        source: Arc<io::Error>,
    },
    /// The server refused the upgrade or answered something else.
    Handshake {
        /// The URL.
        url: String,
        /// The HTTP status, when the server answered with one.
        status: Option<u16>,
        /// The delay its `Retry-After` header asked for (429 and 503).
        retry_after: Option<Duration>,
        /// What the handshake reported.
        reason: String,
    },
    /// The connection failed after the upgrade (I/O, a protocol
    /// violation, an incoming message over the size limit).
    Connection {
        /// What the socket reported.
        reason: String,
    },
    /// No pong arrived within the heartbeat timeout.
    PongTimeout {
        /// The timeout.
        after: Duration,
    },
    /// A compressed frame inflated past the codec's limit (a compression
    /// bomb); nothing past the limit was allocated.
    Inflated {
        /// The frame's size on the wire.
        compressed: usize,
        /// The limit.
        limit: usize,
    },
    /// A frame or message that does not decode.
    Decode {
        /// Why.
        reason: String,
    },
    /// The `on_connect` hook failed.
    Hook {
        /// Its error, rendered.
        reason: String,
    },
    /// The reconnect policy gave up.
    GaveUp {
        /// Connection attempts made since the last connection.
        attempts: u32,
        /// The last attempt's error.
        last: Box<Error>,
    },
    /// The session is closed.
    Closed,
    /// An envelope's payload did not serialise.
    Encode {
        /// serde's message.
        reason: String,
    },
    /// Messages that [`Session::flushed`](super::Session::flushed) waited
    /// for were dropped (`DropOldest`) or written to a connection that died
    /// before confirming them (reported in `SessionEventKind::Unconfirmed`).
    Unconfirmed {
        /// How many.
        messages: usize,
    },
}

impl Error {
    pub(crate) fn connection(e: impl fmt::Display) -> Self {
        Error::Connection {
            reason: e.to_string(),
        }
    }

    /// The `Retry-After` delay of a refused handshake.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Handshake { retry_after, .. } => *retry_after,
            Error::GaveUp { last, .. } => last.retry_after(),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidUrl { url, reason } => {
                write!(f, "invalid WebSocket URL {url:?}: {reason}")
            }
            Error::Config(e) => e.fmt(f),
            Error::Connect { addr, source } => write!(f, "cannot connect to {addr}: {source}"),
            Error::ConnectTimeout { addr, after } => {
                write!(f, "connecting to {addr} took longer than {after:?}")
            }
            Error::Tls { host, source } => write!(f, "TLS handshake with {host} failed: {source}"),
            Error::Handshake {
                url,
                status,
                retry_after,
                reason,
            } => {
                write!(f, "WebSocket handshake with {url} failed")?;
                if let Some(s) = status {
                    write!(f, " with status {s}")?;
                }
                if let Some(r) = retry_after {
                    write!(f, " (retry after {r:?})")?;
                }
                write!(f, ": {reason}")
            }
            Error::Connection { reason } => write!(f, "WebSocket connection failed: {reason}"),
            Error::PongTimeout { after } => write!(f, "no pong within {after:?}"),
            Error::Inflated { compressed, limit } => write!(
                f,
                "a compressed frame of {compressed} bytes inflates past the limit of {limit} bytes"
            ),
            Error::Decode { reason } => write!(f, "cannot decode a message: {reason}"),
            Error::Hook { reason } => write!(f, "the on_connect hook failed: {reason}"),
            Error::GaveUp { attempts, last } => {
                write!(f, "gave up reconnecting after {attempts} attempts: {last}")
            }
            Error::Closed => f.write_str("the session is closed"),
            Error::Encode { reason } => write!(f, "envelope does not serialise: {reason}"),
            Error::Unconfirmed { messages } => write!(
                f,
                "{messages} messages were dropped or left unconfirmed by a dead connection"
            ),
        }
    }
}

impl From<ConfigError> for Error {
    fn from(e: ConfigError) -> Self {
        Error::Config(e)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Connect { source, .. } | Error::Tls { source, .. } => Some(&**source),
            Error::GaveUp { last, .. } => Some(&**last),
            Error::Config(e) => Some(e),
            _ => None,
        }
    }
}

/// A message the session did not take, handed back where there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SendError {
    /// The outbox is full and its policy is [`OutboxOverflow::Error`](super::OutboxOverflow::Error).
    Full(Message),
    /// The session is closed.
    Closed(Message),
    /// The message alone is larger than the outbox's byte limit.
    TooLarge {
        /// Its size.
        size: usize,
        /// The outbox's limit.
        limit: usize,
    },
    /// The envelope does not serialise.
    Encode {
        /// serde's error, rendered.
        reason: String,
    },
}

impl SendError {
    /// The message, when the error holds it.
    pub fn into_message(self) -> Option<Message> {
        match self {
            SendError::Full(m) | SendError::Closed(m) => Some(m),
            _ => None,
        }
    }
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::Full(m) => {
                write!(f, "the outbox is full ({} byte message refused)", m.len())
            }
            SendError::Closed(_) => f.write_str("the session is closed"),
            SendError::TooLarge { size, limit } => write!(
                f,
                "a {size} byte message is larger than the outbox's {limit} byte limit"
            ),
            SendError::Encode { reason } => write!(f, "cannot serialise the envelope: {reason}"),
        }
    }
}

impl std::error::Error for SendError {}
