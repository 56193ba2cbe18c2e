//! The seeds' "event-driven architecture" scenario (article 002, §6): an
//! event bus with `on(type, handler)` and `emit(event)`, handlers running
//! concurrently with their errors isolated from each other, and `stop()`.
//!
//! Handlers subscribe with wildcards (`order.*`, `#`); one handler fails
//! on some events and panics on another, and the others never notice; a
//! slow dashboard stream keeps only the newest events (drop oldest); the
//! shutdown waits until every handler has handled what was emitted.
//!
//! Run: `cargo run --release --example event_bus`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_lite::StreamExt;
use smolkit::events::{Bus, Overflow, SubscribeOptions};

#[derive(Debug, Clone)]
struct Order {
    id: u32,
    amount_cents: u64,
}

fn main() {
    smol::block_on(async {
        let bus = Bus::<Order>::builder()
            .with_retained(true)
            .build()
            .expect("valid bus settings");

        let revenue = Arc::new(AtomicU64::new(0));
        let r = revenue.clone();
        bus.on_with(
            "order.created",
            SubscribeOptions::new()
                .with_name("revenue")
                .with_concurrency(4),
            move |ev| {
                let r = r.clone();
                async move {
                    smol::Timer::after(Duration::from_millis(1)).await;
                    r.fetch_add(ev.payload.amount_cents, Ordering::Relaxed);
                    Ok::<_, String>(())
                }
            },
        )
        .unwrap();

        let mailed = Arc::new(AtomicU64::new(0));
        let m = mailed.clone();
        bus.on_with(
            "order.*",
            SubscribeOptions::new().with_name("mailer"),
            move |ev| {
                let m = m.clone();
                async move {
                    if ev.payload.id == 13 {
                        panic!("template missing for order 13");
                    }
                    if ev.payload.id % 10 == 0 {
                        return Err(format!("mail server refused order {}", ev.payload.id));
                    }
                    m.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
            },
        )
        .unwrap();

        // A dashboard that reads slowly and only wants the latest events.
        let mut dashboard = bus
            .subscribe_with(
                "#",
                SubscribeOptions::new()
                    .with_name("dashboard")
                    .with_capacity(5)
                    .with_overflow(Overflow::DropOldest),
            )
            .unwrap();

        for id in 1..=50u32 {
            let order = Order {
                id,
                amount_cents: 1_000 + u64::from(id) * 10,
            };
            let topic = if id % 5 == 0 {
                "order.cancelled"
            } else {
                "order.created"
            };
            bus.emit(topic, order).await.unwrap();
        }

        // A late subscriber still sees the last order of each topic.
        let mut late = bus.subscribe("order.*").unwrap();
        let mut last = Vec::new();
        while let Some(ev) = late.try_next() {
            last.push(format!("{} #{}", ev.topic, ev.payload.id));
        }
        last.sort();

        let errors = bus.errors();
        bus.shutdown().await;

        let mut seen = Vec::new();
        while let Some(ev) = dashboard.next().await {
            seen.push(ev.payload.id);
        }
        println!("handler failures (isolated; the other handlers carried on):");
        while let Ok(f) = errors.try_recv() {
            let kind = if f.panicked { "panic" } else { "error" };
            println!("  {:<8} {:<16} {kind}: {}", f.handler, f.topic, f.error);
        }
        let s = bus.stats();
        println!();
        println!("emitted            {}", s.emitted);
        println!("queued for subs    {}", s.delivered);
        println!("dropped (dashboard, drop-oldest) {}", s.dropped);
        println!(
            "revenue            {:.2}",
            revenue.load(Ordering::Relaxed) as f64 / 100.0
        );
        println!("mails sent         {}", mailed.load(Ordering::Relaxed));
        println!("dashboard kept     {seen:?}");
        println!("retained for late  {last:?}");
    });
}
