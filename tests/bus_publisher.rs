//! `Publisher`: `emit` on one topic without the per-event look-up, kept
//! current as subscriptions come and go.

mod common;

use common::within;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use smolkit::events::{Bus, EmitError, Overflow, SubscribeOptions, Subscriber};

fn poll<F: Future>(fut: &mut Pin<Box<F>>) -> Poll<F::Output> {
    fut.as_mut().poll(&mut Context::from_waker(Waker::noop()))
}

fn now<F: Future>(fut: F) -> F::Output {
    match poll(&mut Box::pin(fut)) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("expected it to finish at once"),
    }
}

fn drain(sub: &mut Subscriber<u32>) -> Vec<(String, u32)> {
    std::iter::from_fn(|| sub.try_next().map(|e| (e.topic.to_string(), e.payload))).collect()
}

#[test]
fn a_publisher_delivers_what_emit_would_and_is_counted() {
    let bus = Bus::<u32>::new();
    let mut all = bus.subscribe("orders.#").unwrap();
    let mut eu = bus.subscribe("orders.eu.*").unwrap();
    let mut us = bus.subscribe("orders.us.*").unwrap();
    let mut p = bus.publisher("orders.eu.created").unwrap();
    assert_eq!(p.topic(), "orders.eu.created");
    assert_eq!(now(p.publish(1)).unwrap(), 2);
    assert_eq!(now(bus.emit("orders.eu.created", 2)).unwrap(), 2);
    assert_eq!(now(p.publish(3)).unwrap(), 2);
    let want: Vec<(String, u32)> = [1, 2, 3]
        .into_iter()
        .map(|n| ("orders.eu.created".to_owned(), n))
        .collect();
    assert_eq!(drain(&mut all), want);
    assert_eq!(drain(&mut eu), want);
    assert!(drain(&mut us).is_empty());
    assert_eq!(bus.stats().emitted, 3);
    drop(p);
    assert_eq!(bus.stats().emitted, 3, "a dropped publisher's count stays");
    let mut q = bus.publisher("orders.us.paid").unwrap();
    assert_eq!(now(q.publish(4)).unwrap(), 2);
    assert_eq!(bus.stats().emitted, 4);
}

#[test]
fn a_publisher_follows_subscriptions_that_come_and_go() {
    let bus = Bus::<u32>::new();
    let mut p = bus.publisher("t.a").unwrap();
    assert_eq!(now(p.publish(1)).unwrap(), 0, "nobody yet");
    let mut first = bus.subscribe("t.*").unwrap();
    assert_eq!(now(p.publish(2)).unwrap(), 1);
    let mut second = bus
        .subscribe_with("#", SubscribeOptions::new().with_capacity(8))
        .unwrap();
    assert_eq!(now(p.publish(3)).unwrap(), 2);
    drop(first.try_next());
    drop(first);
    // Its group is gone: not closed, just no longer reached.
    assert_eq!(now(p.publish(4)).unwrap(), 1);
    drop(second.try_next());
    drop(second);
    assert_eq!(now(p.publish(5)).unwrap(), 0);
    let mut third = bus.subscribe("t.a").unwrap();
    assert_eq!(now(p.publish(6)).unwrap(), 1);
    assert_eq!(drain(&mut third), [("t.a".to_owned(), 6)]);
}

#[test]
fn a_publisher_waits_on_a_full_subscription_and_hands_the_payload_back_when_closed() {
    within(|| {
        let bus = Bus::<u32>::new();
        let mut slow = bus
            .subscribe_with(
                "t",
                SubscribeOptions::new()
                    .with_capacity(1)
                    .with_overflow(Overflow::Wait),
            )
            .unwrap();
        let mut p = bus.publisher("t").unwrap();
        assert_eq!(now(p.publish(1)).unwrap(), 1);
        {
            let mut publish = Box::pin(p.publish(2));
            assert!(poll(&mut publish).is_pending());
            assert_eq!(slow.try_next().map(|e| e.payload), Some(1));
            assert_eq!(poll(&mut publish), Poll::Ready(Ok(1)));
        }
        let mut publish = Box::pin(p.publish(3));
        assert!(poll(&mut publish).is_pending());
        smol::block_on(bus.shutdown());
        match poll(&mut publish) {
            Poll::Ready(Err(EmitError::Closed(3))) => {}
            other => panic!("the payload must come back, got {other:?}"),
        }
        drop(publish);
        assert!(matches!(now(p.publish(4)), Err(EmitError::Closed(4))));
        assert_eq!(slow.try_next().map(|e| e.payload), Some(2));
    });
}

#[test]
fn a_malformed_topic_is_refused_with_its_name() {
    let bus = Bus::<u32>::new();
    for bad in ["", "a..b", "a.*", "#"] {
        let err = bus.publisher(bad).expect_err(bad);
        assert_eq!(err.value, bad);
        assert!(
            err.to_string().contains(&format!("{bad:?}")),
            "{err} names {bad:?}"
        );
    }
}

#[test]
fn a_publisher_on_a_retaining_bus_leaves_the_last_value_for_late_subscribers() {
    let bus = Bus::<u32>::builder().with_retained(true).build().unwrap();
    let mut p = bus.publisher("cfg.mode").unwrap();
    assert_eq!(now(p.publish(1)).unwrap(), 0);
    assert_eq!(now(p.publish(2)).unwrap(), 0);
    let mut late = bus.subscribe("cfg.#").unwrap();
    assert_eq!(drain(&mut late), [("cfg.mode".to_owned(), 2)]);
    assert_eq!(now(p.publish(3)).unwrap(), 1);
    assert_eq!(drain(&mut late), [("cfg.mode".to_owned(), 3)]);
}
