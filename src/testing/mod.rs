//! Test kit (feature `testing`): a clock that moves only when told.
//!
//! Users can test their own timer-driven code with it just as smolkit's own
//! tests do.

mod clock;

pub use clock::ManualClock;
