//! Helpers shared by the benches.

use std::time::Duration;

/// Loop rounds that take about `target` of CPU on this machine.
pub fn calibrate(target: Duration) -> u64 {
    let mut rounds = 1u64 << 16;
    loop {
        let start = std::time::Instant::now();
        std::hint::black_box(spin(rounds));
        let took = start.elapsed();
        if took >= Duration::from_millis(2) {
            return (rounds as f64 * target.as_secs_f64() / took.as_secs_f64()) as u64;
        }
        rounds *= 2;
    }
}

/// CPU work: an xorshift loop the optimiser cannot remove.
pub fn spin(rounds: u64) -> u64 {
    let mut x = std::hint::black_box(0x9E37_79B9_7F4A_7C15u64);
    for _ in 0..rounds {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    x
}
