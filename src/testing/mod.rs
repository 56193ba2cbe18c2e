//! Test kit (feature `testing`): a clock that moves only when told, and
//! [`ChaosServer`], a real HTTP server whose routes misbehave on purpose.
//!
//! Users can test their own timer-driven code with it just as smolkit's own
//! tests do.

mod chaos;
mod chaos_ws;
mod clock;

pub use chaos::{ChaosBuilder, ChaosServer, RequestRecord, pattern};
pub use chaos_ws::WsRecord;
pub use clock::ManualClock;
