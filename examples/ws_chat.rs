//! The seeds' WebSocket chat client (SCENARIOS.md §4) against the embedded
//! ChaosServer (no internet needed):
//!
//! 1. a chat session joins a room from its `on_connect` hook (so it joins
//!    again after every reconnect) and sends 30 messages;
//! 2. the server drops the connection twice mid-conversation, on the 10th
//!    message of each of the first two connections, before acknowledging
//!    it;
//! 3. the session notices, reconnects on its backoff, re-joins, and resends
//!    what the server had not acknowledged (at-least-once mode): every
//!    message reaches the server, in order of first arrival, and the
//!    broadcasts come back to the client;
//! 4. a heartbeat runs throughout (a dead peer would be found by its
//!    missing pong).
//!
//! Run: `cargo run --release --features testing --example ws_chat`

use std::collections::BTreeSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use smolkit::resilience::{Backoff, Jitter};
use smolkit::testing::ChaosServer;
use smolkit::ws::{Codec, Envelope, Session, SessionEventKind};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Chat {
    from: String,
    text: String,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    smol::block_on(async {
        let server = ChaosServer::start().await?;
        // Broadcast to the room, ack every envelope, and drop each of the
        // first two connections on its 10th message.
        let url = server.ws_url("/ws?mode=broadcast&ack=1&drop_after=10&drops=2&key=chat");
        let session = Session::builder(&url)
            .with_heartbeat((Duration::from_secs(5), Duration::from_secs(2)))
            .with_reconnect(
                Backoff::exponential(Duration::from_millis(50))
                    .with_max_delay(Duration::from_secs(2))
                    .with_jitter(Jitter::Full),
            )
            .with_at_least_once(true)
            .with_codec(Codec::new().with_compress_above(Some(4096)))
            .on_connect(|info| async move {
                let join = Envelope::new("join", format!("ann (connection {})", info.connection));
                Ok(vec![join.to_message()?])
            })
            .connect()
            .await?;

        let events = session.events();
        let watcher = smol::spawn(async move {
            while let Ok(ev) = events.recv().await {
                match ev.kind {
                    SessionEventKind::Disconnected { error } => {
                        println!("  ! disconnected: {error}")
                    }
                    SessionEventKind::Reconnecting { delay, .. } => {
                        println!("  ~ reconnecting in {} ms", delay.as_millis())
                    }
                    SessionEventKind::Connected { connection } => {
                        println!("  + connected (#{connection})")
                    }
                    SessionEventKind::Resending { count } => {
                        println!("  ~ resending {count} unacked")
                    }
                    SessionEventKind::Closed { .. } => break,
                    _ => {}
                }
            }
        });

        let n = 30;
        for i in 0..n {
            let chat = Chat {
                from: "ann".into(),
                text: format!("message {i}"),
            };
            session.send_envelope(Envelope::new("chat", chat)).await?;
            smol::Timer::after(Duration::from_millis(5)).await;
        }

        // Wait until the server has acknowledged everything sent.
        session.flushed().await?;
        assert_eq!(session.stats().acked, n);

        // What the server received: every chat message at least once.
        let codec = Codec::new();
        let mut first_seen = Vec::new();
        let mut joins = 0;
        for record in server.ws_messages() {
            for m in codec.decode(record.message)? {
                let env: Envelope<serde_json::Value> = m.envelope()?;
                match env.kind.as_str() {
                    "chat" => {
                        let id = env.id.unwrap_or_default();
                        if !first_seen.contains(&id) {
                            first_seen.push(id);
                        }
                    }
                    "join" => joins += 1,
                    _ => {}
                }
            }
        }
        // The broadcasts that came back (a resent message may come twice).
        let mut back = BTreeSet::new();
        while let Ok(m) = session.incoming().try_recv() {
            if let Ok(env) = m.envelope::<Chat>() {
                back.insert(env.payload.text);
            }
        }

        let stats = session.stats();
        let report = session.close().await;
        watcher.await;
        println!(
            "sent {n} chat messages over {} connections ({} joins); server has {} distinct, \
             acked {}, resent {}, broadcasts back {}; unsent at close {}",
            stats.connections,
            joins,
            first_seen.len(),
            stats.acked,
            stats.resent,
            back.len(),
            report.unsent.len() + report.unconfirmed.len(),
        );
        let in_order: Vec<String> = (1..=n).map(|i| i.to_string()).collect();
        assert_eq!(
            first_seen, in_order,
            "every message arrived, first arrivals in order"
        );
        assert_eq!(stats.connections, 3, "dropped twice, reconnected twice");
        assert_eq!(joins, 3, "the hook joined on every connection");
        assert!(report.unsent.is_empty() && report.unconfirmed.is_empty());
        println!("no message lost");
        Ok(())
    })
}
