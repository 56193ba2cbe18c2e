//! `Session`: one reconnecting WebSocket connection driven by one task.

mod builder;
mod conn;
mod driver;
mod event;

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_channel::{Receiver, Sender};
use async_tungstenite::WebSocketStream;
use async_tungstenite::tungstenite::{
    self, Message as WsMessage, Utf8Bytes, client::IntoClientRequest, protocol::CloseFrame,
    protocol::WebSocketConfig, protocol::frame::coding::CloseCode,
};
use atomic_waker::AtomicWaker;
use bytes::Bytes;
use event_listener::Event as Notify;
use futures_lite::FutureExt;
use futures_lite::Stream;
use futures_sink::Sink;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

use crate::ConfigError;
use crate::net::{self, ClientIo, DialError, TlsOptions};
use crate::resilience::{Backoff, Jitter};
use crate::runtime::{Clock, Sleep, Spawn, SpawnExt, SystemClock, default_spawner};
use crate::sync::lock_std as lock;
use crate::ws::codec::{Codec, batch_frame};
use crate::ws::message::{Envelope, Frame, Message};
use crate::ws::outbox::{Entry, Outbox, OutboxOverflow, Refused};
use crate::ws::{Error, SendError};

pub(crate) use builder::Channels;
use builder::Config;
pub use builder::SessionBuilder;
use conn::*;
use driver::*;
pub use event::{
    CloseReport, ConnectInfo, SessionEvent, SessionEventKind, SessionState, SessionStats,
};
use event::{Counters, bump};

type WsStream = WebSocketStream<Counted<ClientIo>>;

/// The socket, counting the bytes it takes (for
/// [`SessionStats::unflushed_bytes`]).
struct Counted<T> {
    io: T,
    written: Arc<AtomicU64>,
}

impl<T: futures_lite::AsyncRead + Unpin> futures_lite::AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: futures_lite::AsyncWrite + Unpin> futures_lite::AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.written.fetch_add(*n as u64, Ordering::AcqRel);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_close(cx)
    }
}
type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Hook = Arc<
    dyn Fn(ConnectInfo) -> Pin<Box<dyn Future<Output = Result<Vec<Message>, BoxError>> + Send>>
        + Send
        + Sync,
>;

pub(crate) struct Shared {
    index: usize,
    outbox: Mutex<Outbox>,
    overflow: OutboxOverflow,
    at_least_once: bool,
    clock: Arc<dyn Clock>,
    next_id: AtomicU64,
    /// The driver task, woken when the outbox gets work or a close is
    /// requested.
    driver: AtomicWaker,
    /// Senders waiting for room.
    space: Notify,
    close_requested: AtomicBool,
    close: Notify,
    state: AtomicU8,
    changed: Notify,
    report: Mutex<Option<CloseReport>>,
    handles: AtomicUsize,
    counters: Counters,
    events: Sender<SessionEvent>,
}

impl Shared {
    fn emit(&self, kind: SessionEventKind) {
        let event = SessionEvent {
            session: self.index,
            kind,
        };
        if let Ok(Some(_)) = self.events.force_send(event) {
            bump(&self.counters.events_dropped, 1);
        }
    }

    /// The outbox's byte limit.
    fn outbox_bytes_limit(&self) -> usize {
        lock(&self.outbox).max_bytes
    }

    fn set_state(&self, s: SessionState) {
        self.state.store(s as u8, Ordering::Release);
        self.changed.notify(usize::MAX);
    }

    fn request_close(&self) {
        self.close_requested.store(true, Ordering::Release);
        self.close.notify(usize::MAX);
        self.driver.wake();
    }

    fn closing(&self) -> bool {
        self.close_requested.load(Ordering::Acquire)
    }

    /// Resolves when a close is requested.
    async fn close_requested(&self) {
        crate::sync::wait_for(&self.close, || self.closing()).await
    }
}

/// A reconnecting WebSocket client session.
///
/// One driver task per session owns the socket: it connects (with backoff
/// and jitter, honouring `Retry-After`), runs the `on_connect` hook,
/// flushes the outbox in order, pings on the heartbeat and declares the
/// peer dead when no pong comes, and reconnects. Messages sent while
/// disconnected wait in the bounded outbox; messages written to a socket
/// that then died are reported ([`SessionEventKind::Unconfirmed`]) or, in
/// at-least-once mode, resent. Handles are cheap to clone; the session
/// closes when [`close`](Session::close) is called or the last handle is
/// dropped.
///
/// # Examples
///
/// ```
/// # #[cfg(feature = "testing")] {
/// use smolkit::testing::ChaosServer;
/// use smolkit::ws::{Message, Session};
///
/// # smol::block_on(async {
/// let server = ChaosServer::start().await.unwrap();
/// let session = Session::builder(&server.ws_url("/ws")).connect().await.unwrap();
/// session.send("hello").await.unwrap();
/// assert_eq!(session.recv().await, Some(Message::Text("hello".into())));
/// let report = session.close().await;
/// assert!(report.error.is_none() && report.unsent.is_empty());
/// # });
/// # }
/// ```
pub struct Session {
    shared: Arc<Shared>,
    incoming: Receiver<Message>,
    events: Receiver<SessionEvent>,
}

impl Clone for Session {
    fn clone(&self) -> Self {
        self.shared.handles.fetch_add(1, Ordering::AcqRel);
        Session {
            shared: self.shared.clone(),
            incoming: self.incoming.clone(),
            events: self.events.clone(),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.shared.handles.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.request_close();
        }
    }
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.shared.index)
            .field("state", &self.state())
            .field("queued", &self.queued())
            .finish()
    }
}

impl Session {
    /// A builder for a session to `url` (`ws://` or `wss://`).
    pub fn builder(url: &str) -> SessionBuilder {
        SessionBuilder::new(url)
    }

    /// Connects with the defaults and waits for the first connection.
    ///
    /// # Errors
    ///
    /// See [`SessionBuilder::connect`].
    ///
    /// # Cancel safety
    ///
    /// As [`SessionBuilder::connect`].
    pub async fn connect(url: &str) -> Result<Session, Error> {
        SessionBuilder::new(url).connect().await
    }

    /// The session's id (its index in a pool).
    pub fn id(&self) -> usize {
        self.shared.index
    }

    /// Queues `message` (a raw frame: never batched); waits for room with
    /// [`OutboxOverflow::Wait`].
    ///
    /// # Errors
    ///
    /// [`SendError::Full`] (policy `Error`), [`SendError::TooLarge`],
    /// [`SendError::Closed`].
    ///
    /// # Cancel safety
    ///
    /// A message that is already in the outbox stays there (it is sent). With
    /// [`OutboxOverflow::Wait`] and a full outbox, the future holds the
    /// message while it waits: dropping it then drops that message, unsent
    /// and uncounted. Use [`try_send`](Session::try_send) to keep the message
    /// on a full outbox.
    pub async fn send(&self, message: impl Into<Message>) -> Result<(), SendError> {
        let frame = message.into().into_frame();
        self.push(frame, None, false, true).await
    }

    /// Like [`send`](Session::send) but never waits: a full outbox under
    /// [`OutboxOverflow::Wait`] is [`SendError::Full`].
    ///
    /// # Errors
    ///
    /// As for `send`.
    pub fn try_send(&self, message: impl Into<Message>) -> Result<(), SendError> {
        let frame = message.into().into_frame();
        let entry = self.entry(frame, None, false);
        self.push_now(entry).map_err(refusal)
    }

    /// Queues an envelope as JSON text; it may share a batch frame. In
    /// at-least-once mode an envelope without an id gets one, and the id is
    /// returned.
    ///
    /// # Errors
    ///
    /// [`SendError::Encode`] when `T` does not serialise, else as for
    /// [`send`](Session::send).
    ///
    /// # Cancel safety
    ///
    /// As [`send`](Session::send).
    pub async fn send_envelope<T: Serialize>(
        &self,
        mut envelope: Envelope<T>,
    ) -> Result<Option<String>, SendError> {
        if self.shared.at_least_once && envelope.id.is_none() {
            let n = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
            envelope.id = Some(n.to_string());
        }
        let json = serde_json::to_string(&envelope).map_err(|e| SendError::Encode {
            reason: e.to_string(),
        })?;
        let frame = Frame {
            text: true,
            data: Bytes::from(json),
        };
        let id = envelope.id.clone();
        self.push(frame, envelope.id, true, true).await?;
        Ok(id)
    }

    fn entry(&self, frame: Frame, id: Option<String>, batchable: bool) -> Entry {
        Entry {
            frame,
            id,
            batchable,
            at: self.shared.clock.now(),
            number: 0,
        }
    }

    async fn push(
        &self,
        frame: Frame,
        id: Option<String>,
        batchable: bool,
        wait: bool,
    ) -> Result<(), SendError> {
        let mut entry = self.entry(frame, id, batchable);
        loop {
            let listener = self.shared.space.listen();
            match self.push_now(entry) {
                Ok(()) => return Ok(()),
                // NOTE: `DropOldest` waits too when everything in the
                // outbox is in flight (written messages are never dropped).
                Err(Refused::Full(back))
                    if wait && self.shared.overflow != OutboxOverflow::Error =>
                {
                    entry = back;
                    listener.await;
                }
                Err(r) => return Err(refusal(r)),
            }
        }
    }

    fn push_now(&self, entry: Entry) -> Result<(), Refused> {
        let shared = &self.shared;
        let drop_oldest = shared.overflow == OutboxOverflow::DropOldest;
        let result = lock(&shared.outbox).push(entry, drop_oldest);
        match result {
            Ok(dropped) => {
                shared.driver.wake();
                if !dropped.is_empty() {
                    // Wakes `flushed` callers too.
                    shared.space.notify(usize::MAX);
                    let n = dropped.len();
                    bump(&shared.counters.dropped, n as u64);
                    tracing::debug!(
                        session = shared.index,
                        dropped = n,
                        "ws outbox full: dropped the oldest"
                    );
                    shared.emit(SessionEventKind::Dropped { count: n });
                }
                Ok(())
            }
            Err(r) => Err(r),
        }
    }

    /// Waits until every message sent before this call has left the
    /// outbox confirmed: by a pong to a later ping (the default mode) or by
    /// the server's ack (at-least-once mode). Messages sent after the call
    /// do not hold it up.
    ///
    /// ```
    /// # #[cfg(feature = "testing")] {
    /// use smolkit::testing::ChaosServer;
    /// use smolkit::ws::Session;
    ///
    /// # smol::block_on(async {
    /// let server = ChaosServer::start().await.unwrap();
    /// let session = Session::connect(&server.ws_url("/ws?echo=0")).await.unwrap();
    /// for i in 0..10 {
    ///     session.send(format!("tick {i}")).await.unwrap();
    /// }
    /// session.flushed().await.unwrap();
    /// assert_eq!(server.ws_messages().len(), 10);
    /// # });
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Unconfirmed`] when some of those messages were dropped
    /// (`DropOldest`) or were on a connection that died before confirming
    /// them (in at-least-once mode they are resent instead, and waited
    /// for); [`Error::Closed`] when the session closed with some of them
    /// still in the outbox (they are in its [`CloseReport`]).
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it only watches; the messages stay in the outbox.
    pub async fn flushed(&self) -> Result<(), Error> {
        let shared = &*self.shared;
        let waiter = lock(&shared.outbox).watch_flush();
        // The driver asks for a confirming pong as soon as it sees a flush
        // waiting, rather than at the next heartbeat.
        shared.driver.wake();
        let done = crate::sync::wait_until(&shared.space, || {
            let outbox = lock(&shared.outbox);
            outbox
                .flushed_through(waiter.target)
                .then_some(outbox.closed)
        })
        .await;
        lock(&shared.outbox).unwatch_flush(&waiter);
        match waiter.lost.load(Ordering::Relaxed) {
            0 => Ok(()),
            _ if done => Err(Error::Closed),
            messages => Err(Error::Unconfirmed { messages }),
        }
    }

    /// Asks the driver to close without waiting (see
    /// [`close`](Session::close)).
    pub fn shutdown(&self) {
        self.shared.request_close();
    }

    /// The next incoming message; `None` once the session has ended and
    /// every message has been read.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: a message is taken from the incoming queue only when the
    /// future completes.
    pub async fn recv(&self) -> Option<Message> {
        self.incoming.recv().await.ok()
    }

    /// The incoming messages as a stream (clones share one queue).
    pub fn incoming(&self) -> Receiver<Message> {
        self.incoming.clone()
    }

    /// The session's events (clones share one queue; see
    /// [`SessionBuilder::with_events_capacity`]).
    pub fn events(&self) -> Receiver<SessionEvent> {
        self.events.clone()
    }

    /// Where the session is.
    pub fn state(&self) -> SessionState {
        SessionState::from_u8(self.shared.state.load(Ordering::Acquire))
    }

    /// Messages in the outbox (waiting or in flight).
    pub fn queued(&self) -> usize {
        lock(&self.shared.outbox).len()
    }

    /// The counters.
    pub fn stats(&self) -> SessionStats {
        let c = &self.shared.counters;
        let (queued, queued_bytes) = {
            let o = lock(&self.shared.outbox);
            (o.len(), o.bytes())
        };
        let connections = c.connections.load(Ordering::Relaxed);
        SessionStats {
            sent: c.sent.load(Ordering::Relaxed),
            frames_sent: c.frames_sent.load(Ordering::Relaxed),
            received: c.received.load(Ordering::Relaxed),
            connections,
            reconnects: connections.saturating_sub(1),
            dropped: c.dropped.load(Ordering::Relaxed),
            unconfirmed: c.unconfirmed.load(Ordering::Relaxed),
            acked: c.acked.load(Ordering::Relaxed),
            resent: c.resent.load(Ordering::Relaxed),
            decode_errors: c.decode_errors.load(Ordering::Relaxed),
            pings: c.pings.load(Ordering::Relaxed),
            pongs: c.pongs.load(Ordering::Relaxed),
            events_dropped: c.events_dropped.load(Ordering::Relaxed),
            queued,
            queued_bytes,
            unflushed_bytes: c
                .wire_queued
                .load(Ordering::Acquire)
                .saturating_sub(c.wire_written.load(Ordering::Acquire)),
        }
    }

    /// Waits until the session is connected.
    ///
    /// # Errors
    ///
    /// The session's error if it ends first ([`Error::Closed`] when it was
    /// closed by the application).
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it only watches the state.
    pub async fn wait_connected(&self) -> Result<(), Error> {
        crate::sync::wait_until(&self.shared.changed, || match self.state() {
            SessionState::Connected => Some(Ok(())),
            SessionState::Closed => {
                let report = lock(&self.shared.report).clone();
                Some(Err(report.and_then(|r| r.error).unwrap_or(Error::Closed)))
            }
            _ => None,
        })
        .await
    }

    /// Closes the session: writes what is waiting in the outbox if
    /// connected, sends a close frame (1000), waits for the server's reply
    /// (at most the close timeout) and ends the driver. Returns what was
    /// left.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future stops waiting for the report; the close was
    /// already asked for and the driver finishes it.
    pub async fn close(&self) -> CloseReport {
        self.shared.request_close();
        self.closed().await
    }

    /// Waits for the session to end (closed or given up).
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it only waits for the report.
    pub async fn closed(&self) -> CloseReport {
        crate::sync::wait_until(&self.shared.changed, || lock(&self.shared.report).clone()).await
    }
}

fn refusal(r: Refused) -> SendError {
    match r {
        Refused::Full(e) => SendError::Full(e.frame.into_message()),
        Refused::Closed(e) => SendError::Closed(e.frame.into_message()),
        Refused::TooLarge(size, limit) => SendError::TooLarge { size, limit },
    }
}
