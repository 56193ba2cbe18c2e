//! WebSocket sessions that survive the network: heartbeat, reconnect with
//! backoff and `Retry-After`, a bounded lossless outbox, at-least-once
//! delivery, envelopes, compression, batching, and a pool.
//!
//! [`Session`] is one logical connection. One driver task owns the socket
//! (async-tungstenite on any executor, rustls with ring for `wss://`); the
//! application holds cheap handles to send, an incoming stream, and an
//! event stream. When the connection dies (a dropped socket, the server
//! going away, a missing pong) the driver reconnects on its backoff and
//! flushes what was queued meanwhile, in order, after the `on_connect`
//! hook has re-subscribed.
//!
//! Nothing is lost silently: messages sent while disconnected wait in the
//! outbox (bounded by count and bytes, with a chosen [`OutboxOverflow`] policy);
//! messages written to a socket that then died are reported in an
//! [`SessionEventKind::Unconfirmed`] event (a pong after them confirms them), or,
//! in at-least-once mode, kept until the server acknowledges them and
//! resent after a reconnect.
//!
//! [`Envelope<T>`] is the message shape (`type`, `payload`, `timestamp`,
//! `id`); [`Codec`] compresses large text frames with zlib (bounded on
//! inflation) and splits batch frames. [`SessionPool`] spreads sends over several
//! sessions to one endpoint.
//!
//! # Compared with
//!
//! ezsockets (tokio only) reconnects on a fixed delay without jitter and
//! discards what is sent while reconnecting; socket.io's client buffers
//! without a bound. tungstenite has no permessage-deflate, so compression
//! here is per message.

mod codec;
mod error;
mod message;
mod outbox;
mod pool;
mod session;

pub use codec::Codec;
pub use error::{Error, SendError};
pub use message::{Envelope, Message};
pub use outbox::OutboxOverflow;
pub use pool::{SessionPool, SessionPoolBuilder, Strategy};
pub use session::{
    CloseReport, ConnectInfo, Session, SessionBuilder, SessionEvent, SessionEventKind,
    SessionState, SessionStats,
};
