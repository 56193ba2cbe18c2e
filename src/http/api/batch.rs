//! Ordered bounded concurrency on the caller's task, for `batch`.

use super::*;

/// Runs the futures at most `n` at a time and returns their outputs in
/// input order, on the caller's task (nothing is spawned).
pub(super) async fn ordered_concurrent<I, F>(futures: I, n: usize) -> Vec<F::Output>
where
    I: Iterator<Item = F>,
    F: Future,
{
    let mut pending = futures.enumerate();
    let mut running: Vec<(usize, Pin<Box<F>>)> = Vec::new();
    let mut done: Vec<(usize, F::Output)> = Vec::new();
    let mut exhausted = false;
    std::future::poll_fn(|cx| {
        loop {
            while !exhausted && running.len() < n {
                match pending.next() {
                    Some((i, f)) => running.push((i, Box::pin(f))),
                    None => exhausted = true,
                }
            }
            let before = running.len();
            let mut i = 0;
            while i < running.len() {
                if let Poll::Ready(out) = running[i].1.as_mut().poll(cx) {
                    let (index, _) = running.swap_remove(i);
                    done.push((index, out));
                } else {
                    i += 1;
                }
            }
            if running.is_empty() && exhausted {
                return Poll::Ready(());
            }
            // Something finished: refill and poll the new ones.
            if running.len() == before {
                return Poll::Pending;
            }
        }
    })
    .await;
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, out)| out).collect()
}
