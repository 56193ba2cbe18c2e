//! A pipeline stage's own code panicking at any point — a `map` function
//! in the call that makes its future, a `filter` predicate, a `flat_map`
//! function — makes that item a dead letter of that stage; everything else
//! goes through, and the counts add up.

mod common;

use common::within;

use smolkit::pool::{Pipeline, Stage};

#[test]
fn a_panic_in_any_step_is_that_items_dead_letter() {
    within(|| {
        smol::block_on(async {
            let mut out = Vec::new();
            let report = Pipeline::from_stream(futures_lite::stream::iter(0..60u32))
                .map(Stage::new("call").with_concurrency(2), |x: u32| {
                    // Panics before any future exists.
                    assert!(x % 10 != 1, "call {x}");
                    async move { Ok::<_, String>(x) }
                })
                .filter("keep", |x: &u32| {
                    assert!(x % 10 != 2, "keep {x}");
                    true
                })
                .flat_map("split", |x: u32| {
                    assert!(x % 10 != 3, "split {x}");
                    [x, x + 1000]
                })
                .run(|x| {
                    out.push(x);
                    async { Ok::<_, String>(()) }
                })
                .await
                .unwrap();
            assert_eq!((report.inputs, report.dead_letters), (60, 18));
            assert_eq!(report.outputs, 2 * 42);
            assert_eq!(report.watermark, 60);
            let mut dead: Vec<(u64, String, String)> = report
                .dead
                .iter()
                .map(|d| (d.positions[0], d.stage.clone(), d.error.clone()))
                .collect();
            dead.sort();
            let expected: Vec<(u64, String, String)> = (0..60u64)
                .filter_map(|i| {
                    let (stage, what) = match i % 10 {
                        1 => ("call", "call"),
                        2 => ("keep", "keep"),
                        3 => ("split", "split"),
                        _ => return None,
                    };
                    Some((i, stage.to_owned(), format!("panicked: {what} {i}")))
                })
                .collect();
            assert_eq!(dead, expected);
            out.sort_unstable();
            let mut want: Vec<u32> = (0..60)
                .filter(|x| !matches!(x % 10, 1..=3))
                .flat_map(|x| [x, x + 1000])
                .collect();
            want.sort_unstable();
            assert_eq!(out, want);
        });
    });
}
