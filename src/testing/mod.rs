//! Test kit (feature `testing`): a clock that moves only when told, and
//! [`ChaosServer`], a real HTTP server whose routes misbehave on purpose.
//!
//! Users can test their own timer-driven code with it just as smolkit's own
//! tests do.

mod chaos;
mod clock;

pub use chaos::{ChaosBuilder, ChaosServer, RequestRecord, WsRecord, pattern};
pub use clock::ManualClock;
