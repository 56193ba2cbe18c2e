//! Backoff schedules: `Iterator<Item = Duration>`.

use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

use crate::ConfigError;

/// How the delays grow before jitter.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Growth {
    Constant,
    Linear { step: Duration },
    Exponential { factor: f64 },
}

/// Randomisation applied to each delay `d` (the un-jittered delay of that
/// attempt, already capped). The bounds are what the property tests check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Jitter {
    /// `d` exactly. Clients that fail together retry together.
    #[default]
    None,
    /// Uniform in `[0, d]` (AWS "full jitter"): spreads retries the most.
    Full,
    /// Uniform in `[d/2, d]` (AWS "equal jitter"): never retries too soon.
    Equal,
    /// Uniform in `[base, 3 × previous]`, capped: each delay depends on the
    /// last one (AWS "decorrelated jitter"). Always within `[base, cap]`
    /// (and at most `cap`, even if `base > cap`).
    Decorrelated,
}

/// Builds a [`Backoff`]; see its docs.
///
/// # Default
///
/// No cap, no end (the schedule is infinite), no jitter, factor 2 for
/// exponential growth, a random jitter seed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackoffBuilder {
    base: Duration,
    growth: Growth,
    max_delay: Option<Duration>,
    max_times: Option<usize>,
    jitter: Jitter,
    seed: Option<u64>,
}

impl BackoffBuilder {
    /// The largest delay; later delays stay at it. A cap below the first
    /// delay makes every delay the cap.
    pub fn with_max_delay(mut self, cap: Duration) -> Self {
        self.max_delay = Some(cap);
        self
    }

    /// The schedule ends after `n` delays (`None` from `next`).
    pub fn with_max_times(mut self, n: usize) -> Self {
        self.max_times = Some(n);
        self
    }

    /// Randomises each delay.
    pub fn with_jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// Makes the jitter reproducible.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// For exponential growth: the multiplier per attempt (ignored by
    /// constant and linear schedules).
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming `factor` unless it is a finite number ≥ 1.
    pub fn with_factor(mut self, factor: f64) -> Result<Self, ConfigError> {
        if !(factor.is_finite() && factor >= 1.0) {
            return Err(ConfigError::new(
                "factor",
                factor,
                "must be a finite number >= 1",
            ));
        }
        if let Growth::Exponential { .. } = self.growth {
            self.growth = Growth::Exponential { factor };
        }
        Ok(self)
    }

    /// Builds the schedule. Every setting was checked when it was set, so
    /// this cannot fail; anything that takes a backoff takes
    /// `impl Into<Backoff>`, so a builder can be passed without it.
    pub fn build(self) -> Backoff {
        let seed = self
            .seed
            .unwrap_or_else(|| RandomState::new().hash_one(std::time::Instant::now()));
        Backoff {
            config: self,
            attempt: 0,
            prev: self.base,
            rng: SplitMix64(seed),
        }
    }
}

impl From<BackoffBuilder> for Backoff {
    fn from(builder: BackoffBuilder) -> Self {
        builder.build()
    }
}

/// A retry delay schedule: an infinite (or [`with_max_times`] bounded)
/// `Iterator<Item = Duration>`.
///
/// Constant, linear or exponential growth, an optional cap, and the four
/// jitter kinds of [`Jitter`]. Arithmetic saturates: an exponential
/// schedule never overflows, it stays at the cap (or at `Duration::MAX`
/// without one). Jitter uses a small seedable generator
/// ([`with_seed`](BackoffBuilder::with_seed) for reproducible tests).
///
/// [`with_max_times`]: BackoffBuilder::with_max_times
///
/// # Examples
///
/// The seeds' schedule: 1 s doubling, capped at 10 s.
///
/// ```
/// use std::time::Duration;
/// use smolkit::resilience::Backoff;
///
/// let s = Duration::from_secs;
/// let delays: Vec<_> = Backoff::exponential(s(1))
///     .with_max_delay(s(10))
///     .build()
///     .take(6)
///     .collect();
/// assert_eq!(delays, [s(1), s(2), s(4), s(8), s(10), s(10)]);
/// ```
#[derive(Clone)]
pub struct Backoff {
    config: BackoffBuilder,
    attempt: u32,
    prev: Duration,
    rng: SplitMix64,
}

impl Backoff {
    /// Every delay is `delay`.
    pub fn constant(delay: Duration) -> BackoffBuilder {
        Self::builder(delay, Growth::Constant)
    }

    /// `base`, `base + step`, `base + 2 × step`, ...
    pub fn linear(base: Duration, step: Duration) -> BackoffBuilder {
        Self::builder(base, Growth::Linear { step })
    }

    /// `base`, `base × 2`, `base × 4`, ... (change the factor with
    /// [`with_factor`](BackoffBuilder::with_factor)).
    pub fn exponential(base: Duration) -> BackoffBuilder {
        Self::builder(base, Growth::Exponential { factor: 2.0 })
    }

    fn builder(base: Duration, growth: Growth) -> BackoffBuilder {
        BackoffBuilder {
            base,
            growth,
            max_delay: None,
            max_times: None,
            jitter: Jitter::None,
            seed: None,
        }
    }

    /// The first delay before jitter.
    pub fn base(&self) -> Duration {
        self.config.base
    }

    /// The cap, if any.
    pub fn max_delay(&self) -> Option<Duration> {
        self.config.max_delay
    }

    /// The same schedule from its start (the jitter generator continues).
    pub fn reset(&mut self) {
        self.attempt = 0;
        self.prev = self.config.base;
    }

    /// The un-jittered, capped delay of attempt `n` (0-based).
    fn plain(&self, n: u32) -> Duration {
        let c = &self.config;
        let d = match c.growth {
            // NOTE: a zero base stays zero (0 × factor^n would be 0 × inf =
            // NaN once factor^n overflows).
            _ if c.base.is_zero() && !matches!(c.growth, Growth::Linear { .. }) => Duration::ZERO,
            Growth::Constant => c.base,
            Growth::Linear { step } => c.base.saturating_add(step.saturating_mul(n)),
            Growth::Exponential { factor } => {
                let secs = c.base.as_secs_f64() * factor.powi(n.min(i32::MAX as u32) as i32);
                Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
            }
        };
        match c.max_delay {
            Some(cap) => d.min(cap),
            None => d,
        }
    }
}

impl Iterator for Backoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        if self
            .config
            .max_times
            .is_some_and(|max| self.attempt as usize >= max)
        {
            return None;
        }
        let d = self.plain(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        let out = match self.config.jitter {
            Jitter::None => d,
            Jitter::Full => self.rng.between(Duration::ZERO, d),
            Jitter::Equal => self.rng.between(d / 2, d),
            Jitter::Decorrelated => {
                let cap = self.config.max_delay.unwrap_or(Duration::MAX);
                let base = self.config.base.min(cap);
                let hi = self.prev.saturating_mul(3).min(cap).max(base);
                let next = self.rng.between(base, hi);
                self.prev = next;
                next
            }
        };
        Some(out)
    }
}

impl fmt::Debug for Backoff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backoff")
            .field("config", &self.config)
            .field("attempt", &self.attempt)
            .finish()
    }
}

/// SplitMix64: tiny, fast, good enough to spread retries.
#[derive(Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[lo, hi]` at nanosecond resolution.
    fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        if hi <= lo {
            return lo;
        }
        // NOTE: spans beyond 584 years are clamped to u64 nanoseconds so
        // the multiply below cannot overflow.
        let span = (hi - lo).as_nanos().min(u128::from(u64::MAX - 1));
        // 128-bit multiply-shift: unbiased enough, no overflow.
        let r = (u128::from(self.next_u64()) * (span + 1)) >> 64;
        lo.saturating_add(Duration::from_nanos(u64::try_from(r).unwrap_or(u64::MAX)))
    }
}
