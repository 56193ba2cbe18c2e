//! Resilience: backoff schedules, retry limits, timeouts, circuit breaker
//! transitions and the composed policy. Every timer runs on ManualClock:
//! futures are polled by hand and time moves only when the test says.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures_lite::future;
use proptest::prelude::*;
use smolkit::limit::{Quota, RateLimitError, RateLimiter, Semaphore};
use smolkit::resilience::{
    AttemptError, Backoff, BreakerError, CallOutcome, CircuitBreaker, Decision, Jitter, Policy,
    PolicyError, Retry, RetryBudget, RetryError, State, Window, timeout_on,
};
use smolkit::runtime::Clock;
use smolkit::testing::ManualClock;

const S: fn(u64) -> Duration = Duration::from_secs;

fn manual() -> (ManualClock, Arc<dyn Clock>) {
    let clock = ManualClock::new();
    (clock.clone(), Arc::new(clock))
}

/// Polls `fut` to completion, advancing the manual clock to the next
/// deadline whenever it is pending. Bounded: at most 1,000 steps.
fn drive<F: Future>(clock: &ManualClock, fut: F) -> F::Output {
    let mut fut = Box::pin(fut);
    for _ in 0..1_000 {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            return v;
        }
        assert!(
            clock.advance_to_next().is_some(),
            "pending with nobody sleeping: stuck"
        );
    }
    panic!("did not finish within 1,000 clock steps");
}

fn poll_once<F: Future>(fut: &mut Pin<Box<F>>) -> Poll<F::Output> {
    fut.as_mut().poll(&mut Context::from_waker(Waker::noop()))
}

/// When each attempt started, on the manual clock.
type AttemptLog = Arc<Mutex<Vec<Duration>>>;

/// An operation that fails `failures` times, recording when (on the clock)
/// each attempt started.
fn flaky(
    clock: &ManualClock,
    failures: u32,
) -> (
    AttemptLog,
    impl FnMut() -> future::Ready<Result<&'static str, &'static str>>,
) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let (clock, log2, calls) = (clock.clone(), log.clone(), Arc::new(AtomicU32::new(0)));
    let op = move || {
        log2.lock().unwrap().push(clock.elapsed());
        let n = calls.fetch_add(1, Ordering::SeqCst);
        future::ready(if n < failures { Err("boom") } else { Ok("ok") })
    };
    (log, op)
}

// ---------------------------------------------------------------------------
// Backoff

#[test]
fn the_seeds_schedule_is_1_2_4_8_10_10() {
    let b = Backoff::exponential(S(1)).with_max_delay(S(10)).build();
    assert_eq!(
        b.take(6).collect::<Vec<_>>(),
        [S(1), S(2), S(4), S(8), S(10), S(10)]
    );
}

#[test]
fn constant_linear_and_bounded_schedules() {
    let c = Backoff::constant(S(2)).with_max_times(3).build();
    assert_eq!(c.collect::<Vec<_>>(), [S(2), S(2), S(2)]);
    let l = Backoff::linear(S(1), S(3)).with_max_delay(S(8)).build();
    assert_eq!(l.take(4).collect::<Vec<_>>(), [S(1), S(4), S(7), S(8)]);
}

#[test]
fn invalid_backoffs_are_typed_errors_naming_the_value() {
    let err = Backoff::exponential(S(1)).with_factor(0.5).unwrap_err();
    assert_eq!((err.setting, err.value.as_str()), ("factor", "0.5"));
    assert_eq!(
        err.to_string(),
        "invalid factor = 0.5: must be a finite number >= 1"
    );
    for bad in [f64::NAN, f64::INFINITY, -1.0] {
        assert!(
            Backoff::exponential(S(1)).with_factor(bad).is_err(),
            "{bad}"
        );
    }
    // A cap below the first delay is not an error: every delay is the cap.
    let capped = Backoff::constant(S(5)).with_max_delay(S(1)).build();
    assert_eq!(capped.take(3).collect::<Vec<_>>(), [S(1); 3]);
    let capped = Backoff::exponential(S(5)).with_max_delay(S(1)).build();
    assert_eq!(capped.take(3).collect::<Vec<_>>(), [S(1); 3]);
}

#[test]
fn a_zero_base_stays_zero() {
    // 0 × 2^n overflows to 0 × inf = NaN after 1024 attempts; it must stay 0.
    let b = Backoff::exponential(Duration::ZERO)
        .with_max_delay(S(10))
        .build();
    assert!(b.take(1100).all(|d| d.is_zero()));
}

#[test]
fn seeded_jitter_is_reproducible() {
    let make = || {
        Backoff::exponential(S(1))
            .with_jitter(Jitter::Full)
            .with_seed(7)
            .build()
    };
    let a: Vec<_> = make().take(10).collect();
    let b: Vec<_> = make().take(10).collect();
    assert_eq!(a, b);
    let c: Vec<_> = Backoff::exponential(S(1))
        .with_jitter(Jitter::Full)
        .with_seed(8)
        .build()
        .take(10)
        .collect();
    assert_ne!(a, c);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Every jitter kind stays within its documented bounds, and exponential
    /// growth never overflows or panics, whatever the factor.
    #[test]
    fn jitter_stays_within_its_bounds(
        base_ms in 0u64..10_000,
        factor in 1.0f64..100.0,
        cap_extra_ms in 0u64..10_000_000,
        seed in any::<u64>(),
        kind in 0usize..4,
        n in 1usize..200,
    ) {
        let base = Duration::from_millis(base_ms);
        let cap = base + Duration::from_millis(cap_extra_ms);
        let jitter = [Jitter::None, Jitter::Full, Jitter::Equal, Jitter::Decorrelated][kind];
        let plain: Vec<_> = Backoff::exponential(base).with_factor(factor).unwrap()
            .with_max_delay(cap).build().take(n).collect();
        let jittered: Vec<_> = Backoff::exponential(base).with_factor(factor).unwrap()
            .with_max_delay(cap).with_jitter(jitter).with_seed(seed).build().take(n).collect();
        prop_assert_eq!(jittered.len(), n);
        for (d, p) in jittered.iter().zip(&plain) {
            prop_assert!(*p <= cap);
            match jitter {
                Jitter::None => prop_assert_eq!(d, p),
                Jitter::Full => prop_assert!(*d <= *p),
                Jitter::Equal => prop_assert!(*d >= *p / 2 && *d <= *p),
                _ => prop_assert!(*d >= base && *d <= cap),
            }
        }
    }

    #[test]
    fn uncapped_exponential_saturates_instead_of_overflowing(
        base_ms in 1u64..1_000_000,
        factor in 1.5f64..1e12,
        seed in any::<u64>(),
    ) {
        let make = || Backoff::exponential(Duration::from_millis(base_ms))
            .with_factor(factor).unwrap().with_seed(seed);
        let plain: Vec<_> = make().build().take(2_000).collect();
        let jittered: Vec<_> = make().with_jitter(Jitter::Full).build().take(2_000).collect();
        // Growth never wraps back down: the plain schedule is non-decreasing
        // and ends saturated at "as long as possible".
        prop_assert!(plain.windows(2).all(|w| w[0] <= w[1]), "{:?}", &plain[..8]);
        prop_assert_eq!(*plain.last().unwrap(), Duration::MAX);
        prop_assert_eq!(plain[0], Duration::from_millis(base_ms));
        for (d, p) in jittered.iter().zip(&plain) {
            prop_assert!(d <= p);
        }
    }
}

// ---------------------------------------------------------------------------
// Retry

fn seeds_retry(clock: Arc<dyn Clock>) -> Retry {
    Retry::new()
        .with_max_attempts(7)
        .with_backoff(Backoff::exponential(S(1)).with_max_delay(S(10)))
        .with_clock(clock)
}

#[test]
fn retry_follows_the_seeds_schedule_on_the_clock() {
    let (clock, c) = manual();
    let (log, op) = flaky(&clock, 6);
    let out = drive(&clock, seeds_retry(c).run(op));
    assert_eq!(out, Ok("ok"));
    // Attempts start at 0 and then after 1, 2, 4, 8, 10, 10 s.
    assert_eq!(
        *log.lock().unwrap(),
        [S(0), S(1), S(3), S(7), S(15), S(25), S(35)]
    );
}

#[test]
fn exhausted_attempts_keep_the_last_error_and_count() {
    let (clock, c) = manual();
    let (log, op) = flaky(&clock, 100);
    let err = drive(&clock, seeds_retry(c).with_max_attempts(3).run(op)).unwrap_err();
    assert_eq!(
        err,
        RetryError::Exhausted {
            error: AttemptError::Inner("boom"),
            attempts: 3
        }
    );
    assert_eq!(log.lock().unwrap().len(), 3);
    assert_eq!(err.into_inner(), Some("boom"));
}

#[test]
fn retry_after_hint_replaces_the_backoff_delay_and_is_capped() {
    let (clock, c) = manual();
    let (log, op) = flaky(&clock, 2);
    let retry = seeds_retry(c).with_max_retry_after(S(5)).with_classifier(
        |r: Result<&&str, &&str>| match r {
            Ok(_) => Decision::Done,
            Err(_) => Decision::RetryAfter(S(3)),
        },
    );
    assert_eq!(drive(&clock, retry.run(op)), Ok("ok"));
    assert_eq!(*log.lock().unwrap(), [S(0), S(3), S(6)]);

    let (clock, c) = manual();
    let (log, op) = flaky(&clock, 1);
    let retry = seeds_retry(c).with_max_retry_after(S(5)).with_classifier(
        |r: Result<&&str, &&str>| match r {
            Ok(_) => Decision::Done,
            Err(_) => Decision::RetryAfter(S(3600)),
        },
    );
    assert_eq!(drive(&clock, retry.run(op)), Ok("ok"));
    assert_eq!(
        *log.lock().unwrap(),
        [S(0), S(5)],
        "an hour-long hint is capped at 5 s"
    );
}

#[test]
fn a_permanent_error_is_not_retried() {
    let (clock, c) = manual();
    let (log, op) = flaky(&clock, 100);
    let retry = seeds_retry(c).with_classifier(|r: Result<&&str, &&str>| match r {
        Err(&"boom") => Decision::Done,
        _ => Decision::Retry,
    });
    let err = drive(&clock, retry.run(op)).unwrap_err();
    assert_eq!(
        err,
        RetryError::Permanent {
            error: "boom",
            attempts: 1
        }
    );
    assert_eq!(log.lock().unwrap().len(), 1);
}

#[test]
fn the_elapsed_limit_stops_before_the_attempt_count() {
    let (clock, c) = manual();
    let (log, op) = flaky(&clock, 100);
    let retry = Retry::new()
        .with_max_attempts(10)
        .with_backoff(Backoff::constant(S(1)))
        .with_max_elapsed(Duration::from_millis(2_500))
        .with_clock(c);
    let err = drive(&clock, retry.run(op)).unwrap_err();
    // Attempts at 0, 1, 2 s; the next would start at 3 s > 2.5 s.
    assert_eq!(*log.lock().unwrap(), [S(0), S(1), S(2)]);
    match err {
        RetryError::Deadline {
            attempts, elapsed, ..
        } => {
            assert_eq!(attempts, 3);
            assert_eq!(elapsed, S(2));
        }
        other => panic!("expected a deadline error, got {other:?}"),
    }
}

#[test]
fn the_attempt_timeout_shrinks_to_the_deadline() {
    let (clock, c) = manual();
    let calls = Arc::new(AtomicU32::new(0));
    let retry = Retry::new()
        .with_max_attempts(5)
        .with_attempt_timeout(S(10))
        .with_max_elapsed(S(3))
        .with_clock(c);
    let counted = calls.clone();
    let err = drive(
        &clock,
        retry.run(move || {
            counted.fetch_add(1, Ordering::SeqCst);
            future::pending::<Result<(), &str>>()
        }),
    )
    .unwrap_err();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        clock.elapsed(),
        S(3),
        "the hung attempt was cut at the deadline, not at 10 s"
    );
    assert!(
        matches!(
            err,
            RetryError::Deadline {
                error: AttemptError::TimedOut(_),
                attempts: 1,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn a_budget_stops_a_retry_storm() {
    let (clock, c) = manual();
    let budget = Arc::new(RetryBudget::with_clock(S(10), 0, 0.1, c.clone()).unwrap());
    let retry = Retry::new()
        .with_max_attempts(3)
        .with_backoff(Backoff::constant(Duration::from_millis(1)))
        .with_budget(budget)
        .with_clock(c);
    let attempts = Arc::new(AtomicU32::new(0));
    let mut budget_stops = 0;
    for _ in 0..50 {
        let a = attempts.clone();
        let out = drive(
            &clock,
            retry.run(move || {
                a.fetch_add(1, Ordering::SeqCst);
                future::ready(Err::<(), _>("down"))
            }),
        );
        if matches!(out, Err(RetryError::Budget { .. })) {
            budget_stops += 1;
        }
    }
    // Without the budget: 150 attempts. With it: 50 calls + at most 10%.
    let total = attempts.load(Ordering::SeqCst);
    assert!(total <= 55, "{total} attempts");
    assert!(
        budget_stops >= 45,
        "{budget_stops} calls stopped by the budget"
    );
}

struct DropFlag(Arc<AtomicU32>);
impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn dropping_a_retry_mid_sleep_stops_retrying() {
    let (clock, c) = manual();
    let (log, op) = flaky(&clock, 100);
    let retry = seeds_retry(c);
    let mut fut = Box::pin(retry.run(op));
    assert!(poll_once(&mut fut).is_pending());
    assert_eq!(clock.sleepers(), 1, "sleeping before attempt 2");
    drop(fut);
    assert_eq!(clock.sleepers(), 0);
    clock.advance(S(100));
    assert_eq!(log.lock().unwrap().len(), 1);
}

#[test]
fn dropping_a_retry_mid_attempt_runs_the_attempts_cleanup() {
    let (_clock, c) = manual();
    let cleaned = Arc::new(AtomicU32::new(0));
    let retry = seeds_retry(c);
    let flag = cleaned.clone();
    let mut fut = Box::pin(retry.run(move || {
        let guard = DropFlag(flag.clone());
        async move {
            let _guard = guard;
            future::pending::<Result<(), &str>>().await
        }
    }));
    assert!(poll_once(&mut fut).is_pending());
    assert_eq!(cleaned.load(Ordering::SeqCst), 0);
    drop(fut);
    assert_eq!(cleaned.load(Ordering::SeqCst), 1);
}

#[test]
fn on_retry_sees_attempt_delay_and_error() {
    let (clock, c) = manual();
    let (_log, op) = flaky(&clock, 2);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let retry = seeds_retry(c).on_retry(
        move |e: &smolkit::resilience::RetryEvent<'_, &'static str, &'static str>| {
            s2.lock()
                .unwrap()
                .push((e.attempt, e.delay, e.outcome.clone().err()));
        },
    );
    assert_eq!(drive(&clock, retry.run(op)), Ok("ok"));
    assert_eq!(
        *seen.lock().unwrap(),
        [
            (1, S(1), Some(AttemptError::Inner("boom"))),
            (2, S(2), Some(AttemptError::Inner("boom")))
        ]
    );
}

#[test]
fn timeout_on_the_manual_clock() {
    let (clock, _) = manual();
    let mut fut = Box::pin(timeout_on(&clock, S(5), future::pending::<()>()));
    assert!(poll_once(&mut fut).is_pending());
    clock.advance(S(4));
    assert!(poll_once(&mut fut).is_pending());
    clock.advance(S(1));
    match poll_once(&mut fut) {
        Poll::Ready(Err(e)) => assert_eq!(e.after(), S(5)),
        other => panic!("expected Elapsed, got {other:?}"),
    }
    let mut ok = Box::pin(timeout_on(&clock, S(5), async { 3 }));
    assert!(matches!(poll_once(&mut ok), Poll::Ready(Ok(3))));
}

// ---------------------------------------------------------------------------
// CircuitBreaker

fn breaker(c: Arc<dyn Clock>, window: Window) -> CircuitBreaker {
    CircuitBreaker::builder()
        .with_window(window)
        .with_min_calls(4)
        .with_failure_rate(0.5)
        .with_half_open(2, 3)
        .with_open_backoff(Backoff::exponential(S(10)).with_max_delay(S(60)))
        .with_clock(c)
        .build()
        .unwrap()
}

fn outcome(b: &CircuitBreaker, ok: bool) {
    b.try_acquire().unwrap().record(if ok {
        CallOutcome::Success
    } else {
        CallOutcome::Failure
    });
}

#[test]
fn count_window_trips_at_the_failure_rate_after_min_calls() {
    let (clock, c) = manual();
    let b = breaker(c, Window::Count(4));
    let events = b.subscribe();
    outcome(&b, false);
    outcome(&b, false);
    outcome(&b, false);
    assert_eq!(b.state(), State::Closed, "3 calls < min_calls 4");
    outcome(&b, true);
    assert_eq!(b.state(), State::Open, "3 of 4 failed");
    let rejected = b.try_acquire().unwrap_err();
    assert_eq!(rejected.retry_after(), S(10));
    assert_eq!(b.metrics().rejected, 1);

    clock.advance(S(10));
    assert_eq!(b.state(), State::HalfOpen);
    for _ in 0..3 {
        outcome(&b, true);
    }
    assert_eq!(b.state(), State::Closed);
    let changes: Vec<_> = std::iter::from_fn(|| events.try_recv().ok())
        .map(|c| (c.from, c.to))
        .collect();
    assert_eq!(
        changes,
        [
            (State::Closed, State::Open),
            (State::Open, State::HalfOpen),
            (State::HalfOpen, State::Closed)
        ]
    );
}

#[test]
fn count_window_forgets_old_calls() {
    let (_clock, c) = manual();
    let b = breaker(c, Window::Count(4));
    outcome(&b, false);
    outcome(&b, false);
    outcome(&b, true);
    outcome(&b, true); // 2 of 4: 50% -> trips at >= 50%
    assert_eq!(b.state(), State::Open);

    let (_clock, c) = manual();
    let b = breaker(c, Window::Count(4));
    outcome(&b, false);
    for _ in 0..6 {
        outcome(&b, true);
    }
    outcome(&b, false); // window: S S S F -> 25%
    assert_eq!(b.state(), State::Closed);
    assert_eq!(b.metrics().calls, 4);
}

#[test]
fn time_window_drops_calls_older_than_its_size() {
    let (clock, c) = manual();
    let b = breaker(
        c,
        Window::Time {
            size: S(10),
            buckets: 5,
        },
    );
    outcome(&b, false);
    outcome(&b, false);
    outcome(&b, false);
    clock.advance(S(11)); // those three age out
    outcome(&b, false);
    assert_eq!(b.metrics().calls, 1);
    assert_eq!(b.state(), State::Closed);
    outcome(&b, true);
    outcome(&b, false);
    outcome(&b, true); // 2 of 4 within 10 s
    assert_eq!(b.state(), State::Open);
}

#[test]
fn half_open_admits_exactly_n_concurrent_probes() {
    let (clock, c) = manual();
    let b = breaker(c, Window::Count(4));
    for _ in 0..4 {
        outcome(&b, false);
    }
    clock.advance(S(10));
    let p1 = b.try_acquire().unwrap();
    let p2 = b.try_acquire().unwrap();
    assert!(p1.is_probe() && p2.is_probe());
    let third = b.try_acquire().unwrap_err();
    assert_eq!(third.retry_after(), Duration::ZERO);
    p1.record(CallOutcome::Success);
    let p3 = b.try_acquire().unwrap(); // a slot came free
    assert!(b.try_acquire().is_err());
    drop(p2); // ignored: frees its slot, counts nothing
    p3.record(CallOutcome::Success);
    assert_eq!(b.state(), State::HalfOpen, "2 of 3 successes");
    b.try_acquire().unwrap().record(CallOutcome::Success);
    assert_eq!(b.state(), State::Closed);
}

#[test]
fn a_failed_probe_reopens_for_longer() {
    let (clock, c) = manual();
    let b = breaker(c, Window::Count(4));
    for _ in 0..4 {
        outcome(&b, false);
    }
    clock.advance(S(10));
    b.try_acquire().unwrap().record(CallOutcome::Failure);
    assert_eq!(b.state(), State::Open);
    assert_eq!(
        b.try_acquire().unwrap_err().retry_after(),
        S(20),
        "second trip waits twice as long"
    );
    clock.advance(S(20));
    assert_eq!(b.state(), State::HalfOpen);
}

#[test]
fn slow_calls_trip_the_breaker() {
    let (clock, c) = manual();
    let b = CircuitBreaker::builder()
        .with_window(Window::Count(4))
        .with_min_calls(4)
        .with_slow_calls(S(1), 0.5)
        .with_clock(c)
        .build()
        .unwrap();
    for slow in [false, true, false, true] {
        let p = b.try_acquire().unwrap();
        clock.advance(if slow {
            S(2)
        } else {
            Duration::from_millis(10)
        });
        p.record(CallOutcome::Success);
    }
    assert_eq!(b.state(), State::Open);
    assert_eq!(b.metrics().slow_calls, 2);
}

#[test]
fn isolate_and_reset_by_hand() {
    let (_clock, c) = manual();
    let b = breaker(c, Window::Count(4));
    b.isolate();
    let r = b.try_acquire().unwrap_err();
    assert!(r.is_isolated());
    assert_eq!(r.to_string(), "circuit breaker isolated");
    b.reset();
    assert_eq!(b.state(), State::Closed);
    assert!(b.try_acquire().is_ok());
}

#[test]
fn outcomes_from_before_a_transition_do_not_count() {
    let (_clock, c) = manual();
    let b = breaker(c, Window::Count(4));
    let late = b.try_acquire().unwrap();
    for _ in 0..4 {
        outcome(&b, false);
    }
    b.reset();
    late.record(CallOutcome::Failure); // from the previous closed period
    assert_eq!(b.metrics().calls, 0);
}

#[test]
fn call_rejects_without_running_the_operation() {
    let (_clock, c) = manual();
    let b = breaker(c, Window::Count(4));
    b.isolate();
    let ran = AtomicU32::new(0);
    let out = future::block_on(b.call(|| async {
        ran.fetch_add(1, Ordering::SeqCst);
        Ok::<_, ()>(())
    }));
    assert!(matches!(out, Err(BreakerError::Rejected(_))));
    assert_eq!(ran.load(Ordering::SeqCst), 0);
}

#[test]
fn breaker_config_errors_name_the_setting() {
    let err = CircuitBreaker::builder()
        .with_failure_rate(1.5)
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("failure_rate"), "{err}");
    assert!(
        CircuitBreaker::builder()
            .with_window(Window::Count(0))
            .build()
            .is_err()
    );
    assert!(
        CircuitBreaker::builder()
            .with_half_open(0, 1)
            .build()
            .is_err()
    );
}

// ---------------------------------------------------------------------------
// Policy

#[test]
fn policy_retries_inside_the_breaker_and_reports_the_layer() {
    let (clock, c) = manual();
    let b = CircuitBreaker::builder()
        .with_window(Window::Count(2))
        .with_min_calls(2)
        .with_clock(c.clone())
        .build()
        .unwrap();
    let policy = Policy::builder()
        .with_breaker(b.clone())
        .with_retry(
            Retry::new()
                .with_max_attempts(3)
                .with_backoff(Backoff::constant(S(1)))
                .with_clock(c.clone()),
        )
        .with_clock(c)
        .build();
    let calls = Arc::new(AtomicU32::new(0));
    for _ in 0..2 {
        let calls = calls.clone();
        let err = drive(
            &clock,
            policy.run(move || {
                calls.fetch_add(1, Ordering::SeqCst);
                future::ready(Err::<(), _>("down"))
            }),
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                PolicyError::Retry(RetryError::Exhausted { attempts: 3, .. })
            ),
            "{err:?}"
        );
    }
    assert_eq!(calls.load(Ordering::SeqCst), 6);
    assert_eq!(
        (b.metrics().calls, b.metrics().failures),
        (2, 2),
        "one sample per logical call"
    );
    assert_eq!(b.state(), State::Open, "two logical calls, two failures");
    let calls2 = calls.clone();
    let err = drive(
        &clock,
        policy.run(move || {
            calls2.fetch_add(1, Ordering::SeqCst);
            future::ready(Ok::<_, &str>(()))
        }),
    )
    .unwrap_err();
    assert!(matches!(err, PolicyError::CircuitOpen(_)));
    assert_eq!(calls.load(Ordering::SeqCst), 6, "rejected without running");
}

#[test]
fn policy_total_timeout_bounds_waiting_for_the_bulkhead() {
    let (clock, c) = manual();
    let bulkhead = Arc::new(Semaphore::new(1));
    let _busy = bulkhead.try_acquire().unwrap();
    let policy = Policy::builder()
        .with_total_timeout(S(2))
        .with_bulkhead(bulkhead.clone())
        .with_clock(c)
        .build();
    let err = drive(&clock, policy.run(|| future::ready(Ok::<_, &str>(1)))).unwrap_err();
    assert!(
        matches!(err, PolicyError::Timeout(e) if e.after() == S(2)),
        "{err:?}"
    );
    assert_eq!(
        bulkhead.waiting(),
        0,
        "the cancelled acquire left the queue"
    );
}

#[test]
fn policy_rate_limit_and_attempt_timeout_layers() {
    let (clock, c) = manual();
    let limiter = Arc::new(RateLimiter::with_clock(
        Quota::per_second(1).unwrap().with_burst(1).unwrap(),
        c.clone(),
    ));
    let policy = Policy::builder()
        .with_rate_limit(limiter)
        .with_attempt_timeout(S(1))
        .with_clock(c)
        .build();
    assert_eq!(
        drive(&clock, policy.run(|| future::ready(Ok::<_, &str>(1)))),
        Ok(1)
    );
    let before = clock.elapsed();
    assert_eq!(
        drive(&clock, policy.run(|| future::ready(Ok::<_, &str>(2)))),
        Ok(2)
    );
    assert_eq!(clock.elapsed() - before, S(1), "waited for the next cell");
    let err = drive(&clock, policy.run(future::pending::<Result<(), &str>>)).unwrap_err();
    assert!(
        matches!(err, PolicyError::Inner(AttemptError::TimedOut(_))),
        "{err:?}"
    );
    let _ = RateLimitError::NotYet { retry_after: S(1) };
}

#[test]
fn policy_fallback_turns_an_error_into_a_value() {
    let policy = Policy::builder().build();
    let out = future::block_on(policy.run_with_fallback(
        || future::ready(Err::<&str, _>("down")),
        |e| async move {
            assert_eq!(e.into_inner(), Some("down"));
            Ok("cached")
        },
    ));
    assert_eq!(out, Ok("cached"));
}

#[test]
fn resilience_types_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<CircuitBreaker>();
    send_sync::<Retry>();
    send_sync::<RetryBudget>();
    send_sync::<Policy>();
    send_sync::<Backoff>();
    fn send<T: Send>(_: &T) {}
    let policy = Policy::builder().build();
    send(&policy.run(|| future::ready(Ok::<_, String>(()))));
}

/// Issue 14 #5: a total timeout around a call that never completes dropped
/// the breaker's permit unrecorded, so a service that hangs could never trip
/// the breaker. A timed-out call is a failure (and a slow call).
#[test]
fn a_hung_call_cut_by_the_total_timeout_trips_the_breaker() {
    let (clock, c) = manual();
    let b = CircuitBreaker::builder()
        .with_window(Window::Count(3))
        .with_min_calls(3)
        .with_slow_calls(S(1), 0.5)
        .with_clock(c.clone())
        .build()
        .unwrap();
    let policy = Policy::builder()
        .with_total_timeout(S(2))
        .with_breaker(b.clone())
        .with_clock(c)
        .build();
    for _ in 0..3 {
        let err = drive(&clock, policy.run(future::pending::<Result<(), &str>>)).unwrap_err();
        assert!(matches!(err, PolicyError::Timeout(_)), "{err:?}");
    }
    let m = b.metrics();
    assert_eq!((m.calls, m.failures, m.slow_calls), (3, 3, 3), "{m:?}");
    assert_eq!(
        b.state(),
        State::Open,
        "a hanging service trips the breaker"
    );
}
