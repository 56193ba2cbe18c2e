//! The 3-stage pipeline (map ×2 workers → filter → map, channels of
//! 256) that `benches/pool.rs` times and `benches/pipe_count.rs` counts.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use smolkit::pool::{Pipeline, Stage};
use smolkit::runtime::Spawn;

/// `items` numbers through the pipeline on `spawner`; resolves to how many
/// reached the sink (half of them).
pub fn three_stages(spawner: Arc<dyn Spawn>, items: u64) -> impl Future<Output = u64> + Send {
    let out = Arc::new(AtomicU64::new(0));
    let o = out.clone();
    async move {
        Pipeline::from_stream(futures_lite::stream::iter(0..items))
            .with_spawner(spawner)
            .with_capacity(256)
            .map(
                Stage::new("double").with_concurrency(2),
                |x: u64| async move { Ok::<_, String>(x * 2) },
            )
            .filter("even", |x: &u64| x.is_multiple_of(4))
            .map("inc", |x: u64| async move { Ok::<_, String>(x + 1) })
            .run(move |_| {
                o.fetch_add(1, Ordering::Relaxed);
                async { Ok::<_, String>(()) }
            })
            .await
            .unwrap();
        out.load(Ordering::Relaxed)
    }
}
