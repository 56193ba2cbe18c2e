//! One live connection: heartbeat, reading, writing and acks, polled in
//! one place by the driver.

use super::*;
use event_listener::IntoNotification;

#[derive(Deserialize)]
pub(super) struct AckIn {
    #[serde(rename = "type")]
    pub(super) kind: String,
    pub(super) id: serde_json::Value,
}

/// A frame that may be an ack: short, with `"ack"` in it (then parsed).
pub(super) fn maybe_ack(data: &[u8]) -> bool {
    data.len() <= 512 && data.windows(5).any(|w| w == b"\"ack\"")
}

pub(super) type Stall = Pin<Box<dyn Future<Output = ()> + Send>>;

/// One live connection's state, polled by the driver.
pub(super) struct Conn<'a> {
    pub(super) ws: WsStream,
    pub(super) driver: &'a Driver,
    pub(super) ping_timer: Option<Sleep>,
    /// (ping sequence awaited, deadline).
    pub(super) pong_deadline: Option<(u64, Sleep)>,
    pub(super) ping_seq: u64,
    pub(super) write_seq: u64,
    /// (ping sequence, last write sequence before it).
    pub(super) marks: VecDeque<(u64, u64)>,
    pub(super) ping_queue: VecDeque<u64>,
    /// A confirmation ping in flight.
    pub(super) confirm_ping: Option<u64>,
    /// Incoming messages waiting for room in the incoming queue.
    pub(super) stalled: Option<Stall>,
    pub(super) batch_timer: Option<(Instant, Sleep)>,
    pub(super) needs_flush: bool,
    pub(super) close_deadline: Option<Sleep>,
    pub(super) close_sent: bool,
    pub(super) server_close: Option<(u16, String)>,
    pub(super) decoded: Vec<Frame>,
    /// The peer sent a message over the size limit: the connection ends
    /// with a 1009 close frame.
    pub(super) too_big: bool,
}

/// Frames read or written per poll before yielding to other tasks.
const BUDGET: usize = 128;

impl Conn<'_> {
    pub(super) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<End> {
        let shared = &*self.driver.shared;
        shared.driver.register(cx.waker());
        if shared.closing() && self.close_deadline.is_none() {
            self.close_deadline = Some(shared.clock.sleep(self.driver.config.timing.close_timeout));
        }
        if let Some(d) = &mut self.close_deadline
            && d.poll(cx).is_ready()
        {
            tracing::debug!(session = shared.index, "ws close reply timed out");
            return Poll::Ready(End::Closed);
        }
        if let Some(end) = self.poll_heartbeat(cx) {
            return Poll::Ready(end);
        }
        if let Some(end) = self.poll_read(cx) {
            return Poll::Ready(end);
        }
        if let Some(end) = self.poll_write(cx) {
            return Poll::Ready(end);
        }
        Poll::Pending
    }

    pub(super) fn poll_heartbeat(&mut self, cx: &mut Context<'_>) -> Option<End> {
        let shared = &*self.driver.shared;
        let (interval, timeout) = self.driver.config.timing.heartbeat?;
        if let Some(timer) = &mut self.ping_timer
            && timer.poll(cx).is_ready()
        {
            let seq = self.queue_ping();
            if self.pong_deadline.is_none() {
                let mut deadline = shared.clock.sleep(timeout);
                let _ = deadline.poll(cx);
                self.pong_deadline = Some((seq, deadline));
            }
            let mut next = shared.clock.sleep(interval);
            let _ = next.poll(cx);
            self.ping_timer = Some(next);
        }
        if let Some((_, deadline)) = &mut self.pong_deadline
            && deadline.poll(cx).is_ready()
        {
            if self.stalled.is_some() {
                // NOTE: we stopped reading (the application is behind), so
                // a missing pong says nothing about the peer.
                let mut again = shared.clock.sleep(timeout);
                let _ = again.poll(cx);
                if let Some(pd) = &mut self.pong_deadline {
                    pd.1 = again;
                }
            } else {
                return Some(End::Dead(Error::PongTimeout { after: timeout }));
            }
        }
        None
    }

    /// Counts a frame of `payload` bytes handed to the connection.
    fn queued_wire(&self, payload: usize) {
        let c = &self.driver.shared.counters;
        c.wire_queued
            .fetch_add(super::event::wire_len(payload), Ordering::AcqRel);
    }

    /// Everything handed over is on the socket now.
    fn flushed(&mut self) {
        self.needs_flush = false;
        let c = &self.driver.shared.counters;
        c.wire_queued
            .store(c.wire_written.load(Ordering::Acquire), Ordering::Release);
    }

    pub(super) fn queue_ping(&mut self) -> u64 {
        self.ping_seq += 1;
        self.ping_queue.push_back(self.ping_seq);
        self.marks.push_back((self.ping_seq, self.write_seq));
        self.ping_seq
    }

    pub(super) fn on_pong(&mut self, payload: &[u8]) {
        let shared = &*self.driver.shared;
        bump(&shared.counters.pongs, 1);
        let Ok(bytes) = <[u8; 8]>::try_from(payload) else {
            return;
        };
        let seq = u64::from_be_bytes(bytes);
        if self.pong_deadline.as_ref().is_some_and(|(s, _)| *s <= seq) {
            self.pong_deadline = None;
        }
        if self.confirm_ping.is_some_and(|s| s <= seq) {
            self.confirm_ping = None;
        }
        let mut through = None;
        while self.marks.front().is_some_and(|(p, _)| *p <= seq) {
            through = self.marks.pop_front().map(|(_, w)| w);
        }
        if let Some(w) = through {
            // NOTE: in at-least-once mode a pong confirms only messages
            // without an id (raw sends); the others wait for their ack.
            let n = lock(&shared.outbox).confirm_through(w, shared.at_least_once);
            if n > 0 {
                shared.space.notify(n.additional());
            }
        }
    }

    pub(super) fn poll_read(&mut self, cx: &mut Context<'_>) -> Option<End> {
        for _ in 0..BUDGET {
            // NOTE: no reading while what was written (ours, or the pong
            // tungstenite queued for a ping just read) cannot be flushed: a
            // peer that sends and never reads then fills its own buffers,
            // not our memory. Reading resumes when the socket drains.
            if self.needs_flush {
                match Pin::new(&mut self.ws).poll_flush(cx) {
                    Poll::Pending => return None,
                    Poll::Ready(Err(e)) => {
                        if self.close_sent {
                            return Some(End::Closed);
                        }
                        return Some(End::Dead(Error::connection(e)));
                    }
                    Poll::Ready(Ok(())) => self.flushed(),
                }
            }
            if let Some(stall) = &mut self.stalled {
                match stall.as_mut().poll(cx) {
                    Poll::Ready(()) => self.stalled = None,
                    Poll::Pending => return None,
                }
            }
            let msg = match Pin::new(&mut self.ws).poll_next(cx) {
                Poll::Pending => return None,
                Poll::Ready(None) => return Some(self.ended()),
                Poll::Ready(Some(Err(e))) => {
                    if self.close_sent {
                        return Some(End::Closed);
                    }
                    self.too_big = matches!(e, tungstenite::Error::Capacity(_));
                    return Some(End::Dead(Error::connection(e)));
                }
                Poll::Ready(Some(Ok(m))) => m,
            };
            let frame = match msg {
                WsMessage::Text(t) => Frame {
                    text: true,
                    data: Bytes::from(t),
                },
                WsMessage::Binary(b) => Frame {
                    text: false,
                    data: b,
                },
                WsMessage::Pong(p) => {
                    self.on_pong(&p);
                    continue;
                }
                WsMessage::Ping(payload) => {
                    // tungstenite queued the pong; make sure it is flushed.
                    // (No more reading until it is: one pong at a time, so
                    // none is coalesced away from this count.)
                    self.queued_wire(payload.len());
                    self.needs_flush = true;
                    continue;
                }
                WsMessage::Close(frame) => {
                    // tungstenite answers with a close frame of its own.
                    if !self.close_sent {
                        self.queued_wire(2);
                    }
                    self.server_close = Some(frame.map_or((1005, String::new()), |f| {
                        (u16::from(f.code), f.reason.as_str().to_owned())
                    }));
                    self.needs_flush = true;
                    continue;
                }
                WsMessage::Frame(_) => continue,
            };
            // A stall is polled at the top of the loop (registering the
            // waker).
            self.deliver(frame);
        }
        // Budget spent: come back after other tasks had a turn.
        cx.waker().wake_by_ref();
        None
    }

    pub(super) fn ended(&self) -> End {
        let shared = &*self.driver.shared;
        if self.close_sent {
            if self.server_close.is_some() && !shared.at_least_once {
                // The server answered our close after reading everything
                // before it: all written messages arrived.
                let _ = lock(&shared.outbox).drain_inflight();
                shared.space.notify(usize::MAX);
            }
            return End::Closed;
        }
        match &self.server_close {
            Some((code, reason)) => End::Dead(Error::Connection {
                reason: format!("closed by the server: {code} {reason}")
                    .trim_end()
                    .to_owned(),
            }),
            None => End::Dead(Error::Connection {
                reason: "the connection closed without a close frame".into(),
            }),
        }
    }

    pub(super) fn deliver(&mut self, frame: Frame) {
        let shared = &*self.driver.shared;
        if shared.at_least_once
            && frame.text
            && maybe_ack(&frame.data)
            && let Ok(ack) = serde_json::from_slice::<AckIn>(&frame.data)
            && ack.kind == "ack"
        {
            let id = match ack.id {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            if lock(&shared.outbox).ack(&id) {
                bump(&shared.counters.acked, 1);
                shared.space.notify(1.additional());
            }
            return;
        }
        self.decoded.clear();
        if let Err(error) = self
            .driver
            .config
            .codec
            .decode_frame(frame, &mut self.decoded)
        {
            bump(&shared.counters.decode_errors, 1);
            tracing::warn!(session = shared.index, error = %error, "ws frame discarded");
            shared.emit(SessionEventKind::DecodeFailed { error });
            return;
        }
        let mut rest: VecDeque<Message> = VecDeque::new();
        for f in self.decoded.drain(..) {
            let m = f.into_message();
            if !rest.is_empty() {
                rest.push_back(m);
                continue;
            }
            match self.driver.incoming.try_send(m) {
                Ok(()) => bump(&shared.counters.received, 1),
                Err(async_channel::TrySendError::Full(m)) => rest.push_back(m),
                Err(async_channel::TrySendError::Closed(_)) => {}
            }
        }
        if !rest.is_empty() {
            let tx = self.driver.incoming.clone();
            let shared = self.driver.shared.clone();
            self.stalled = Some(Box::pin(async move {
                for m in rest {
                    if tx.send(m).await.is_ok() {
                        bump(&shared.counters.received, 1);
                    }
                }
            }));
        }
    }

    pub(super) fn poll_write(&mut self, cx: &mut Context<'_>) -> Option<End> {
        let shared = &*self.driver.shared;
        let config = &self.driver.config;
        let mut budget = BUDGET;
        loop {
            if budget == 0 {
                cx.waker().wake_by_ref();
                break;
            }
            budget -= 1;
            match Pin::new(&mut self.ws).poll_ready(cx) {
                Poll::Pending => return None,
                Poll::Ready(Err(e)) => return Some(End::Dead(Error::connection(e))),
                Poll::Ready(Ok(())) => {}
            }
            if let Some(seq) = self.ping_queue.pop_front() {
                bump(&shared.counters.pings, 1);
                let ping = WsMessage::Ping(Bytes::copy_from_slice(&seq.to_be_bytes()));
                self.queued_wire(8);
                if let Err(e) = Pin::new(&mut self.ws).start_send(ping) {
                    return Some(End::Dead(Error::connection(e)));
                }
                self.needs_flush = true;
                continue;
            }
            if self.close_sent {
                break;
            }
            let closing = shared.closing();
            let (max, max_bytes) = match config.batching {
                Some(b) => (b.max_messages, b.max_bytes),
                None => (1, usize::MAX),
            };
            let (taken, due) = {
                let mut outbox = lock(&shared.outbox);
                match (config.batching, outbox.pending.front()) {
                    // Hold a partial batch of envelopes for the window
                    // (not when closing, nor with a raw message behind it).
                    (Some(b), Some(front))
                        if !closing
                            && front.batchable
                            && outbox.pending.len() < b.max_messages
                            && shared.clock.now() < front.at + b.window
                            && outbox.pending.iter().all(|e| e.batchable) =>
                    {
                        (Vec::new(), Some(front.at + b.window))
                    }
                    _ => (outbox.take(max, max_bytes), None),
                }
            };
            if let Some(due) = due {
                if self.batch_timer.as_ref().map(|(at, _)| *at) != Some(due) {
                    self.batch_timer = Some((due, shared.clock.sleep_until(due)));
                }
                let waiting = match &mut self.batch_timer {
                    Some((_, timer)) => timer.poll(cx).is_pending(),
                    None => false,
                };
                if waiting {
                    break;
                }
                self.batch_timer = None;
                continue;
            }
            if taken.is_empty() {
                if self.confirm_for_flush() {
                    continue;
                }
                if closing {
                    if let Some(end) = self.start_close() {
                        return Some(end);
                    }
                    continue;
                }
                break;
            }
            if let Some(end) = self.write_frame(taken) {
                return Some(end);
            }
        }
        self.flush(cx)
    }

    /// Asks for a confirming pong now when a `Session::flushed` call waits
    /// for messages in flight (rather than at the next heartbeat or when
    /// the outbox is half full). Returns whether a ping was queued.
    fn confirm_for_flush(&mut self) -> bool {
        let shared = &*self.driver.shared;
        if self.confirm_ping.is_some() {
            return false;
        }
        let wanted = {
            let outbox = lock(&shared.outbox);
            let confirmable = if shared.at_least_once {
                outbox.raw_in_flight()
            } else {
                !outbox.inflight.is_empty()
            };
            outbox.wants_flush() && confirmable
        };
        if wanted {
            self.confirm_ping = Some(self.queue_ping());
        }
        wanted
    }

    /// Starts the application's close handshake; `Some(End::Closed)` when
    /// the frame cannot even be queued (the close is then done).
    fn start_close(&mut self) -> Option<End> {
        let close = WsMessage::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: Utf8Bytes::from_static("closed by the application"),
        }));
        self.queued_wire(2 + "closed by the application".len());
        if let Err(e) = Pin::new(&mut self.ws).start_send(close) {
            tracing::debug!(error = %e, "ws close frame not sent");
            return Some(End::Closed);
        }
        self.close_sent = true;
        self.needs_flush = true;
        None
    }

    /// Writes what was taken from the outbox as one frame (a batch frame
    /// for several), marks it in flight, and asks for a confirming pong
    /// when half the outbox is in flight.
    fn write_frame(&mut self, taken: Vec<Entry>) -> Option<End> {
        let shared = &*self.driver.shared;
        let n = taken.len();
        let frame = if n == 1 {
            taken[0].frame.clone()
        } else {
            batch_frame(taken.iter().map(|e| &e.frame.data))
        };
        let frame = self.driver.config.codec.encode_frame(frame);
        self.write_seq += 1;
        let half_full = lock(&shared.outbox).mark_written(taken, self.write_seq);
        self.queued_wire(frame.data.len());
        if let Err(e) = Pin::new(&mut self.ws).start_send(to_ws(frame)) {
            return Some(End::Dead(Error::connection(e)));
        }
        bump(&shared.counters.sent, n as u64);
        bump(&shared.counters.frames_sent, 1);
        self.needs_flush = true;
        // NOTE: acks confirm enveloped messages in at-least-once mode; raw
        // ones there, and everything otherwise, need a pong.
        let by_pong = !shared.at_least_once || lock(&shared.outbox).raw_in_flight();
        if half_full && by_pong && self.confirm_ping.is_none() {
            self.confirm_ping = Some(self.queue_ping());
        }
        None
    }

    /// Flushes what was written, if anything.
    fn flush(&mut self, cx: &mut Context<'_>) -> Option<End> {
        if self.needs_flush {
            match Pin::new(&mut self.ws).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.flushed(),
                Poll::Ready(Err(e)) => {
                    if self.close_sent {
                        return Some(End::Closed);
                    }
                    return Some(End::Dead(Error::connection(e)));
                }
                Poll::Pending => {}
            }
        }
        None
    }
}
