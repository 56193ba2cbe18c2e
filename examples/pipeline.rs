//! The seeds' "data pipeline" scenario (article 000, §3): producer →
//! bounded queue → workers → output, with backpressure, a dead-letter
//! queue for items that fail, and checkpoints for recovery after a crash.
//!
//! Records (`id,amount` lines, some malformed) go through: parse → enrich
//! (a flaky lookup, retried) → score (CPU work, offloaded) → batches of
//! 25 → a sink. Malformed records become dead letters in a JSON-lines
//! file. The first run is cut short (as if the process died); the second
//! run resumes from the checkpoint's watermark and finishes. The summary
//! shows that every record ended up delivered or dead-lettered.
//!
//! Run: `cargo run --release --example pipeline [records]`

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use smolkit::pool::{FileCheckpoint, JsonLinesFile, Pipeline, PipelineReport, Stage};
use smolkit::resilience::{Backoff, Policy, Retry};

#[derive(Debug, Clone, Serialize)]
struct Record {
    id: u64,
    amount: u64,
}

fn source(n: u64) -> impl futures_lite::Stream<Item = String> + Send + 'static {
    futures_lite::stream::iter((0..n).map(|i| {
        if i % 37 == 5 {
            format!("{i},not-a-number")
        } else {
            format!("{i},{}", i * 3 % 1000)
        }
    }))
}

fn parse(line: &str) -> Result<Record, String> {
    let (id, amount) = line.split_once(',').ok_or("no comma")?;
    Ok(Record {
        id: id.parse().map_err(|e| format!("id {id:?}: {e}"))?,
        amount: amount
            .parse()
            .map_err(|e| format!("amount {amount:?}: {e}"))?,
    })
}

fn run(
    records: u64,
    dir: &std::path::Path,
    stop_after: Option<u64>,
    delivered: Arc<Mutex<Vec<u64>>>,
) -> PipelineReport {
    let lookups = Arc::new(AtomicU64::new(0));
    let retry = Policy::builder()
        .with_retry(
            Retry::new()
                .with_max_attempts(4)
                .with_backoff(Backoff::exponential(Duration::from_millis(1))),
        )
        .build();
    let pipeline = Pipeline::from_stream(source(records))
        .with_capacity(32)
        .with_checkpoint(Arc::new(FileCheckpoint::new(dir.join("checkpoint.json"))))
        .with_checkpoint_interval(Duration::from_millis(10))
        .with_dead_letters(Arc::new(
            JsonLinesFile::open(dir.join("dead.jsonl")).unwrap(),
        ))
        .map("parse", |line: String| async move { parse(&line) })
        .map(
            Stage::new("enrich").with_concurrency(8).with_policy(retry),
            move |r: Record| {
                let n = lookups.fetch_add(1, Ordering::Relaxed);
                async move {
                    smol::Timer::after(Duration::from_millis(2)).await;
                    // Every 10th lookup fails once; the retry absorbs it.
                    if n % 10 == 9 {
                        return Err("lookup timed out".to_owned());
                    }
                    Ok(r)
                }
            },
        )
        .cpu_map(Stage::new("score").with_concurrency(2), |r: Record| {
            let score =
                (0..10_000u64).fold(r.amount, |acc, i| acc.wrapping_mul(31).wrapping_add(i));
            Ok::<_, String>((r.id, score % 100))
        })
        .batch("batch", 25, Duration::from_millis(50));
    let control = pipeline.control();
    smol::block_on(pipeline.run(move |batch: Vec<(u64, u64)>| {
        let mut d = delivered.lock().unwrap();
        d.extend(batch.iter().map(|(id, _)| *id));
        if stop_after.is_some_and(|n| d.len() as u64 >= n) {
            // Simulates the process dying: stop at once, mid-flight.
            control.cancel();
        }
        async { Ok::<_, String>(()) }
    }))
    .expect("pipeline ran")
}

fn show(name: &str, r: &PipelineReport) {
    println!(
        "{name}: resumed from {}, read {}, delivered {} items in batches, {} dead letters, watermark {}{}",
        r.resumed_from,
        r.inputs,
        r.stages
            .iter()
            .find(|s| s.name == "batch")
            .map_or(0, |s| s.received),
        r.dead_letters,
        r.watermark,
        if r.cancelled { " (cut short)" } else { "" }
    );
    for s in &r.stages {
        println!(
            "    {:<7} received {:>5}  emitted {:>5}  dead {:>3}",
            s.name, s.received, s.emitted, s.dead_letters
        );
    }
}

fn main() {
    let records: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000);
    let dir = std::env::temp_dir().join(format!("smolkit-pipeline-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let delivered = Arc::new(Mutex::new(Vec::new()));

    let first = run(records, &dir, Some(records / 3), delivered.clone());
    show("run 1", &first);
    let second = run(records, &dir, None, delivered.clone());
    show("run 2", &second);

    let delivered = delivered.lock().unwrap();
    let unique: HashSet<u64> = delivered.iter().copied().collect();
    let dead = std::fs::read_to_string(dir.join("dead.jsonl")).unwrap();
    let dead_ids: HashSet<u64> = dead
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["positions"][0]
                .as_u64()
                .unwrap()
        })
        .collect();
    println!();
    println!("records                 {records}");
    println!("delivered (unique)      {}", unique.len());
    println!(
        "delivered twice         {} (past the watermark of the cut-short run)",
        delivered.len() - unique.len()
    );
    println!(
        "dead letters (unique)   {}  → {}",
        dead_ids.len(),
        dir.join("dead.jsonl").display()
    );
    println!(
        "first dead letter       {}",
        dead.lines().next().unwrap_or("-")
    );
    let accounted = unique.len() + dead_ids.len();
    println!("accounted for           {accounted} of {records}");
    assert_eq!(
        accounted as u64, records,
        "every record delivered or dead-lettered"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
