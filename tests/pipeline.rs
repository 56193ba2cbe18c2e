//! Pipeline: ordering, backpressure, draining, stage policies, dead
//! letters, queue sources, conservation under random failures, resuming
//! after a real crash, tasks that end abnormally, autoscaled stages and
//! panics in any step.

mod common;

use common::{eventually, within};

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use proptest::prelude::*;
use smolkit::pool::{
    Checkpoint, FileCheckpoint, JsonLinesFile, MemoryCheckpoint, MemoryQueue, Pipeline,
    PipelineError, Queue, Stage,
};
use smolkit::resilience::{Backoff, Policy, Retry};
use smolkit::testing::ManualClock;

// ---------------------------------------------------------------------------
// Pipeline

/// Autoscales `stage` between 1 and `max` (adding a worker whenever one
/// waits, leaving after 1 ms idle) when `on`.
fn scale(stage: Stage, on: bool, max: usize) -> Stage {
    if !on {
        return stage;
    }
    stage
        .with_autoscale(1, max)
        .with_scale_up_at(0)
        .with_idle_timeout(Duration::from_millis(1))
}

/// What the conservation property does to item `i` (drawn per item).
#[derive(Debug, Clone, Copy)]
enum Fate {
    Pass,
    FailFirst,
    PanicFirst,
    Filtered,
    FailSecond,
    PanicSecond,
}

fn fate() -> impl Strategy<Value = Fate> {
    prop_oneof![
        6 => Just(Fate::Pass),
        1 => Just(Fate::FailFirst),
        1 => Just(Fate::PanicFirst),
        1 => Just(Fate::Filtered),
        1 => Just(Fate::FailSecond),
        1 => Just(Fate::PanicSecond),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn items_in_equal_items_out_plus_dead_letters_plus_filtered(
        fates in prop::collection::vec(fate(), 0..120),
        c1 in 1usize..5,
        c2 in 1usize..5,
        ordered in any::<bool>(),
        cap in 1usize..8,
        scaled in any::<bool>(),
    ) {
        let fates = Arc::new(fates);
        let n = fates.len() as u64;
        let (f1, f2, f3) = (fates.clone(), fates.clone(), fates.clone());
        let first = if ordered { Stage::new("first").with_concurrency(c1).with_ordered(true) } else { Stage::new("first").with_concurrency(c1) };
        let (out, report) = within(move || smol::block_on(async move {
            let mut out = Vec::new();
            let report = Pipeline::from_stream(futures_lite::stream::iter(0..n))
                .with_capacity(cap)
                .map(first, move |i: u64| {
                    let f = f1[i as usize];
                    async move {
                        match f {
                            Fate::FailFirst => Err(format!("first failed {i}")),
                            Fate::PanicFirst => panic!("first panicked {i}"),
                            _ => Ok(i),
                        }
                    }
                })
                .filter(scale(Stage::new("drop"), scaled, c2), move |i: &u64| !matches!(f2[*i as usize], Fate::Filtered))
                .map(scale(Stage::new("second").with_concurrency(c2), scaled, c2), move |i: u64| {
                    let f = f3[i as usize];
                    async move {
                        match f {
                            Fate::FailSecond => Err(format!("second failed {i}")),
                            Fate::PanicSecond => panic!("second panicked {i}"),
                            _ => Ok(i * 1000),
                        }
                    }
                })
                .run(|x| { out.push(x); async { Ok::<_, String>(()) } })
                .await
                .unwrap();
            (out, report)
        }));
        prop_assert_eq!(report.inputs, n);
        prop_assert_eq!(report.outputs + report.dead_letters + report.filtered, n);
        prop_assert_eq!(report.watermark, n);
        let mut out = out;
        out.sort();
        let expected: Vec<u64> = (0..n).filter(|&i| matches!(fates[i as usize], Fate::Pass)).map(|i| i * 1000).collect();
        prop_assert_eq!(out, expected);
        let mut dead: Vec<(u64, String)> = report.dead.iter().map(|d| (d.positions[0], d.stage.clone())).collect();
        dead.sort();
        let expected_dead: Vec<(u64, String)> = (0..n).filter_map(|i| match fates[i as usize] {
            Fate::FailFirst | Fate::PanicFirst => Some((i, "first".to_owned())),
            Fate::FailSecond | Fate::PanicSecond => Some((i, "second".to_owned())),
            _ => None,
        }).collect();
        prop_assert_eq!(dead, expected_dead);
        for d in &report.dead {
            prop_assert_eq!(d.item.as_u64(), Some(d.positions[0]));
            let i = d.positions[0];
            let expected_error = match fates[i as usize] {
                Fate::FailFirst => format!("first failed {i}"),
                Fate::PanicFirst => format!("panicked: first panicked {i}"),
                Fate::FailSecond => format!("second failed {i}"),
                _ => format!("panicked: second panicked {i}"),
            };
            prop_assert_eq!(&d.error, &expected_error);
        }
    }
}

#[test]
fn ordered_stages_keep_the_input_order() {
    within(|| {
        smol::block_on(async {
            let mut out = Vec::new();
            Pipeline::from_stream(futures_lite::stream::iter(0..300u32))
                .map(
                    Stage::new("jitter").with_concurrency(8).with_ordered(true),
                    |x| async move {
                        for _ in 0..(x * 7919 % 13) {
                            futures_lite::future::yield_now().await;
                        }
                        Ok::<_, String>(x)
                    },
                )
                .flat_map("twice", |x| [x, x])
                .run(|x| {
                    out.push(x);
                    async { Ok::<_, String>(()) }
                })
                .await
                .unwrap();
            let expected: Vec<u32> = (0..300).flat_map(|x| [x, x]).collect();
            assert_eq!(out, expected);
        });
    });
}

#[test]
fn a_stalled_sink_stops_the_source_within_the_channel_capacities() {
    within(|| {
        let pulled = Arc::new(AtomicUsize::new(0));
        let p = pulled.clone();
        let source = futures_lite::stream::iter(0..100_000u32).inspect(move |_| {
            p.fetch_add(1, Ordering::SeqCst);
        });
        let pipeline = Pipeline::from_stream(source)
            .with_capacity(4)
            .map(Stage::new("work").with_concurrency(2), |x| async move {
                Ok::<_, String>(x)
            });
        let control = pipeline.control();
        let gate = async_channel::bounded::<()>(1);
        let run = std::thread::spawn(move || {
            smol::block_on(pipeline.run(|_x| {
                let gate = gate.1.clone();
                async move {
                    // Never released: the sink stalls on its first item.
                    let _ = gate.recv().await;
                    Ok::<_, String>(())
                }
            }))
        });
        // Wait until every buffer is full: the source channel (4), the two
        // workers blocked sending what they took (each took at least one
        // and at most the channel's 4), the work stage's output channel
        // (4), and the sink holding the first item. Stage counters: `work`
        // received 4 + 1 + the workers' 2 to 8.
        eventually("the pipeline to fill", || {
            let stats = control.stats();
            stats.len() == 2
                && stats[0].queued == 4
                && stats[0].received >= 7
                && stats[1].queued == 4
                && stats[1].in_flight == 1
        });
        let n = pulled.load(Ordering::SeqCst) as u64;
        // Read after `n`: it only grows, so the bounds below hold whenever
        // the last worker settles.
        let received = control.stats()[0].received;
        assert!(
            received <= 13,
            "workers took more than they hold: {received}"
        );
        // The work stage's share, 4 queued for it, and at most one
        // channel's worth (4) the source holds, blocked on send.
        assert!(n <= received + 8, "source ran ahead: {n} items pulled");
        assert!(n >= 11, "pipeline did not fill: {n}");
        control.cancel();
        let report = run.join().unwrap().unwrap();
        assert!(report.cancelled);
        assert_eq!(report.watermark, 0, "nothing reached the sink");
        assert_eq!(report.outputs, 0);
    });
}

#[test]
fn shutdown_drains_what_was_read() {
    within(|| {
        let (tx, rx) = async_channel::unbounded::<u32>();
        for i in 0..50 {
            tx.try_send(i).unwrap();
        }
        let pipeline = Pipeline::from_stream(rx)
            .map(Stage::new("m").with_concurrency(3), |x| async move {
                Ok::<_, String>(x)
            });
        let control = pipeline.control();
        let seen = Arc::new(AtomicUsize::new(0));
        let s = seen.clone();
        let report = smol::block_on(pipeline.run(move |_x| {
            // The source never ends; stop after the 10th output.
            if s.fetch_add(1, Ordering::SeqCst) == 9 {
                control.shutdown();
            }
            async { Ok::<_, String>(()) }
        }))
        .unwrap();
        assert!(!report.cancelled);
        assert!(report.inputs >= 10);
        assert_eq!(report.outputs, report.inputs, "everything read was drained");
        assert_eq!(report.watermark, report.inputs);
        drop(tx);
    });
}

#[test]
fn a_stage_policy_retries_before_dead_lettering() {
    within(|| {
        let calls: Arc<Mutex<HashMap<u32, u32>>> = Arc::default();
        let c = calls.clone();
        let policy = Policy::builder()
            .with_retry(
                Retry::new()
                    .with_max_attempts(3)
                    .with_backoff(Backoff::constant(Duration::from_millis(1))),
            )
            .build();
        let mut out = Vec::new();
        let report = smol::block_on(
            Pipeline::from_stream(futures_lite::stream::iter(0..4u32))
                .map(Stage::new("flaky").with_policy(policy), move |x| {
                    let n = {
                        let mut calls = c.lock().unwrap();
                        let n = calls.entry(x).or_default();
                        *n += 1;
                        *n
                    };
                    async move {
                        // Item 3 always fails; the others succeed on the second try.
                        if x == 3 || n < 2 {
                            Err(format!("try {n}"))
                        } else {
                            Ok(x)
                        }
                    }
                })
                .run(|x| {
                    out.push(x);
                    async { Ok::<_, String>(()) }
                }),
        )
        .unwrap();
        out.sort();
        assert_eq!(out, vec![0, 1, 2]);
        assert_eq!(report.dead.len(), 1);
        let d = &report.dead[0];
        assert_eq!(
            (d.stage.as_str(), d.attempts, d.positions.as_slice()),
            ("flaky", 3, &[3u64][..])
        );
        assert!(d.error.contains("try 3"), "{}", d.error);
        assert_eq!(calls.lock().unwrap()[&3], 3);
    });
}

#[test]
fn dead_letters_go_to_a_json_lines_file_and_can_be_downcast_from_a_channel() {
    within(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dead.jsonl");
        let report = smol::block_on(
            Pipeline::from_stream(futures_lite::stream::iter(vec!["1", "x", "3", "y"]))
                .map("parse", |s: &'static str| async move {
                    s.parse::<u32>().map_err(|e| format!("{s:?}: {e}"))
                })
                .with_dead_letters(Arc::new(JsonLinesFile::open(&path).unwrap()))
                .run(|_n| async { Ok::<_, String>(()) }),
        )
        .unwrap();
        assert_eq!((report.outputs, report.dead_letters), (2, 2));
        assert!(report.dead.is_empty(), "a sink was given");
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        let mut items: Vec<&str> = lines.iter().map(|l| l["item"].as_str().unwrap()).collect();
        items.sort();
        assert_eq!(items, vec!["x", "y"]);
        assert!(
            lines
                .iter()
                .all(|l| l["stage"] == "parse" && l["attempts"] == 1)
        );
        assert!(
            lines[0]["error"]
                .as_str()
                .unwrap()
                .contains("invalid digit")
        );

        // A channel sink hands over the typed item too.
        let (tx, rx) = async_channel::unbounded();
        smol::block_on(
            Pipeline::from_stream(futures_lite::stream::iter(vec![(1u8, 'a')]))
                .map("reject", |p: (u8, char)| async move {
                    Err::<(), _>(format!("no {}", p.1))
                })
                .with_dead_letters(Arc::new(tx))
                .run(|_| async { Ok::<_, String>(()) }),
        )
        .unwrap();
        let mut letter = rx.try_recv().unwrap();
        assert_eq!(letter.downcast::<(u8, char)>(), Some((1, 'a')));
        assert_eq!(letter.item, serde_json::json!([1, "a"]));
    });
}

#[test]
fn a_failed_dead_letter_store_stops_the_pipeline_before_the_item() {
    within(|| {
        let (tx, rx) = async_channel::unbounded();
        drop(rx);
        let store = Arc::new(MemoryCheckpoint::new());
        let result = smol::block_on(
            Pipeline::from_stream(futures_lite::stream::iter(0..100u32))
                .map("m", |x| async move {
                    if x == 20 { Err("twenty") } else { Ok(x) }
                })
                .with_dead_letters(Arc::new(tx))
                .with_checkpoint(store.clone())
                .with_checkpoint_interval(Duration::ZERO)
                .run(|_| async { Ok::<_, String>(()) }),
        );
        assert!(
            matches!(result, Err(PipelineError::DeadLetters(_))),
            "{result:?}"
        );
        let wm = store.get().unwrap_or(0);
        assert!(wm <= 20, "watermark {wm} passed the lost item");
    });
}

#[test]
fn a_queue_source_acks_what_is_done_and_nacks_what_a_cancel_cut_short() {
    within(|| {
        smol::block_on(async {
            let q = Arc::new(MemoryQueue::new().with_capacity(100));
            common::queue_contract::feeds_a_pipeline(q.clone()).await;
            let s = q.stats();
            assert_eq!((s.acked, s.leased, s.ready), (40, 0, 0));

            // Cancel with items in flight: they go back to the queue.
            let q = Arc::new(MemoryQueue::new());
            for i in 0..10u32 {
                q.push(i).await.unwrap();
            }
            let pipeline = Pipeline::from_queue(q.clone());
            let control = pipeline.control();
            let report = pipeline
                .run(|x| {
                    if x == 3 {
                        control.cancel();
                    }
                    async { Ok::<_, String>(()) }
                })
                .await
                .unwrap();
            assert!(report.cancelled);
            let s = q.stats();
            assert_eq!(s.leased, 0, "nothing left leased");
            assert_eq!(
                s.acked as usize + s.ready,
                10,
                "every item acked or back in the queue"
            );
            assert!(s.acked >= 3);
        });
    });
}

// ---------------------------------------------------------------------------
// Crash and resume

const CRASH_ITEMS: u64 = 3_000;

/// The pipeline the crash test runs: numbers through a map into a file of
/// lines, checkpointed in the same folder. `slow` makes each item take a
/// millisecond so the parent can kill it mid-run.
fn crash_pipeline(dir: &Path, slow: bool) -> smolkit::pool::PipelineReport {
    let out = dir.join("out.txt");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out)
        .unwrap();
    smol::block_on(
        Pipeline::from_stream(futures_lite::stream::iter(0..CRASH_ITEMS))
            .map(
                Stage::new("work").with_concurrency(4),
                move |x| async move {
                    if slow {
                        smol::Timer::after(Duration::from_millis(1)).await;
                    }
                    Ok::<_, String>(x)
                },
            )
            .with_checkpoint(Arc::new(FileCheckpoint::new(dir.join("checkpoint.json"))))
            .with_checkpoint_interval(Duration::from_millis(5))
            .run(move |x| {
                // NOTE: one write per line: `writeln!` may split a line over
                // two writes, and a kill between them leaves a torn line
                // that the restart's first line would join.
                let written = file
                    .write_all(format!("{x}\n").as_bytes())
                    .and_then(|()| file.flush());
                async move { written }
            }),
    )
    .unwrap()
}

/// Not a test on its own: the child process of the crash test.
#[test]
fn crash_child() {
    if let Ok(dir) = std::env::var("SMOLKIT_CRASH_DIR") {
        crash_pipeline(&PathBuf::from(dir), true);
    }
}

#[test]
fn a_killed_pipeline_resumes_after_its_watermark_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileCheckpoint::new(dir.path().join("checkpoint.json"));
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env("SMOLKIT_CRASH_DIR", dir.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let watermark = loop {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "child made no progress"
        );
        if let Ok(Some(w)) = smol::block_on(store.load())
            && w >= 300
        {
            break w;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "child ended before it was killed"
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    // What the restart will read (the child may have saved more after the
    // value above, up to the kill).
    let saved = smol::block_on(store.load()).unwrap().unwrap();
    assert!(
        saved >= watermark && saved < CRASH_ITEMS,
        "killed mid-run at {saved}"
    );

    let report = crash_pipeline(dir.path(), false);
    assert_eq!(report.resumed_from, saved);
    assert_eq!(report.inputs, CRASH_ITEMS - saved);
    assert_eq!(report.watermark, CRASH_ITEMS);

    let mut counts: BTreeMap<u64, u32> = BTreeMap::new();
    for line in std::fs::read_to_string(dir.path().join("out.txt"))
        .unwrap()
        .lines()
    {
        *counts.entry(line.parse().unwrap()).or_default() += 1;
    }
    for i in 0..CRASH_ITEMS {
        let n = counts.get(&i).copied().unwrap_or(0);
        assert!(n >= 1, "item {i} lost");
        if i < saved {
            assert_eq!(n, 1, "item {i} below the watermark {saved} delivered twice");
        }
    }
    assert_eq!(counts.len() as u64, CRASH_ITEMS);
}

/// Issue 14 #1: `batch(.., 0, ..)` lost every item and reported success
/// (the size assert fired inside the spawned stage task). Every refused
/// setting is now a `PipelineError::Config` before anything runs.
#[test]
fn refused_pipeline_settings_fail_before_anything_runs() {
    within(|| {
        smol::block_on(async {
            let pulled = Arc::new(AtomicUsize::new(0));
            let source = {
                let pulled = pulled.clone();
                futures_lite::stream::iter(0..100u32).map(move |x| {
                    pulled.fetch_add(1, Ordering::Relaxed);
                    x
                })
            };
            let err = Pipeline::from_stream(source)
                .batch("x", 0, Duration::from_millis(10))
                .run(|_batch: Vec<u32>| async { Ok::<_, String>(()) })
                .await
                .unwrap_err();
            match err {
                PipelineError::Config(e) => {
                    assert_eq!((e.setting, e.value.as_str()), ("batch size", "0"))
                }
                other => panic!("expected a config error, got {other:?}"),
            }
            assert_eq!(pulled.load(Ordering::Relaxed), 0, "nothing may run");

            let cases: Vec<(&str, Pipeline<u32, u32>)> = vec![
                (
                    "stage concurrency",
                    Pipeline::from_stream(futures_lite::stream::iter(0..3u32))
                        .map(Stage::new("m").with_concurrency(0), |x| async move {
                            Ok::<_, String>(x)
                        }),
                ),
                (
                    "stage capacity",
                    Pipeline::from_stream(futures_lite::stream::iter(0..3u32))
                        .filter(Stage::new("f").with_capacity(0), |_| true),
                ),
                (
                    "capacity",
                    Pipeline::from_stream(futures_lite::stream::iter(0..3u32)).with_capacity(0),
                ),
                (
                    "window",
                    Pipeline::from_stream(futures_lite::stream::iter(0..3u32)).with_window(0),
                ),
            ];
            for (setting, pipeline) in cases {
                match pipeline.run(|_| async { Ok::<_, String>(()) }).await {
                    Err(PipelineError::Config(e)) => assert_eq!(e.setting, setting),
                    other => panic!("{setting}: expected a config error, got {other:?}"),
                }
            }
        })
    });
}

/// Issue 14 #6: an autoscaling pool with a minimum of 0, once idle down to
/// no worker, never ran a job again (a worker was added only past the
/// scale-up depth). And `resize` stays within the autoscale bounds.
/// Issue 14 #14: a stage scales its workers between a minimum and a
/// maximum from its input queue, on the pipeline's clock.
#[test]
fn an_autoscaled_stage_grows_with_its_queue_and_shrinks_when_idle() {
    within(|| {
        let clock = ManualClock::new();
        let (open_tx, open_rx) = async_channel::unbounded::<()>();
        let pipeline = Pipeline::from_stream(futures_lite::stream::iter(0..40u32))
            .with_clock(Arc::new(clock.clone()))
            .with_capacity(8)
            .map(
                Stage::new("slow")
                    .with_autoscale(1, 4)
                    .with_scale_up_at(1)
                    .with_idle_timeout(Duration::from_secs(10)),
                move |x: u32| {
                    let open = open_rx.clone();
                    async move {
                        let _ = open.recv().await;
                        Ok::<_, String>(x)
                    }
                },
            );
        let control = pipeline.control();
        let workers = |control: &smolkit::pool::PipelineControl| {
            control
                .stats()
                .iter()
                .find(|s| s.name == "slow")
                .map_or(0, |s| s.workers)
        };
        let run = std::thread::spawn(move || {
            smol::block_on(pipeline.run(|_| async { Ok::<_, String>(()) }))
        });
        eventually("scaled up to the maximum", || workers(&control) == 4);
        // Let all but the last four through.
        for _ in 0..36 {
            open_tx.send_blocking(()).unwrap();
        }
        eventually("the input drained", || {
            control
                .stats()
                .iter()
                .any(|s| s.name == "slow" && s.queued == 0 && s.received == 40)
        });
        // The four workers hold the last items; idle ones would leave.
        for _ in 0..4 {
            open_tx.send_blocking(()).unwrap();
        }
        let report = run.join().unwrap().unwrap();
        assert_eq!((report.inputs, report.outputs), (40, 40));
        assert_eq!(clock.elapsed(), Duration::ZERO);
    });
}

#[test]
fn idle_autoscaled_workers_leave_down_to_the_minimum() {
    within(|| {
        let clock = ManualClock::new();
        let (tx, rx) = async_channel::bounded::<u32>(64);
        let pipeline = Pipeline::from_stream(rx)
            .with_clock(Arc::new(clock.clone()))
            .map(
                Stage::new("s")
                    .with_autoscale(2, 4)
                    .with_scale_up_at(0)
                    .with_idle_timeout(Duration::from_secs(10)),
                |x: u32| async move { Ok::<_, String>(x) },
            );
        let control = pipeline.control();
        let workers = move || {
            control
                .stats()
                .iter()
                .find(|s| s.name == "s")
                .map_or(0, |s| s.workers)
        };
        let run = std::thread::spawn(move || {
            smol::block_on(pipeline.run(|_| async { Ok::<_, String>(()) }))
        });
        eventually("the minimum", || workers() == 2);
        smol::block_on(clock.wait_for_sleepers(2));
        clock.advance(Duration::from_secs(11));
        // Both timers fire; neither may leave (at the minimum): they re-arm.
        smol::block_on(clock.wait_for_sleepers(2));
        assert_eq!(workers(), 2);
        for i in 0..10 {
            tx.send_blocking(i).unwrap();
        }
        drop(tx);
        let report = run.join().unwrap().unwrap();
        assert_eq!(report.outputs, 10);
        // Invalid autoscale settings are refused before anything runs.
        let bad = [
            Stage::new("a").with_autoscale(0, 3),
            Stage::new("b").with_autoscale(3, 2),
            Stage::new("c")
                .with_autoscale(1, 2)
                .with_concurrency(2)
                .with_ordered(true),
        ];
        for stage in bad {
            let r = smol::block_on(
                Pipeline::from_stream(futures_lite::stream::iter(0..3u32))
                    .map(stage, |x| async move { Ok::<_, String>(x) })
                    .run(|_| async { Ok::<_, String>(()) }),
            );
            assert!(matches!(r, Err(PipelineError::Config(_))), "{r:?}");
        }
    });
}

/// A pipeline stage's own code panicking at any point — a `map` function
/// in the call that makes its future, a `filter` predicate, a `flat_map`
/// function — makes that item a dead letter of that stage; everything else
/// goes through, and the counts add up.
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
