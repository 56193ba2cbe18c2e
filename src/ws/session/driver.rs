//! The driver task: the connect loop with backoff, the handshake, and
//! one connection's lifetime.

use super::*;
use crate::sync::unless;

/// What ended a connection.
pub(super) enum End {
    /// The application's close finished (or timed out).
    Closed,
    /// The connection died; reconnect.
    Dead(Error),
}

pub(super) struct Driver {
    pub(super) config: Config,
    pub(super) shared: Arc<Shared>,
    pub(super) incoming: Sender<Message>,
}

impl Driver {
    pub(super) async fn run(self) {
        let shared = self.shared.clone();
        let error = self.connect_loop().await;
        let (pending, inflight) = lock(&shared.outbox).close();
        shared.space.notify(usize::MAX);
        let report = CloseReport {
            error: error.clone(),
            unsent: pending
                .into_iter()
                .map(|e| e.frame.into_message())
                .collect(),
            unconfirmed: inflight
                .into_iter()
                .map(|e| e.frame.into_message())
                .collect(),
        };
        match &error {
            Some(e) => tracing::warn!(session = shared.index, error = %e, "ws session ended"),
            None => tracing::debug!(session = shared.index, "ws session closed"),
        }
        *lock(&shared.report) = Some(report);
        shared.set_state(SessionState::Closed);
        shared.emit(SessionEventKind::Closed { error });
        // NOTE: no `close()` on the incoming channel: a pool's sessions
        // share it. It ends when the last driver drops its sender.
    }

    /// Returns the give-up error, or `None` when closed by the application.
    pub(super) async fn connect_loop(&self) -> Option<Error> {
        let shared = &*self.shared;
        let clock = &shared.clock;
        let mut backoff = self.config.timing.backoff.clone();
        backoff.reset();
        let mut attempt: u32 = 0;
        let mut down_since = clock.now();
        loop {
            if shared.closing() {
                return None;
            }
            attempt += 1;
            shared.set_state(SessionState::Connecting);
            shared.emit(SessionEventKind::Connecting { attempt });
            let opened = unless(self.open(), shared.close_requested()).await;
            let failure = match opened {
                None => return None,
                Some(Ok(ws)) => {
                    let connection =
                        shared.counters.connections.fetch_add(1, Ordering::Relaxed) + 1;
                    let opened_at = clock.now();
                    let ended = self.serve(ws, connection).await;
                    // NOTE: the schedule starts over only after a connection
                    // that stayed up for the stable period; a server that
                    // accepts and drops at once gets the growing delays
                    // (and counts towards giving up), not a reconnect per
                    // first delay forever.
                    if clock.now().saturating_duration_since(opened_at)
                        >= self.config.timing.stable_after
                    {
                        attempt = 0;
                        backoff.reset();
                    }
                    match ended {
                        End::Closed => return None,
                        End::Dead(error) => {
                            tracing::info!(session = shared.index, error = %error, "ws disconnected");
                            // NOTE: the state moves before the event that
                            // announces it, so a reader of the event never
                            // sees a live connection in `state()`.
                            shared.set_state(SessionState::Reconnecting);
                            shared.emit(SessionEventKind::Disconnected {
                                error: error.clone(),
                            });
                            self.after_disconnect();
                            down_since = clock.now();
                            error
                        }
                    }
                }
                Some(Err(error)) => {
                    tracing::debug!(session = shared.index, attempt, error = %error, "ws connect failed");
                    shared.emit(SessionEventKind::ConnectFailed {
                        attempt,
                        error: error.clone(),
                    });
                    error
                }
            };
            if self
                .config
                .timing
                .max_attempts
                .is_some_and(|max| attempt >= max)
            {
                return Some(Error::GaveUp {
                    attempts: attempt,
                    last: Box::new(failure),
                });
            }
            // NOTE: capped, as the ApiClient caps it: a server's "come back
            // in a day" (or a date in 2100) must not park the session.
            let server_delay = failure
                .retry_after()
                .map(|d| d.min(self.config.timing.max_retry_after));
            let delay = match (server_delay, backoff.next()) {
                (Some(d), _) => d,
                (None, Some(d)) => d,
                (None, None) => {
                    return Some(Error::GaveUp {
                        attempts: attempt,
                        last: Box::new(failure),
                    });
                }
            };
            if let Some(limit) = self.config.timing.give_up_after
                && clock.now() + delay > down_since + limit
            {
                return Some(Error::GaveUp {
                    attempts: attempt,
                    last: Box::new(failure),
                });
            }
            shared.set_state(SessionState::Reconnecting);
            shared.emit(SessionEventKind::Reconnecting {
                attempt: attempt + 1,
                delay,
                retry_after: server_delay.is_some(),
            });
            let slept = async {
                clock.sleep(delay).await;
                true
            }
            .or(async {
                shared.close_requested().await;
                false
            })
            .await;
            if !slept {
                return None;
            }
        }
    }

    /// Unconfirmed messages of a dead connection: reported, or queued
    /// again in at-least-once mode.
    pub(super) fn after_disconnect(&self) {
        let shared = &*self.shared;
        let lost = {
            let mut outbox = lock(&shared.outbox);
            let lost = if shared.at_least_once {
                let (n, raw) = outbox.requeue_inflight();
                if n > 0 {
                    bump(&shared.counters.resent, n as u64);
                    shared.emit(SessionEventKind::Resending { count: n });
                }
                raw
            } else {
                outbox.drain_inflight()
            };
            outbox.note_lost(&lost);
            lost
        };
        shared.space.notify(usize::MAX);
        if !lost.is_empty() {
            bump(&shared.counters.unconfirmed, lost.len() as u64);
            tracing::warn!(
                session = shared.index,
                messages = lost.len(),
                "ws messages written to a socket that died, unconfirmed"
            );
            shared.emit(SessionEventKind::Unconfirmed {
                messages: lost.into_iter().map(|e| e.frame.into_message()).collect(),
            });
        }
    }

    pub(super) async fn open(&self) -> Result<WsStream, Error> {
        let t = &self.config.target;
        let addr = format!("{}:{}", t.host, t.port);
        let connect = async {
            let io = net::dial(&t.host, t.port, t.tls.then_some(&self.config.tls))
                .await
                .map_err(|e| match e {
                    DialError::Connect(source) => Error::Connect {
                        addr: addr.clone(),
                        source: Arc::new(source),
                    },
                    DialError::Tls(source) => Error::Tls {
                        host: t.host.clone(),
                        source: Arc::new(source),
                    },
                })?;
            let mut request =
                t.url
                    .as_str()
                    .into_client_request()
                    .map_err(|e| Error::InvalidUrl {
                        url: t.url.clone(),
                        reason: e.to_string(),
                    })?;
            for (name, value) in &self.config.headers {
                if let (Ok(n), Ok(v)) = (
                    http::HeaderName::from_bytes(name.as_bytes()),
                    http::HeaderValue::from_str(value),
                ) {
                    request.headers_mut().append(n, v);
                }
            }
            let max = self.config.codec.max_message_size();
            // NOTE: tungstenite's write buffer is unbounded by default; ours
            // holds at most the outbox's bytes plus control frames, so no
            // frame sequence from the peer can grow it past that.
            let defaults = WebSocketConfig::default();
            let write_cap = self
                .shared
                .outbox_bytes_limit()
                .saturating_add(WRITE_HEADROOM)
                .max(defaults.write_buffer_size * 2);
            // NOTE: tungstenite zeroes the free part of its read buffer
            // (up to `read_buffer_size`, 128 KiB by default) before every
            // read, including each read that finds nothing (a poll after a
            // wake-up for a write): with the default that memset was 9% of
            // an echo round trip. 16 KiB reads still take a 1 KiB message,
            // or a burst of them, in one call.
            let ws_config = defaults
                .read_buffer_size(READ_BUFFER)
                .max_message_size(Some(max))
                .max_frame_size(Some(max))
                .max_write_buffer_size(write_cap);
            let counters = &self.shared.counters;
            let io = Counted {
                io,
                written: counters.wire_written.clone(),
            };
            let (ws, _) = async_tungstenite::client_async_with_config(request, io, Some(ws_config))
                .await
                .map_err(|e| handshake_error(&t.url, e))?;
            // A new connection: nothing of it is waiting to be written.
            counters.wire_queued.store(
                counters.wire_written.load(Ordering::Acquire),
                Ordering::Release,
            );
            Ok(ws)
        };
        match self.config.timing.connect_timeout {
            Some(after) => {
                let clock = &self.shared.clock;
                connect
                    .or(async {
                        // A timeout that rarely fires: off the reactor's
                        // timers (see `Clock::watchdog`).
                        clock.watchdog(after).await;
                        Err(Error::ConnectTimeout {
                            addr: addr.clone(),
                            after,
                        })
                    })
                    .await
            }
            None => connect.await,
        }
    }

    /// Runs one connection: hook, then the poll loop.
    pub(super) async fn serve(&self, mut ws: WsStream, connection: u64) -> End {
        let shared = &*self.shared;
        if let Some(hook) = &self.config.on_connect {
            let info = ConnectInfo {
                session: shared.index,
                connection,
            };
            // NOTE: bounded (by default as the connect is): a hook that
            // hangs would hold the session in Connecting forever.
            let limit = match self.config.timing.hook_timeout {
                Some(limit) => limit,
                None => self.config.timing.connect_timeout,
            };
            let run = async {
                match limit {
                    Some(after) => crate::resilience::timeout_on(&*shared.clock, after, hook(info))
                        .await
                        .unwrap_or_else(|_| Err(format!("timed out after {after:?}").into())),
                    None => hook(info).await,
                }
            };
            let messages = match unless(run, shared.close_requested()).await {
                None => return End::Closed,
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    return End::Dead(Error::Hook {
                        reason: e.to_string(),
                    });
                }
            };
            for m in messages {
                let frame = self.config.codec.encode_frame(m.into_frame());
                if let Err(e) = send_now(&mut ws, to_ws(frame)).await {
                    return End::Dead(Error::connection(e));
                }
            }
        }
        shared.set_state(SessionState::Connected);
        shared.emit(SessionEventKind::Connected { connection });
        tracing::debug!(session = shared.index, connection, url = %self.config.target.url, "ws connected");
        let clock = &shared.clock;
        let mut conn = Conn {
            ws,
            driver: self,
            ping_timer: self.config.timing.heartbeat.map(|(i, _)| clock.sleep(i)),
            pong_deadline: None,
            ping_seq: 0,
            write_seq: 0,
            marks: VecDeque::new(),
            ping_queue: VecDeque::new(),
            confirm_ping: None,
            stalled: None,
            batch_timer: None,
            needs_flush: false,
            close_deadline: None,
            close_sent: false,
            server_close: None,
            decoded: Vec::new(),
            too_big: false,
        };
        let end = std::future::poll_fn(|cx| conn.poll(cx)).await;
        if conn.too_big {
            // RFC 6455 §7.4.1: 1009, the message was too big to process.
            // Bounded: a peer that does not read must not hold us here.
            let frame = CloseFrame {
                code: CloseCode::Size,
                reason: Utf8Bytes::from_static("message too big"),
            };
            let limit = self.config.timing.close_timeout;
            let _ =
                crate::resilience::timeout_on(&*shared.clock, limit, conn.ws.close(Some(frame)))
                    .await;
        }
        end
    }
}

/// Room in the socket's write buffer beyond the outbox's bytes: frame
/// headers, pings, pongs and a close frame.
const WRITE_HEADROOM: usize = 64 << 10;

/// The most tungstenite reads (and zeroes first) in one go.
const READ_BUFFER: usize = 16 << 10;

pub(super) fn handshake_error(url: &str, e: tungstenite::Error) -> Error {
    match e {
        tungstenite::Error::Http(resp) => {
            let status = resp.status().as_u16();
            let retry_after = if status == 429 || status == 503 {
                net::retry_after(resp.headers())
            } else {
                None
            };
            let body = resp.body().as_deref().map(net::excerpt).unwrap_or_default();
            Error::Handshake {
                url: url.to_owned(),
                status: Some(status),
                retry_after,
                reason: format!("the server answered {status} {body}")
                    .trim_end()
                    .to_owned(),
            }
        }
        tungstenite::Error::Io(io) => Error::Connection {
            reason: format!("during the handshake: {io}"),
        },
        other => Error::Handshake {
            url: url.to_owned(),
            status: None,
            retry_after: None,
            reason: other.to_string(),
        },
    }
}

pub(super) fn to_ws(frame: Frame) -> WsMessage {
    if frame.text {
        // NOTE: text frames come from `String`s, so this always succeeds.
        match Utf8Bytes::try_from(frame.data.clone()) {
            Ok(s) => WsMessage::Text(s),
            Err(_) => WsMessage::Binary(frame.data),
        }
    } else {
        WsMessage::Binary(frame.data)
    }
}

pub(super) async fn send_now(ws: &mut WsStream, msg: WsMessage) -> Result<(), tungstenite::Error> {
    std::future::poll_fn(|cx| Pin::new(&mut *ws).poll_ready(cx)).await?;
    Pin::new(&mut *ws).start_send(msg)?;
    std::future::poll_fn(|cx| Pin::new(&mut *ws).poll_flush(cx)).await
}
