//! The seeds' "stream processing" scenario (article 002, §5): an async
//! source consumed in batches of N with the remainder flushed at the end,
//! and a bounded queue between producer and consumer as backpressure,
//! ended by closing the channel.
//!
//! Here a batch also goes out early when its first item has waited
//! 50 ms (a quiet source does not hold items back), and the consumer is
//! paced by a rate limiter.
//!
//! Run: `cargo run --release --example stream_batching`

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use smolkit::limit::{Quota, RateLimiter};
use smolkit::stream::StreamKit;

fn main() {
    smol::block_on(async {
        // At most 10 items in flight between producer and consumer.
        let (tx, rx) = async_channel::bounded::<u32>(10);
        let producer = smol::spawn(async move {
            for i in 0..95u32 {
                tx.send(i).await.expect("consumer alive");
                // A burst of 45, a pause, then the rest.
                if i == 44 {
                    smol::Timer::after(Duration::from_millis(120)).await;
                }
            }
            // Dropping the sender ends the stream: the end-of-stream signal.
        });

        // Process at most 2,000 batches a second, up to 5 at once.
        let limiter = Arc::new(RateLimiter::new(
            Quota::per_second(2_000).unwrap().with_burst(5).unwrap(),
        ));
        let start = Instant::now();
        let mut batches = std::pin::pin!(
            rx.chunks_timeout(10, Duration::from_millis(50))
                .throttle(limiter)
        );
        let (mut n_batches, mut n_items) = (0, 0);
        while let Some(batch) = batches.next().await {
            n_batches += 1;
            n_items += batch.len();
            let why = if batch.len() == 10 {
                "full"
            } else {
                "timeout or end"
            };
            println!(
                "{:>6.1?}  batch {n_batches:>2}: {:>2} items [{}..={}] ({why})",
                start.elapsed(),
                batch.len(),
                batch[0],
                batch[batch.len() - 1]
            );
        }
        producer.await;
        println!();
        println!("items {n_items} in {n_batches} batches; nothing left behind");
        assert_eq!(n_items, 95);
    });
}
