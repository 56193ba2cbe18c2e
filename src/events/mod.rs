//! An in-process event bus with wildcard topics.
//!
//! [`Bus`] routes each emitted event to every subscription whose pattern
//! matches its topic. Topics are `.`-separated words (`orders.eu.created`);
//! patterns may use `*` for exactly one word and `#` for zero or more
//! (RabbitMQ's convention): `orders.*.created`, `orders.#`, `#`.
//!
//! Each subscription has its own bounded queue and [`Overflow`] policy, so
//! one slow subscriber cannot lose another's events: `Wait` applies
//! backpressure to the emitter, `DropOldest`/`DropNewest` shed load and
//! count what they shed. Handlers registered with [`Bus::on`] run on their
//! own tasks with a concurrency limit; an error or a panic in one is
//! reported on [`Bus::errors`] and through `tracing`, and never reaches
//! the emitter or another handler.
//!
//! # Compared with broadcast channels
//!
//! tokio's `broadcast` and `async-broadcast` share one ring among all
//! receivers: a lagging receiver loses messages (tokio) or blocks everyone
//! (async-broadcast with overflow off). Here the policy is per subscriber.
//!
//! Subscriptions with the same pattern, capacity and policy share one
//! ring with a cursor each, so an emit writes each event once however many
//! of them there are; each still counts its own deliveries and losses, and
//! an event is freed when the last of them has read it. A `Wait`
//! subscription holds back the emitter, as before, by the events it has not
//! read; a `DropOldest` one that falls behind skips what was overwritten
//! and counts it; `DropNewest` subscriptions never share.

mod bus;
mod emit;
mod ring;
mod subscription;
mod topic;

pub use bus::{
    Bus, BusBuilder, BusStats, EmitError, Event, HandlerFailure, HandlerId, Overflow,
    SubscriberStats, TryEmitError,
};
pub use emit::Publisher;
pub use subscription::{SubscribeOptions, Subscriber};
pub use topic::TopicError;
