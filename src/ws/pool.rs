//! `ws::Pool`: several sessions to one endpoint.

use std::sync::atomic::{AtomicUsize, Ordering};

use async_channel::Receiver;
use serde::Serialize;

use super::session::Channels;
use super::{
    CloseReport, Envelope, Error, Message, SendError, Session, SessionBuilder, SessionEvent,
    SessionState, SessionStats,
};

/// How a [`SessionPool`] picks the session for a send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Strategy {
    /// The next connected session in turn (any session in turn when none
    /// is connected).
    #[default]
    RoundRobin,
    /// The connected session with the fewest messages in its outbox (any
    /// session's, fewest first, when none is connected: a session that is
    /// down has an empty queue too, but is passed over while one is up).
    LeastQueued,
}

/// Configures a [`SessionPool`].
///
/// # Default
///
/// Round-robin ([`Strategy::RoundRobin`]); the session builder's own
/// defaults for each session.
#[derive(Debug, Clone)]
pub struct SessionPoolBuilder {
    session: SessionBuilder,
    size: usize,
    strategy: Strategy,
}

impl SessionPoolBuilder {
    /// How sends pick a session (default round-robin).
    pub fn with_strategy(mut self, strategy: Strategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// Starts every session; each connects and reconnects on its own.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for a size of zero, or the session builder's
    /// configuration error.
    pub fn start(self) -> Result<SessionPool, Error> {
        crate::ConfigError::nonzero("pool size", self.size)?;
        let channels = Channels {
            incoming: async_channel::bounded(self.session.incoming_capacity_value()),
            events: async_channel::bounded(self.session.events_capacity_value()),
        };
        let mut sessions = Vec::with_capacity(self.size);
        for index in 0..self.size {
            let mut b = self.session.clone();
            b.index = index;
            b.channels = Some(channels.clone());
            match b.start() {
                Ok(s) => sessions.push(s),
                Err(e) => {
                    for s in &sessions {
                        s.shutdown();
                    }
                    return Err(e);
                }
            }
        }
        Ok(SessionPool {
            sessions,
            strategy: self.strategy,
            next: AtomicUsize::new(0),
            incoming: channels.incoming.1,
            events: channels.events.1,
        })
    }

    /// [`start`](SessionPoolBuilder::start), then waits until every session has
    /// connected once.
    ///
    /// # Errors
    ///
    /// As for `start`, or the first session error that ends a session
    /// before it connects.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future leaves the sessions started so far to close when
    /// their handles drop (they are dropped with it).
    pub async fn connect(self) -> Result<SessionPool, Error> {
        let pool = self.start()?;
        for s in &pool.sessions {
            s.wait_connected().await?;
        }
        Ok(pool)
    }
}

/// `N` sessions to one endpoint with one incoming stream and one event
/// stream (events carry the session's index).
///
/// Each send goes to one session chosen by the [`Strategy`]; order holds
/// per session, not across the pool.
///
/// ```
/// # #[cfg(feature = "testing")] {
/// use smolkit::testing::ChaosServer;
/// use smolkit::ws::{SessionPool, Session};
///
/// # smol::block_on(async {
/// let server = ChaosServer::start().await.unwrap();
/// let pool = SessionPool::builder(Session::builder(&server.ws_url("/ws")), 3)
///     .connect()
///     .await
///     .unwrap();
/// for i in 0..6 {
///     pool.send(format!("m{i}")).await.unwrap();
/// }
/// for _ in 0..6 {
///     pool.recv().await.unwrap();
/// }
/// assert!(pool.stats().iter().all(|s| s.sent == 2));
/// pool.close().await;
/// # });
/// # }
/// ```
#[derive(Debug)]
pub struct SessionPool {
    sessions: Vec<Session>,
    strategy: Strategy,
    next: AtomicUsize,
    incoming: Receiver<Message>,
    events: Receiver<SessionEvent>,
}

impl SessionPool {
    /// A pool of `size` sessions built from `session`.
    pub fn builder(session: SessionBuilder, size: usize) -> SessionPoolBuilder {
        SessionPoolBuilder {
            session,
            size,
            strategy: Strategy::RoundRobin,
        }
    }

    /// The sessions, by index.
    pub fn sessions(&self) -> &[Session] {
        &self.sessions
    }

    /// The session the next send goes to.
    pub fn pick(&self) -> &Session {
        let n = self.sessions.len();
        match self.strategy {
            Strategy::RoundRobin => {
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                (0..n)
                    .map(|k| &self.sessions[(start + k) % n])
                    .find(|s| s.state() == SessionState::Connected)
                    .unwrap_or(&self.sessions[start % n])
            }
            Strategy::LeastQueued => {
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                let order = (0..n).map(|k| &self.sessions[(start + k) % n]);
                // NOTE: a session that is down has an empty queue too; it is
                // picked only when none is connected.
                order
                    .clone()
                    .filter(|s| s.state() == SessionState::Connected)
                    .min_by_key(|s| s.queued())
                    .or_else(|| order.min_by_key(|s| s.queued()))
                    .unwrap_or(&self.sessions[0])
            }
        }
    }

    /// Sends through the picked session ([`Session::send`]).
    ///
    /// # Errors
    ///
    /// As for [`Session::send`].
    ///
    /// # Cancel safety
    ///
    /// As [`Session::send`]: a message still waiting for room in the outbox
    /// is dropped with the future.
    pub async fn send(&self, message: impl Into<Message>) -> Result<(), SendError> {
        self.pick().send(message).await
    }

    /// Sends an envelope through the picked session.
    ///
    /// # Errors
    ///
    /// As for [`Session::send_envelope`].
    ///
    /// # Cancel safety
    ///
    /// As [`Session::send`].
    pub async fn send_envelope<T: Serialize>(
        &self,
        envelope: Envelope<T>,
    ) -> Result<Option<String>, SendError> {
        self.pick().send_envelope(envelope).await
    }

    /// The next message from any session.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: a message is taken from the shared stream only when the
    /// future completes.
    pub async fn recv(&self) -> Option<Message> {
        self.incoming.recv().await.ok()
    }

    /// Every session's incoming messages as one stream.
    pub fn incoming(&self) -> Receiver<Message> {
        self.incoming.clone()
    }

    /// Every session's events as one stream.
    pub fn events(&self) -> Receiver<SessionEvent> {
        self.events.clone()
    }

    /// Each session's counters, by index.
    pub fn stats(&self) -> Vec<SessionStats> {
        self.sessions.iter().map(Session::stats).collect()
    }

    /// Closes every session; their reports by index.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future stops waiting for the reports; every session was
    /// already told to close and finishes closing in its driver task.
    pub async fn close(&self) -> Vec<CloseReport> {
        for s in &self.sessions {
            s.shutdown();
        }
        let mut out = Vec::with_capacity(self.sessions.len());
        for s in &self.sessions {
            out.push(s.closed().await);
        }
        out
    }
}
