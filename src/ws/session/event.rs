//! A session's states, events, counters and close report.

use super::*;

/// Where a session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionState {
    /// Opening a connection (TCP, TLS, upgrade, the `on_connect` hook).
    Connecting,
    /// Connected; the outbox flows.
    Connected,
    /// Waiting before the next attempt.
    Reconnecting,
    /// Ended: closed by the application or given up.
    Closed,
}

impl SessionState {
    pub(super) fn from_u8(v: u8) -> SessionState {
        match v {
            0 => SessionState::Connecting,
            1 => SessionState::Connected,
            2 => SessionState::Reconnecting,
            _ => SessionState::Closed,
        }
    }
}

/// A state change or a report from a session, with the session's id (its
/// index in a [`SessionPool`](crate::ws::SessionPool), 0 for a lone session).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SessionEvent {
    /// Which session.
    pub session: usize,
    /// What happened.
    pub kind: SessionEventKind,
}

/// What an [`SessionEvent`] reports.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum SessionEventKind {
    /// Attempt `attempt` (1 for the first since the last connection).
    Connecting {
        /// The attempt number.
        attempt: u32,
    },
    /// Connected (the hook has run, the outbox is about to flush).
    Connected {
        /// Connections made so far, this one included.
        connection: u64,
    },
    /// An attempt failed.
    ConnectFailed {
        /// The attempt number.
        attempt: u32,
        /// Why.
        error: Error,
    },
    /// A connection ended: the peer went away, the network failed, or no
    /// pong arrived in time.
    Disconnected {
        /// Why.
        error: Error,
    },
    /// The next attempt starts after `delay`.
    Reconnecting {
        /// The attempt it will be.
        attempt: u32,
        /// The wait.
        delay: Duration,
        /// Whether the delay is the server's `Retry-After`.
        retry_after: bool,
    },
    /// Messages written to a socket that then died, with no pong after
    /// them: the peer may or may not have them. Resend them if they must
    /// arrive (or use at-least-once mode, which does).
    Unconfirmed {
        /// The messages, in the order they were sent.
        messages: Vec<Message>,
    },
    /// At-least-once mode: unacknowledged messages queued again to be
    /// resent on the new connection.
    Resending {
        /// How many.
        count: usize,
    },
    /// The outbox was full and its policy dropped the oldest messages.
    Dropped {
        /// How many.
        count: usize,
    },
    /// An incoming frame did not decode (a compression bomb, a bad batch)
    /// and was discarded.
    DecodeFailed {
        /// Why.
        error: Error,
    },
    /// The session ended; `error` is `None` when the application closed
    /// it.
    Closed {
        /// Why, if not by the application.
        error: Option<Error>,
    },
}

/// How a session ended, from [`Session::close`] and [`Session::closed`].
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct CloseReport {
    /// `None` when the application closed it; the give-up error otherwise.
    pub error: Option<Error>,
    /// Messages never written to a socket, in order.
    pub unsent: Vec<Message>,
    /// Messages written but never confirmed (no pong or close reply after
    /// them; in at-least-once mode, not acknowledged).
    pub unconfirmed: Vec<Message>,
}

/// Counters of one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct SessionStats {
    /// Messages written to a socket (a batch counts each message; a resend
    /// counts again).
    pub sent: u64,
    /// Frames written (batches count once).
    pub frames_sent: u64,
    /// Messages delivered to the application (after splitting batches).
    pub received: u64,
    /// Connections made.
    pub connections: u64,
    /// Connections made after the first.
    pub reconnects: u64,
    /// Messages dropped by [`OutboxOverflow::DropOldest`].
    pub dropped: u64,
    /// Messages reported in [`SessionEventKind::Unconfirmed`].
    pub unconfirmed: u64,
    /// At-least-once: messages acknowledged by the server.
    pub acked: u64,
    /// At-least-once: messages queued again after a reconnect.
    pub resent: u64,
    /// Incoming frames that did not decode.
    pub decode_errors: u64,
    /// Pings sent (heartbeats and confirmations).
    pub pings: u64,
    /// Pongs received.
    pub pongs: u64,
    /// Events dropped because nobody read the event stream (the oldest go
    /// first).
    pub events_dropped: u64,
    /// Messages in the outbox now (waiting or in flight).
    pub queued: usize,
    /// Bytes in the outbox now.
    pub queued_bytes: usize,
    /// Bytes handed to the connection (frames with their headers, and the
    /// pongs and close replies the WebSocket layer queues by itself) that
    /// the socket has not taken yet: what a peer that stops reading leaves
    /// in our memory. Bounded by the outbox's byte limit plus 64 KiB.
    pub unflushed_bytes: u64,
}

#[derive(Default)]
pub(super) struct Counters {
    pub(super) sent: AtomicU64,
    pub(super) frames_sent: AtomicU64,
    pub(super) received: AtomicU64,
    pub(super) connections: AtomicU64,
    pub(super) dropped: AtomicU64,
    pub(super) unconfirmed: AtomicU64,
    pub(super) acked: AtomicU64,
    pub(super) resent: AtomicU64,
    pub(super) decode_errors: AtomicU64,
    pub(super) pings: AtomicU64,
    pub(super) pongs: AtomicU64,
    pub(super) events_dropped: AtomicU64,
    /// Wire bytes handed to the current connection.
    pub(super) wire_queued: AtomicU64,
    /// Wire bytes the current connection's socket took.
    pub(super) wire_written: std::sync::Arc<AtomicU64>,
}

/// The bytes a client frame with `payload` bytes takes on the wire: the
/// header (2 bytes, the extended length, the 4-byte mask) and the payload.
pub(super) fn wire_len(payload: usize) -> u64 {
    let ext = match payload {
        0..=125 => 0,
        126..=65535 => 2,
        _ => 8,
    };
    (2 + ext + 4 + payload) as u64
}

pub(super) fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Information the `on_connect` hook gets.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConnectInfo {
    /// The session's id.
    pub session: usize,
    /// Connections made so far, this one included (1 on the first).
    pub connection: u64,
}
