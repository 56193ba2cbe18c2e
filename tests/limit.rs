//! Limits: Semaphore (FIFO, weights, cancel, close, resize), RateLimiter
//! (GCRA accounting, FIFO waiting), KeyedRateLimiter (eviction) and
//! AdaptiveLimit (settling on a simulated server). Deterministic: futures
//! are polled by hand and time is a ManualClock.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use proptest::prelude::*;
use smolkit::ConfigError;
use smolkit::limit::{
    AcquireError, AdaptiveLimit, Aimd, Gradient, KeyedRateLimiter, Outcome, Quota, RateLimitError,
    RateLimiter, Sample, Semaphore, TryAcquireError,
};
use smolkit::runtime::Clock;
use smolkit::testing::ManualClock;

/// A waker that remembers whether it was woken.
#[derive(Default)]
struct Flag(AtomicBool);
impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A hand-polled future with its own flag waker.
struct Probe<F> {
    fut: Pin<Box<F>>,
    flag: Arc<Flag>,
}

impl<F: Future> Probe<F> {
    fn new(fut: F) -> Self {
        Probe {
            fut: Box::pin(fut),
            flag: Arc::new(Flag::default()),
        }
    }
    fn poll(&mut self) -> Poll<F::Output> {
        self.flag.0.store(false, Ordering::SeqCst);
        let waker = Waker::from(self.flag.clone());
        self.fut.as_mut().poll(&mut Context::from_waker(&waker))
    }
    fn woken(&self) -> bool {
        self.flag.0.load(Ordering::SeqCst)
    }
    fn ready(&mut self) -> F::Output {
        match self.poll() {
            Poll::Ready(v) => v,
            Poll::Pending => panic!("expected the future to be ready"),
        }
    }
}

// ---------------------------------------------------------------------------
// Semaphore

#[test]
fn waiters_are_served_in_fifo_order() {
    let sem = Semaphore::new(1);
    let first = sem.try_acquire().unwrap();
    let mut waiters: Vec<_> = (0..5).map(|_| Probe::new(sem.acquire())).collect();
    for w in &mut waiters {
        assert!(w.poll().is_pending());
    }
    assert_eq!(sem.waiting(), 5);
    drop(first);
    for i in 0..5 {
        // Exactly waiter i was woken, and it holds the permit.
        for (j, w) in waiters.iter().enumerate().skip(i) {
            assert_eq!(w.woken(), j == i, "after release {i}, waiter {j}");
        }
        let guard = waiters[i].ready().unwrap();
        for w in waiters.iter_mut().skip(i + 1) {
            assert!(w.poll().is_pending());
        }
        drop(guard);
    }
    assert_eq!(sem.available(), 1);
    assert_eq!(sem.waiting(), 0);
}

#[test]
fn a_granted_waiter_not_yet_polled_keeps_its_grant_when_its_slot_is_reused() {
    // The waiter slot (and the cell its future reads the grant from) is
    // reused by the next waiter; a granted future that has not looked yet
    // must still find its grant, not the newcomer's wait (which made its
    // poll spin: hence the thread with a bound).
    common::within(|| {
        let sem = Arc::new(Semaphore::new(1));
        let held = sem.try_acquire().unwrap();
        let mut granted = Probe::new(sem.acquire());
        assert!(granted.poll().is_pending());
        drop(held);
        assert!(granted.woken());
        let mut next = Probe::new(sem.acquire());
        assert!(next.poll().is_pending());
        let guard = granted.ready().unwrap();
        assert!(next.poll().is_pending());
        drop(guard);
        assert!(next.woken());
        assert_eq!(next.ready().unwrap().permits(), 1);
        assert_eq!(sem.available(), 1);
    });
}

#[test]
fn try_acquire_does_not_overtake_a_waiter() {
    let sem = Semaphore::new(3);
    let held = sem.try_acquire_many(2).unwrap();
    let mut big = Probe::new(sem.acquire_many(3));
    assert!(big.poll().is_pending());
    // One permit is free (collected by the waiter), but nobody may barge.
    assert_eq!(sem.try_acquire().unwrap_err(), TryAcquireError::NoPermits);
    let mut small = Probe::new(sem.acquire());
    assert!(small.poll().is_pending());
    drop(held);
    let big_guard = big.ready().unwrap();
    assert_eq!(big_guard.permits(), 3);
    assert!(small.poll().is_pending());
    drop(big_guard);
    assert!(small.woken());
    assert_eq!(small.ready().unwrap().permits(), 1);
}

#[test]
fn weighted_acquire_collects_permits_as_they_return() {
    let sem = Semaphore::new(5);
    let a = sem.try_acquire_many(2).unwrap();
    let b = sem.try_acquire_many(3).unwrap();
    let mut w = Probe::new(sem.acquire_many(4));
    assert!(w.poll().is_pending());
    drop(a); // 2 of 4 collected
    assert!(!w.woken());
    assert!(w.poll().is_pending());
    assert_eq!(sem.available(), 0);
    drop(b); // 2 more: granted, 1 left over
    assert!(w.woken());
    let g = w.ready().unwrap();
    assert_eq!((g.permits(), sem.available(), sem.in_use()), (4, 1, 4));
}

#[test]
fn request_above_capacity_is_an_immediate_error() {
    let sem = Semaphore::new(3);
    let mut w = Probe::new(sem.acquire_many(4));
    assert_eq!(
        w.ready().unwrap_err(),
        AcquireError::TooLarge {
            requested: 4,
            capacity: 3
        }
    );
    assert_eq!(
        sem.try_acquire_many(9).unwrap_err(),
        TryAcquireError::TooLarge {
            requested: 9,
            capacity: 3
        }
    );
    let msg = AcquireError::TooLarge {
        requested: 4,
        capacity: 3,
    }
    .to_string();
    assert!(msg.contains('4') && msg.contains('3'), "{msg}");
}

#[test]
fn cancelling_a_waiter_that_collected_part_returns_it() {
    let sem = Semaphore::new(4);
    let held = sem.try_acquire_many(3).unwrap();
    let mut w = Probe::new(sem.acquire_many(3));
    assert!(w.poll().is_pending()); // collected the 1 free permit
    assert_eq!(sem.available(), 0);
    drop(w);
    assert_eq!(sem.available(), 1);
    assert_eq!(sem.waiting(), 0);
    drop(held);
    assert_eq!(sem.available(), 4);
    assert!(sem.try_acquire_many(4).is_ok());
}

#[test]
fn cancelling_a_granted_but_unpolled_waiter_passes_the_wakeup_on() {
    let sem = Semaphore::new(1);
    let held = sem.try_acquire().unwrap();
    let mut first = Probe::new(sem.acquire());
    let mut second = Probe::new(sem.acquire());
    assert!(first.poll().is_pending());
    assert!(second.poll().is_pending());
    drop(held); // granted to `first`, which is woken...
    assert!(first.woken() && !second.woken());
    drop(first); // ...but dropped before it runs.
    assert!(second.woken(), "the wake-up was passed on");
    assert!(second.ready().is_ok());
}

#[test]
fn cancelling_at_every_point_never_leaks_a_permit() {
    // Drop a waiter after each possible number of polls and releases.
    for releases_before_drop in 0..=3 {
        let sem = Semaphore::new(3);
        let guards: Vec<_> = (0..3).map(|_| sem.try_acquire().unwrap()).collect();
        let mut w = Probe::new(sem.acquire_many(2));
        let mut later = Probe::new(sem.acquire());
        assert!(w.poll().is_pending());
        assert!(later.poll().is_pending());
        let mut guards = guards.into_iter();
        for g in guards.by_ref().take(releases_before_drop) {
            drop(g);
        }
        let got = if releases_before_drop >= 2 {
            Some(w.ready().unwrap())
        } else {
            drop(w);
            None
        };
        drop(got);
        drop(guards);
        // Everything returned: `later` got its permit and all else is free.
        let l = later.ready().unwrap();
        assert_eq!(
            sem.available(),
            2,
            "releases_before_drop = {releases_before_drop}"
        );
        drop(l);
        assert_eq!(sem.available(), 3);
        assert_eq!(sem.waiting(), 0);
    }
}

#[test]
fn close_wakes_every_waiter_with_the_error() {
    let sem = Semaphore::new(1);
    let held = sem.try_acquire().unwrap();
    let mut waiters: Vec<_> = (0..3).map(|_| Probe::new(sem.acquire())).collect();
    for w in &mut waiters {
        assert!(w.poll().is_pending());
    }
    assert!(sem.close());
    assert!(!sem.close(), "second close reports it was closed");
    for w in &mut waiters {
        assert!(w.woken());
        assert_eq!(w.ready().unwrap_err(), AcquireError::Closed);
    }
    assert_eq!(sem.try_acquire().unwrap_err(), TryAcquireError::Closed);
    assert!(Probe::new(sem.acquire()).ready().unwrap_err().is_closed());
    drop(held); // still returns its permit
    assert_eq!(sem.available(), 1);
    assert!(sem.is_closed());
}

#[test]
fn shrinking_under_load_admits_nobody_until_the_debt_is_paid() {
    let sem = Semaphore::new(4);
    let mut held: Vec<_> = (0..4).map(|_| sem.try_acquire().unwrap()).collect();
    sem.set_permits(2);
    assert_eq!((sem.capacity(), sem.available()), (2, -2));
    let mut w = Probe::new(sem.acquire());
    assert!(w.poll().is_pending());
    held.pop(); // debt -1
    held.pop(); // debt 0: in use 2 = capacity
    assert!(!w.woken());
    assert!(w.poll().is_pending());
    assert_eq!(sem.in_use(), 2);
    held.pop(); // one free: the waiter is admitted
    assert!(w.woken());
    let g = w.ready().unwrap();
    assert_eq!(sem.in_use(), 2);
    drop(g);
    drop(held);
    assert_eq!(sem.available(), 2);
}

#[test]
fn growing_hands_new_permits_to_waiters_first() {
    let sem = Semaphore::new(2);
    let _held = sem.try_acquire_many(2).unwrap();
    let mut w = Probe::new(sem.acquire_many(2));
    assert!(w.poll().is_pending());
    sem.add_permits(1);
    assert!(!w.woken(), "needs 2, has 1");
    assert_eq!(sem.try_acquire().unwrap_err(), TryAcquireError::NoPermits);
    sem.set_permits(4);
    assert!(w.woken());
    let g = w.ready().unwrap();
    assert_eq!(g.permits(), 2);
    assert_eq!((sem.capacity(), sem.available()), (4, 0));
}

#[test]
fn shrinking_below_a_waiters_request_fails_it_with_the_new_capacity() {
    let sem = Semaphore::new(4);
    let _held = sem.try_acquire_many(4).unwrap();
    let mut w = Probe::new(sem.acquire_many(3));
    assert!(w.poll().is_pending());
    sem.set_permits(2);
    assert!(w.woken());
    assert_eq!(
        w.ready().unwrap_err(),
        AcquireError::TooLarge {
            requested: 3,
            capacity: 2
        }
    );
}

#[test]
fn forgetting_a_guard_shrinks_the_capacity() {
    let sem = Semaphore::new(3);
    sem.try_acquire().unwrap().forget();
    assert_eq!((sem.capacity(), sem.available(), sem.in_use()), (2, 2, 0));
}

#[test]
fn run_holds_permits_for_the_closure() {
    let sem = Semaphore::new(2);
    let out = smol::block_on(sem.run_many(2, || async {
        assert_eq!(sem.available(), 0);
        "done"
    }));
    assert_eq!(out, Ok("done"));
    assert_eq!(sem.available(), 2);
}

#[test]
fn contended_resize_never_exceeds_the_limit_on_real_threads() {
    // 8 tasks on 2 threads hammer a semaphore of 4 that shrinks to 2. Once
    // the debt is paid, no more than 2 may ever be held.
    let sem = Arc::new(Semaphore::new(4));
    let holders = Arc::new(AtomicUsize::new(0));
    let peak_after = Arc::new(AtomicUsize::new(0));
    let shrunk = Arc::new(AtomicBool::new(false));
    let rt = smolkit::runtime::Runtime::builder()
        .with_threads(2)
        .build()
        .unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (sem, holders, peak_after, shrunk) = (
                sem.clone(),
                holders.clone(),
                peak_after.clone(),
                shrunk.clone(),
            );
            rt.spawn(async move {
                for _ in 0..2_000 {
                    let g = sem.acquire_arc().await.unwrap();
                    let now = holders.fetch_add(1, Ordering::SeqCst) + 1;
                    // Counted only when the debt is known to be paid.
                    if shrunk.load(Ordering::SeqCst) && sem.available() >= 0 {
                        peak_after.fetch_max(now, Ordering::SeqCst);
                    }
                    futures_lite::future::yield_now().await;
                    holders.fetch_sub(1, Ordering::SeqCst);
                    drop(g);
                }
            })
        })
        .collect();
    sem.set_permits(2);
    shrunk.store(true, Ordering::SeqCst);
    rt.block_on(async {
        for t in tasks {
            t.await.unwrap();
        }
    });
    assert!(
        peak_after.load(Ordering::SeqCst) <= 2,
        "peak {}",
        peak_after.load(Ordering::SeqCst)
    );
    assert_eq!(sem.available(), 2);
}

// ---------------------------------------------------------------------------
// RateLimiter

fn manual() -> (ManualClock, Arc<dyn Clock>) {
    let clock = ManualClock::new();
    (clock.clone(), Arc::new(clock))
}

#[test]
fn quota_rejects_zero_values_with_the_setting_named() {
    assert_eq!(Quota::per_second(0).unwrap_err(), ConfigError::zero("rate"));
    assert_eq!(
        Quota::new(1, Duration::ZERO).unwrap_err(),
        ConfigError::zero("period")
    );
    assert_eq!(
        Quota::per_second(1).unwrap().with_burst(0).unwrap_err(),
        ConfigError::zero("burst")
    );
    assert_eq!(
        ConfigError::zero("burst").to_string(),
        "invalid burst = 0: must be greater than zero"
    );
}

#[test]
fn burst_then_one_cell_per_interval() {
    let (clock, c) = manual();
    let limiter = RateLimiter::with_clock(Quota::per_second(10).unwrap().with_burst(3).unwrap(), c);
    for _ in 0..3 {
        limiter.check(1).unwrap();
    }
    let err = limiter.check(1).unwrap_err();
    assert_eq!(err.retry_after(), Some(Duration::from_millis(100)));
    clock.advance(Duration::from_millis(99));
    assert!(limiter.check(1).is_err());
    clock.advance(Duration::from_millis(1));
    limiter.check(1).unwrap();
    assert_eq!(
        limiter.check(4).unwrap_err(),
        RateLimitError::InsufficientCapacity {
            requested: 4,
            burst: 3
        }
    );
}

#[test]
fn until_ready_serves_waiters_in_order_and_check_does_not_barge() {
    let (clock, c) = manual();
    let limiter = RateLimiter::with_clock(Quota::per_second(1).unwrap().with_burst(1).unwrap(), c);
    limiter.check(1).unwrap();
    let mut waiters: Vec<_> = (0..3).map(|_| Probe::new(limiter.until_ready(1))).collect();
    for w in &mut waiters {
        assert!(w.poll().is_pending());
    }
    assert_eq!(clock.sleepers(), 1, "only the head sleeps");
    assert_eq!(limiter.waiting(), 3);
    for i in 0..3 {
        clock.advance(Duration::from_secs(1));
        // A newcomer's check may not take the cell from the waiters.
        assert!(limiter.check(1).is_err());
        assert!(waiters[i].woken());
        waiters[i].ready().unwrap();
        for w in waiters.iter_mut().skip(i + 1) {
            assert!(w.poll().is_pending());
        }
    }
    assert_eq!(limiter.waiting(), 0);
    clock.advance(Duration::from_secs(1));
    limiter.check(1).unwrap();
}

#[test]
fn dropping_a_waiter_takes_no_cells() {
    let (clock, c) = manual();
    let limiter = RateLimiter::with_clock(Quota::per_second(1).unwrap().with_burst(1).unwrap(), c);
    limiter.check(1).unwrap();
    let mut w = Probe::new(limiter.until_ready(1));
    assert!(w.poll().is_pending());
    drop(w);
    assert_eq!(limiter.waiting(), 0);
    clock.advance(Duration::from_secs(1));
    limiter.check(1).unwrap();
}

#[test]
fn quota_changes_in_place() {
    let (clock, c) = manual();
    let limiter = RateLimiter::with_clock(Quota::per_second(1).unwrap().with_burst(1).unwrap(), c);
    limiter.check(1).unwrap();
    assert!(limiter.check(1).is_err());
    limiter.set_quota(Quota::per_second(100).unwrap().with_burst(1).unwrap());
    // The cell taken at 1/s still counts: its TAT is 1 s ahead.
    assert!(limiter.check(1).is_err());
    clock.advance(Duration::from_secs(1));
    limiter.check(1).unwrap();
    clock.advance(Duration::from_millis(10));
    limiter.check(1).unwrap();
    assert_eq!(limiter.quota().rate(), 100);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Over any window between two admissions, the cells admitted are at
    /// most burst + window / T; and a denial's retry_after is exact.
    #[test]
    fn gcra_never_admits_more_than_burst_plus_rate_times_window(
        rate in 1u32..50,
        period_ms in 1u64..5_000,
        burst in 1u32..20,
        steps in proptest::collection::vec((0u64..2_000_000_000, 1u32..5), 1..80),
    ) {
        let (clock, c) = manual();
        let quota = Quota::new(rate, Duration::from_millis(period_ms)).unwrap().with_burst(burst).unwrap();
        let t = quota.emission_interval().as_nanos();
        let limiter = RateLimiter::with_clock(quota, c);
        let start = clock.now();
        let mut admitted: Vec<(u128, u32)> = Vec::new();
        for (dt, n) in steps {
            clock.advance(Duration::from_nanos(dt % (period_ms * 2_000_000)));
            let now = (clock.now() - start).as_nanos();
            match limiter.check(n) {
                Ok(()) => admitted.push((now, n)),
                Err(RateLimitError::NotYet { retry_after }) => {
                    prop_assert!(n <= burst);
                    // Waiting exactly retry_after makes it conform, and not
                    // a nanosecond less.
                    if retry_after > Duration::from_nanos(1) {
                        clock.advance(retry_after - Duration::from_nanos(1));
                        prop_assert!(limiter.check(n).is_err());
                        clock.advance(Duration::from_nanos(1));
                    } else {
                        clock.advance(retry_after);
                    }
                    let now = (clock.now() - start).as_nanos();
                    prop_assert!(limiter.check(n).is_ok());
                    admitted.push((now, n));
                }
                Err(RateLimitError::InsufficientCapacity { requested, burst: b }) => {
                    prop_assert!(requested > b && b == burst);
                }
                Err(e) => prop_assert!(false, "unexpected {e:?}"),
            }
        }
        for i in 0..admitted.len() {
            let mut cells = 0u128;
            for j in i..admitted.len() {
                cells += u128::from(admitted[j].1);
                let window = admitted[j].0 - admitted[i].0;
                prop_assert!(
                    cells * t <= window + u128::from(burst) * t,
                    "{cells} cells in {window} ns with T = {t} ns and burst {burst}"
                );
            }
        }
    }
}

#[test]
fn keyed_limiter_limits_each_key_and_evicts_rested_ones() {
    let (clock, c) = manual();
    let keyed =
        KeyedRateLimiter::with_clock(Quota::per_second(2).unwrap().with_burst(2).unwrap(), c);
    for host in ["a", "b", "c"] {
        keyed.check(&host, 2).unwrap();
        assert!(keyed.check(&host, 1).is_err());
    }
    assert_eq!(keyed.len(), 3);
    clock.advance(Duration::from_millis(500));
    assert_eq!(keyed.retain_recent(), 0, "half rested: still tracked");
    keyed.check(&"a", 1).unwrap();
    clock.advance(Duration::from_millis(500));
    // b and c are fully rested; a took a cell at 0.5 s.
    assert_eq!(keyed.retain_recent(), 2);
    assert_eq!(keyed.len(), 1);
    // A dropped key behaves as new.
    keyed.check(&"b", 2).unwrap();
}

#[test]
fn keyed_limiter_evicts_by_itself_past_max_keys() {
    let (clock, c) = manual();
    let keyed = KeyedRateLimiter::with_clock(Quota::per_second(1).unwrap(), c).with_max_keys(16);
    for k in 0..1_000u32 {
        keyed.check(&k, 1).unwrap();
        clock.advance(Duration::from_secs(2)); // every earlier key rests
    }
    assert!(keyed.len() <= 32, "{} keys kept", keyed.len());
}

#[test]
fn keyed_until_ready_waits_on_the_clock() {
    let (clock, c) = manual();
    let keyed = KeyedRateLimiter::with_clock(Quota::per_second(1).unwrap(), c);
    keyed.check(&"h", 1).unwrap();
    let mut w = Probe::new(keyed.until_ready(&"h", 1));
    assert!(w.poll().is_pending());
    clock.advance(Duration::from_secs(1));
    assert!(w.woken());
    w.ready().unwrap();
}

// ---------------------------------------------------------------------------
// AdaptiveLimit

/// A server whose latency is flat up to `knee` concurrent calls and grows
/// in proportion beyond it (queueing).
fn latency_at(concurrency: usize, knee: usize) -> Duration {
    let base = Duration::from_millis(10);
    if concurrency <= knee {
        base
    } else {
        base * concurrency as u32 / knee as u32
    }
}

/// Runs a saturated load against the simulated server for `steps` samples
/// and returns the limits seen over the last `tail` of them.
fn simulate(
    limit: &AdaptiveLimit,
    clock: &ManualClock,
    knee: usize,
    steps: usize,
    tail: usize,
) -> (usize, usize) {
    let mut lo = usize::MAX;
    let mut hi = 0;
    for step in 0..steps {
        let in_flight = limit.limit();
        let latency = latency_at(in_flight, knee);
        clock.advance(latency);
        let new = limit.record(Sample::new(latency, Outcome::Success, in_flight));
        if step >= steps - tail {
            lo = lo.min(new);
            hi = hi.max(new);
        }
    }
    (lo, hi)
}

/// Over the last 1,000 of 3,000 saturated samples, the limit stays within
/// 20% of the knee and moves over a range of at most 20% of it.
fn assert_settles_near_the_knee(limit: &AdaptiveLimit, clock: &ManualClock, knee: usize) {
    let (lo, hi) = simulate(limit, clock, knee, 3_000, 1_000);
    let (min_ok, max_ok) = (knee * 8 / 10, knee * 12 / 10);
    assert!(
        lo >= min_ok && hi <= max_ok,
        "settled in [{lo}, {hi}], want within [{min_ok}, {max_ok}]"
    );
    assert!(hi - lo <= knee / 5, "oscillates over [{lo}, {hi}]");
}

#[test]
fn gradient_settles_near_the_knee_without_oscillating() {
    let knee = 50;
    let (clock, c) = manual();
    let limit = AdaptiveLimit::new(5, 1, 500, Gradient::new())
        .unwrap()
        .with_clock(c);
    assert_settles_near_the_knee(&limit, &clock, knee);
}

#[test]
fn aimd_with_a_latency_threshold_settles_near_the_knee() {
    let knee = 50;
    let (clock, c) = manual();
    let aimd = Aimd::new().with_latency_threshold(Duration::from_millis(11));
    let limit = AdaptiveLimit::new(5, 1, 500, aimd)
        .unwrap()
        .with_clock(c)
        .with_cooldown(Duration::from_millis(50));
    assert_settles_near_the_knee(&limit, &clock, knee);
}

#[test]
fn slow_throughput_lowers_the_limit_once_per_cooldown() {
    let (clock, c) = manual();
    let aimd = Aimd::new().with_min_throughput(100_000.0); // the seeds' 100 KB/s
    let limit = AdaptiveLimit::new(10, 1, 20, aimd).unwrap().with_clock(c);
    // 50 KB in 1 s: too slow.
    let slow = Sample::new(Duration::from_secs(1), Outcome::Success, 10).with_bytes(50_000);
    assert_eq!(limit.record(slow), 9);
    assert_eq!(limit.record(slow), 9, "cooling down");
    clock.advance(Duration::from_secs(1));
    assert_eq!(limit.record(slow), 8);
    // 500 KB in 1 s with the limit in use: grows.
    let fast = Sample::new(Duration::from_secs(1), Outcome::Success, 8).with_bytes(500_000);
    assert_eq!(limit.record(fast), 9);
    assert_eq!(limit.semaphore().capacity(), 9);
}

#[test]
fn tokens_time_calls_on_the_clock_and_resize_the_semaphore() {
    let (clock, c) = manual();
    let aimd = Aimd::new().with_latency_threshold(Duration::from_millis(100));
    let limit = AdaptiveLimit::new(2, 1, 4, aimd).unwrap().with_clock(c);
    smol::block_on(async {
        let t1 = limit.acquire().await.unwrap();
        let t2 = limit.acquire().await.unwrap();
        assert_eq!(limit.stats().in_flight, 2);
        clock.advance(Duration::from_millis(10));
        assert_eq!(t1.success(), 3, "fast and the limit was in use: +1");
        clock.advance(Duration::from_millis(500));
        assert_eq!(t2.success(), 2, "slow: x0.9 floored");
        let t3 = limit.acquire().await.unwrap();
        t3.ignore();
        assert_eq!(limit.limit(), 2);
        assert_eq!(limit.stats().samples, 2);
    });
}

#[test]
fn adaptive_limit_rejects_bad_bounds() {
    assert_eq!(
        AdaptiveLimit::new(1, 5, 2, Aimd::new()).unwrap_err(),
        ConfigError::min_above_max("min/max", 5, 2)
    );
    assert_eq!(
        AdaptiveLimit::new(1, 0, 2, Aimd::new()).unwrap_err(),
        ConfigError::zero("min")
    );
    let err = Aimd::new().with_backoff(1.5).unwrap_err();
    assert_eq!((err.setting, err.value.as_str()), ("backoff", "1.5"));
    assert!(Gradient::new().with_tolerance(0.5).is_err());
    assert_eq!(
        AdaptiveLimit::new(99, 1, 8, Aimd::new()).unwrap().limit(),
        8
    );
}

#[test]
fn limit_types_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Semaphore>();
    send_sync::<RateLimiter>();
    send_sync::<KeyedRateLimiter<String>>();
    send_sync::<AdaptiveLimit>();
    send_sync::<smolkit::limit::SemaphoreGuardArc>();
    fn send<T: Send>(_: &T) {}
    let sem = Semaphore::new(1);
    send(&sem.acquire());
    let limiter = RateLimiter::new(Quota::per_second(1).unwrap());
    send(&limiter.until_ready(1));
}

/// Issue 14 #7: a zero-weight request queued behind a waiter that just got
/// the last permits stayed pending until that waiter released them.
#[test]
fn a_zero_weight_request_at_the_head_is_granted_at_once() {
    let sem = Semaphore::new(2);
    let held = sem.try_acquire_many(2).unwrap();
    let mut big = Probe::new(sem.acquire_many(2));
    assert!(big.poll().is_pending());
    let mut zero = Probe::new(sem.acquire_many(0));
    assert!(zero.poll().is_pending(), "queued behind the waiter (FIFO)");
    drop(held);
    assert!(big.woken() && zero.woken());
    let big_guard = big.ready().unwrap();
    let zero_guard = zero.ready().unwrap();
    assert_eq!((big_guard.permits(), zero_guard.permits()), (2, 0));
    assert_eq!(sem.waiting(), 0);
    drop((big_guard, zero_guard));
    // The fast path works again: nothing is left marked as waiting.
    assert_eq!(sem.try_acquire_many(2).unwrap().permits(), 2);
}

/// Issue 14 #8: `set_quota` did not wake the waiters; they stayed asleep
/// under the old quota (a second here) though its docs say "at once".
#[test]
fn a_quota_change_reevaluates_the_waiters_at_once() {
    common::within(a_quota_change_body);
}

fn a_quota_change_body() {
    let clock = ManualClock::new();
    let limiter = Arc::new(RateLimiter::with_clock(
        Quota::per_second(1).unwrap(),
        Arc::new(clock.clone()),
    ));
    limiter.check(1).unwrap(); // the burst of 1 is spent
    let admitted = Arc::new(AtomicUsize::new(0));
    let waiters: Vec<_> = (0..5)
        .map(|_| {
            let (limiter, admitted) = (limiter.clone(), admitted.clone());
            std::thread::spawn(move || {
                smol::block_on(limiter.until_ready(1)).unwrap();
                admitted.fetch_add(1, Ordering::SeqCst);
            })
        })
        .collect();
    smol::block_on(clock.wait_for_sleepers(1));
    assert_eq!(admitted.load(Ordering::SeqCst), 0);
    limiter.set_quota(Quota::per_second(100).unwrap().with_burst(500).unwrap());
    // No time passes: the new burst admits all five.
    for w in waiters {
        w.join().unwrap();
    }
    assert_eq!(admitted.load(Ordering::SeqCst), 5);
    assert_eq!(clock.elapsed(), Duration::ZERO);
}

/// Issue 14 #11: `Semaphore::new(usize::MAX)` clamped to half of what its
/// docs said; the bound is now a named constant, and it is what you get.
#[test]
fn the_largest_semaphore_is_max_permits() {
    assert_eq!(Semaphore::MAX_PERMITS, (i64::MAX >> 3) as usize);
    let sem = Semaphore::new(usize::MAX);
    assert_eq!(sem.capacity(), Semaphore::MAX_PERMITS);
    let all = sem.try_acquire_many(Semaphore::MAX_PERMITS).unwrap();
    assert_eq!(all.permits(), Semaphore::MAX_PERMITS);
    drop(all);
    sem.set_permits(usize::MAX);
    assert_eq!(sem.capacity(), Semaphore::MAX_PERMITS);
}

/// Issue 14 #9: past its key limit with every key still live, the keyed
/// limiter swept a whole shard on every new key (quadratic: 143–312 µs a
/// check past 65,536 keys). Sweeps are now spread: counted, not timed.
#[test]
fn many_live_keys_do_not_make_every_check_sweep() {
    let clock = ManualClock::new();
    let limiter = KeyedRateLimiter::with_clock(
        Quota::new(1, Duration::from_secs(3600)).unwrap(),
        Arc::new(clock.clone()),
    )
    .with_max_keys(1024);
    let keys = 200_000u32;
    for k in 0..keys {
        limiter.check(&k, 1).unwrap();
    }
    assert_eq!(limiter.len(), keys as usize, "live keys are all kept");
    // 16 shards, each sweeping when it doubles: about 16 × log2(12,500 / 64).
    assert!(limiter.sweeps() < 400, "{} sweeps", limiter.sweeps());
    // Once they rest, a sweep drops them and the limit is back to normal.
    clock.advance(Duration::from_secs(3601));
    assert_eq!(limiter.retain_recent(), keys as usize);
    assert!(limiter.is_empty());
    for k in 0..2_000u32 {
        limiter.check(&k, 1).unwrap();
    }
    assert!(limiter.len() <= 2_000);
}
