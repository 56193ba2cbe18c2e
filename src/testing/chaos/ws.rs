//! The `ChaosServer`'s WebSocket endpoint: echo, broadcast, acks, and
//! faults (dropped connections, unanswered pings, refused handshakes).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use crate::net::HyperIo;
use ::http::header::{CONNECTION, RETRY_AFTER, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE};
use ::http::{HeaderValue, Request, Response, StatusCode};
use async_tungstenite::WebSocketStream;
use async_tungstenite::tungstenite::handshake::derive_accept_key;
use async_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use async_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use async_tungstenite::tungstenite::{Message as WsMessage, Utf8Bytes};
use futures_lite::{FutureExt, StreamExt};

use super::{ServerIo, State, text};
use crate::http::Body;
use crate::runtime::SpawnExt;
use crate::sync::lock_std as lock;
use crate::ws::{Codec, Message};

/// One data message the WebSocket endpoint received.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WsRecord {
    /// Which WebSocket connection (1 for the first accepted).
    pub connection: u64,
    /// The frame's content as received (compressed and batch frames are
    /// not decoded; [`Codec::decode`] does that).
    pub message: Message,
}

pub(crate) struct WsState {
    log: std::sync::Mutex<Vec<WsRecord>>,
    log_limit: usize,
    refusals: std::sync::Mutex<HashMap<String, u64>>,
    keys: std::sync::Mutex<HashMap<String, u64>>,
    peers: std::sync::Mutex<HashMap<u64, Peer>>,
    accepted: AtomicU64,
    open: AtomicUsize,
    generation: AtomicU64,
    dropped: event_listener::Event,
}

struct Peer {
    broadcast: bool,
    tx: async_channel::Sender<WsMessage>,
}

#[derive(Debug, Clone)]
struct Options {
    echo: bool,
    broadcast: bool,
    ack: bool,
    drop_after: Option<u64>,
    mute_after: Option<u64>,
}

impl WsState {
    /// Logs a data message, up to the log limit.
    fn record(&self, connection: u64, message: &Message) {
        let mut log = lock(&self.log);
        if log.len() < self.log_limit {
            log.push(WsRecord {
                connection,
                message: message.clone(),
            });
        }
    }

    /// Sends `msg` to every connection in broadcast mode.
    fn broadcast(&self, msg: &WsMessage) {
        let peers: Vec<_> = lock(&self.peers)
            .values()
            .filter(|p| p.broadcast)
            .map(|p| p.tx.clone())
            .collect();
        for p in peers {
            let _ = p.try_send(msg.clone());
        }
    }

    pub(crate) fn new(log_limit: usize) -> Self {
        WsState {
            log: Default::default(),
            log_limit,
            refusals: Default::default(),
            keys: Default::default(),
            peers: Default::default(),
            accepted: AtomicU64::new(0),
            open: AtomicUsize::new(0),
            generation: AtomicU64::new(0),
            dropped: event_listener::Event::new(),
        }
    }

    pub(crate) fn messages(&self) -> Vec<WsRecord> {
        lock(&self.log).clone()
    }

    pub(crate) fn clear(&self) {
        lock(&self.log).clear();
        lock(&self.refusals).clear();
        lock(&self.keys).clear();
    }

    pub(crate) fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Acquire)
    }

    pub(crate) fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Drops every WebSocket connection without a close frame.
    pub(crate) fn drop_all(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.dropped.notify(usize::MAX);
    }

    /// Sends `message` to every open WebSocket connection; how many.
    pub(crate) fn send_all(&self, message: Message) -> usize {
        let msg = to_ws(message);
        lock(&self.peers)
            .values()
            .filter(|p| p.tx.try_send(msg.clone()).is_ok())
            .count()
    }
}

fn to_ws(m: Message) -> WsMessage {
    match m {
        Message::Text(s) => WsMessage::Text(Utf8Bytes::from(s)),
        Message::Binary(b) => WsMessage::Binary(b.into()),
    }
}

/// Answers `GET /ws`: a refusal, or 101 with the connection handed to a
/// WebSocket task.
pub(crate) fn upgrade(
    mut req: Request<hyper::body::Incoming>,
    state: &Arc<State>,
    q: &HashMap<String, String>,
) -> Response<Body> {
    let num = |k: &str| q.get(k).and_then(|v| v.parse::<u64>().ok());
    let key = q.get("key").cloned().unwrap_or_default();
    if let Some(n) = num("refuse") {
        let count = {
            let mut map = lock(&state.ws.refusals);
            let c = map.entry(key.clone()).or_insert(0);
            *c += 1;
            *c
        };
        if count <= n {
            let status = q
                .get("status")
                .and_then(|v| v.parse::<u16>().ok())
                .unwrap_or(503);
            let mut r = text(status, "refused by the chaos server");
            if let Some(ra) = q
                .get("retry_after")
                .and_then(|v| HeaderValue::from_str(v).ok())
            {
                r.headers_mut().insert(RETRY_AFTER, ra);
            }
            return r;
        }
    }
    let is_ws = req
        .headers()
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let Some(accept) = req
        .headers()
        .get(SEC_WEBSOCKET_KEY)
        .filter(|_| is_ws)
        .map(|k| derive_accept_key(k.as_bytes()))
    else {
        return text(400, "not a WebSocket upgrade");
    };
    let nth = {
        let mut map = lock(&state.ws.keys);
        let c = map.entry(key).or_insert(0);
        *c += 1;
        *c
    };
    let drops = num("drops").unwrap_or(u64::MAX);
    let broadcast = q.get("mode").is_some_and(|m| m == "broadcast");
    let options = Options {
        echo: q.get("echo").map_or(!broadcast, |v| v != "0"),
        broadcast,
        ack: q.get("ack").is_some_and(|v| v != "0"),
        drop_after: num("drop_after").filter(|_| nth <= drops),
        mute_after: num("mute_after").or_else(|| q.get("mute").filter(|v| *v != "0").map(|_| 0)),
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let task_state = state.clone();
    state
        .spawner
        .spawn_named("chaos-ws", async move {
            let upgraded = match on_upgrade.await {
                Ok(u) => u,
                Err(e) => {
                    tracing::debug!(error = %e, "chaos ws upgrade failed");
                    return;
                }
            };
            let parts = match upgraded.downcast::<HyperIo<ServerIo>>() {
                Ok(p) => p,
                Err(_) => {
                    tracing::warn!("chaos ws: unexpected upgraded I/O type");
                    return;
                }
            };
            let ws = WebSocketStream::from_partially_read(
                parts.io.into_inner(),
                parts.read_buf.to_vec(),
                Role::Server,
                None,
            )
            .await;
            serve(ws, task_state, options).await;
        })
        .detach();
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(SEC_WEBSOCKET_ACCEPT, v);
    }
    r
}

enum Step {
    In(Option<Result<WsMessage, async_tungstenite::tungstenite::Error>>),
    Out(WsMessage),
    Stop,
    Drop,
}

async fn serve(mut ws: WebSocketStream<ServerIo>, state: Arc<State>, opt: Options) {
    let ws_state = &state.ws;
    let id = ws_state.accepted.fetch_add(1, Ordering::AcqRel) + 1;
    ws_state.open.fetch_add(1, Ordering::AcqRel);
    let generation = ws_state.generation.load(Ordering::Acquire);
    let (tx, rx) = async_channel::bounded(1024);
    lock(&ws_state.peers).insert(
        id,
        Peer {
            broadcast: opt.broadcast,
            tx,
        },
    );
    let mut stop = state.stop.listen();
    let mut dropped = ws_state.dropped.listen();
    let codec = Codec::new();
    let mut received = 0u64;
    let mut muted = opt.mute_after == Some(0);
    loop {
        if state.stopped.load(Ordering::Acquire) {
            break going_away(&mut ws).await;
        }
        if ws_state.generation.load(Ordering::Acquire) != generation {
            break;
        }
        let read = async {
            if muted {
                // Not reading: pings go unanswered, data piles up in TCP.
                std::future::pending::<()>().await;
            }
            Step::In(ws.next().await)
        };
        let step = read
            .or(async { rx.recv().await.map_or(Step::Stop, Step::Out) })
            .or(async {
                (&mut stop).await;
                Step::Stop
            })
            .or(async {
                (&mut dropped).await;
                Step::Drop
            })
            .await;
        let msg = match step {
            Step::Stop => {
                going_away(&mut ws).await;
                break;
            }
            Step::Drop => break,
            Step::Out(m) => {
                if ws.send(m).await.is_err() {
                    break;
                }
                continue;
            }
            Step::In(None) | Step::In(Some(Err(_))) => break,
            Step::In(Some(Ok(m))) => m,
        };
        let message = match &msg {
            WsMessage::Text(t) => Message::Text(t.as_str().to_owned()),
            WsMessage::Binary(b) => Message::Binary(b.to_vec()),
            _ => continue,
        };
        received += 1;
        ws_state.record(id, &message);
        if opt.drop_after.is_some_and(|n| received >= n) {
            tracing::debug!(connection = id, received, "chaos ws drops the connection");
            break;
        }
        if opt.mute_after.is_some_and(|n| received >= n) {
            muted = true;
        }
        if opt.ack
            && let Err(e) = send_acks(&mut ws, &codec, message).await
        {
            tracing::debug!(error = %e, "chaos ws ack failed");
            break;
        }
        if opt.broadcast {
            ws_state.broadcast(&msg);
        } else if opt.echo && ws.send(msg).await.is_err() {
            break;
        }
    }
    lock(&ws_state.peers).remove(&id);
    ws_state.open.fetch_sub(1, Ordering::AcqRel);
}

async fn going_away(ws: &mut WebSocketStream<ServerIo>) {
    let close = ws.close(Some(CloseFrame {
        code: CloseCode::Away,
        reason: Utf8Bytes::from_static("server restarting"),
    }));
    let _ = close
        .or(async {
            async_io::Timer::after(Duration::from_millis(200)).await;
            Ok(())
        })
        .await;
}

async fn send_acks(
    ws: &mut WebSocketStream<ServerIo>,
    codec: &Codec,
    message: Message,
) -> Result<(), async_tungstenite::tungstenite::Error> {
    let Ok(items) = codec.decode(message) else {
        return Ok(());
    };
    for item in items {
        let Some(text) = item.as_text() else { continue };
        let Ok(value) = serde_json::from_str::<serde_json::Value>(text) else {
            continue;
        };
        if let Some(id) = value.get("id") {
            let ack = format!(r#"{{"type":"ack","id":{id}}}"#);
            ws.send(WsMessage::Text(Utf8Bytes::from(ack))).await?;
        }
    }
    Ok(())
}
