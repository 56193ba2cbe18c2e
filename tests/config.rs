//! Extreme but accepted settings (issue 14 #11): every setting is either
//! refused by its builder with a `ConfigError`, or means what the user
//! asked for ("never", "forever", "as large as possible"); no arithmetic on
//! a user value panics or wraps afterwards.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use proptest::prelude::*;
use smolkit::limit::{Quota, RateLimiter, Semaphore};
use smolkit::resilience::{
    Backoff, CallOutcome, CircuitBreaker, Jitter, MAX_BUCKETS, Policy, Retry, State, Window,
};
use smolkit::runtime::Clock;
use smolkit::testing::ManualClock;

/// Durations from zero to `Duration::MAX`, with the edges weighted in.
fn duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        Just(Duration::ZERO),
        Just(Duration::MAX),
        Just(Duration::from_nanos(1)),
        (0u64..=u64::MAX, 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
        (0u64..100_000).prop_map(Duration::from_millis),
    ]
}

fn count() -> impl Strategy<Value = usize> {
    prop_oneof![Just(0), Just(1), Just(usize::MAX), 0usize..10_000]
}

fn poll_once<F: Future>(fut: F) -> Poll<F::Output> {
    let mut fut = std::pin::pin!(fut);
    fut.as_mut().poll(&mut Context::from_waker(Waker::noop()))
}

#[test]
fn a_breaker_open_forever_stays_open() {
    // Issue 14 #11: `Duration::MAX` (or an uncapped exponential backoff
    // after ~60 trips) made the breaker half-open at once.
    let clock = ManualClock::new();
    let b = CircuitBreaker::builder()
        .with_window(Window::Count(1))
        .with_min_calls(1)
        .with_open_backoff(Backoff::constant(Duration::MAX))
        .with_clock(Arc::new(clock.clone()))
        .build()
        .unwrap();
    b.try_acquire().unwrap().record(CallOutcome::Failure);
    assert_eq!(b.state(), State::Open);
    clock.advance(Duration::from_secs(100 * 365 * 86_400));
    assert!(b.try_acquire().is_err(), "a century later, still open");
    assert_eq!(b.state(), State::Open);
}

#[test]
fn a_quota_whose_window_overflows_is_refused() {
    // Issue 14 #11: these admitted every request (saturated arithmetic).
    let century = Duration::from_secs(600 * 365 * 86_400);
    let err = Quota::new(1, century).unwrap_err();
    assert_eq!(err.setting, "period");
    let err = Quota::new(1, Duration::from_secs(3600))
        .unwrap()
        .with_burst(u32::MAX)
        .unwrap_err();
    assert_eq!((err.setting, err.value.as_str()), ("burst", "4294967295"));
    // The largest accepted windows still limit.
    let q = Quota::new(1, Quota::MAX_WINDOW).unwrap();
    let clock = ManualClock::new();
    let limiter = RateLimiter::with_clock(q, Arc::new(clock.clone()));
    assert!(limiter.check(1).is_ok());
    assert!(
        limiter.check(1).is_err(),
        "the second cell waits ~146 years"
    );
}

#[test]
fn time_window_slices_are_bounded() {
    let err = CircuitBreaker::builder()
        .with_window(Window::Time {
            size: Duration::from_secs(60),
            buckets: u32::MAX,
        })
        .build()
        .unwrap_err();
    assert_eq!(err.setting, "window buckets");
    assert!(
        CircuitBreaker::builder()
            .with_window(Window::Time {
                size: Duration::from_secs(60),
                buckets: MAX_BUCKETS,
            })
            .build()
            .is_ok()
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn breakers_build_or_refuse_and_never_panic(
        window_count in count(),
        size in duration(),
        buckets in prop_oneof![Just(0u32), Just(u32::MAX), 0u32..20_000],
        time_window in any::<bool>(),
        min_calls in count(),
        failure_rate in prop_oneof![Just(f64::NAN), Just(0.0), Just(1.0), Just(2.0), 0.0f64..1.0],
        slow in duration(),
        probes in count(),
        successes in count(),
        open in duration(),
        steps in proptest::collection::vec((duration(), any::<bool>()), 0..20),
    ) {
        let clock = ManualClock::new();
        let window = if time_window {
            Window::Time { size, buckets }
        } else {
            Window::Count(window_count)
        };
        let built = CircuitBreaker::builder()
            .with_window(window)
            .with_min_calls(min_calls)
            .with_failure_rate(failure_rate)
            .with_slow_calls(slow, 0.5)
            .with_half_open(probes, successes)
            .with_open_backoff(Backoff::exponential(open))
            .with_clock(Arc::new(clock.clone()))
            .build();
        if let Ok(b) = built {
            for (advance, fail) in steps {
                clock.advance(advance);
                if let Ok(p) = b.try_acquire() {
                    p.record(if fail { CallOutcome::Failure } else { CallOutcome::Success });
                }
                let _ = (b.state(), b.metrics());
            }
        }
    }

    #[test]
    fn quotas_build_or_refuse_and_limiters_never_panic(
        rate in prop_oneof![Just(0u32), Just(u32::MAX), 1u32..1000],
        period in duration(),
        burst in prop_oneof![Just(0u32), Just(u32::MAX), 1u32..1000],
        steps in proptest::collection::vec((duration(), 0u32..4), 0..20),
    ) {
        let quota = Quota::new(rate, period).and_then(|q| q.with_burst(burst));
        if let Ok(q) = quota {
            prop_assert!(q.emission_interval() > Duration::ZERO);
            let clock = ManualClock::new();
            let limiter = RateLimiter::with_clock(q, Arc::new(clock.clone()));
            let mut admitted = 0u64;
            for (advance, n) in steps {
                clock.advance(advance);
                if limiter.check(n).is_ok() {
                    admitted += u64::from(n);
                }
                let _ = poll_once(limiter.until_ready(n));
            }
            // Never more than the burst plus what the time moved allows:
            // at least, never "everything" for a quota that rests long.
            if q.emission_interval() > Duration::from_secs(365 * 86_400) && clock.elapsed() < q.emission_interval() {
                prop_assert!(admitted <= u64::from(q.burst()) + 4, "admitted {admitted}");
            }
        }
    }

    #[test]
    fn backoffs_retries_and_policies_never_panic(
        base in duration(),
        step in duration(),
        cap in duration(),
        factor in prop_oneof![Just(f64::NAN), Just(f64::INFINITY), Just(1.0), 1.0f64..1e9],
        times in count(),
        elapsed in duration(),
        attempt in duration(),
        total in duration(),
        seed in any::<u64>(),
    ) {
        for builder in [
            Backoff::constant(base),
            Backoff::linear(base, step),
            Backoff::exponential(base),
        ] {
            let Ok(builder) = builder.with_factor(factor) else { continue };
            let b = builder
                .with_max_delay(cap)
                .with_max_times(times)
                .with_jitter(Jitter::Decorrelated)
                .with_seed(seed)
                .build();
            for d in b.take(200) {
                prop_assert!(d <= cap);
            }
        }
        let clock = Arc::new(ManualClock::new());
        let retry = Retry::new()
            .with_max_attempts(3)
            .with_backoff(Backoff::constant(base))
            .with_max_elapsed(elapsed)
            .with_attempt_timeout(attempt)
            .with_clock(clock.clone());
        let policy = Policy::builder().with_total_timeout(total).with_retry(retry).with_clock(clock.clone()).build();
        let mut run = Box::pin(policy.run(|| async { Err::<(), _>("down") }));
        for _ in 0..10 {
            if poll_once(run.as_mut()).is_ready() {
                break;
            }
            if clock.advance_to_next().is_none() {
                break;
            }
        }
    }

    #[test]
    fn semaphores_and_clocks_saturate(
        permits in count(),
        ask in count(),
        advances in proptest::collection::vec(duration(), 0..8),
    ) {
        let sem = Semaphore::new(permits);
        prop_assert!(sem.capacity() <= Semaphore::MAX_PERMITS);
        let _ = sem.try_acquire_many(ask);
        sem.set_permits(permits.saturating_add(ask));
        let clock = ManualClock::new();
        let start = clock.now();
        let mut last = start;
        for d in advances {
            clock.advance(d);
            let now = clock.now();
            prop_assert!(now >= last, "time never goes back");
            last = now;
            let _ = poll_once(clock.sleep(d));
        }
    }
}
