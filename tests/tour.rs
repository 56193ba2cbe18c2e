//! The README's main command (`cargo run --release --features testing
//! --example tour`) run as a test, so CI breaks when the tour does: the
//! example is compiled here as a module and its `main` called.

#[path = "../examples/tour.rs"]
mod tour;

#[test]
fn the_tour_runs_and_accounts_for_everything() {
    if let Err(e) = tour::main() {
        panic!("the tour failed: {e}");
    }
}
