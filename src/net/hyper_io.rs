//! hyper's I/O and timer traits over `futures_io` sockets and `async-io`
//! timers, without `unsafe`.
//!
//! This replaces `smol-hyper`'s adapter, which zeroes the whole free part
//! of hyper's read buffer on every read (hyper's buffer grows to hundreds
//! of KiB on big bodies, so a 16 KiB read paid a 400 KiB `memset`) and
//! does not forward `is_write_vectored` (so hyper flattened every body
//! chunk into its own buffer before writing). Here a read goes into a
//! scratch buffer shared by the thread's connections, sized to what hyper
//! asks for (at most [`SCRATCH`]), and is copied out with `put_slice`: one
//! copy of the bytes read, no zeroing; writes say they are vectored when
//! the socket is.
//!
//! It also mends a lost wake-up in hyper 1.12's h1 dispatcher (see
//! [`HyperIo`]'s `write_blocked`).

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures_lite::{AsyncRead, AsyncWrite};
use hyper::rt::ReadBufCursor;

#[cfg(feature = "testing")]
pub(crate) use timer::AsyncIoTimer;

/// The largest single read (and the scratch buffer's largest size).
pub(crate) const SCRATCH: usize = 64 * 1024;

/// A `futures_io` socket as hyper's `Read + Write`.
#[derive(Debug)]
pub(crate) struct HyperIo<T> {
    inner: T,
    vectored: bool,
    /// A write returned `Pending` since the last completed flush.
    ///
    /// hyper 1.12's `poll_loop` (the write re-check of hyper#4143) can
    /// flush its whole buffer right after a write that would block and
    /// then yield with the body still ready. With smol's sockets the
    /// successful write drops the writable registration the blocked one
    /// made, so nothing wakes the connection again: a big body stops
    /// mid-body, both sockets empty (the soak's stall). So a flush that
    /// completes after a blocked write wakes the task itself: at most one
    /// extra poll per episode of back-pressure.
    write_blocked: bool,
}

impl<T> HyperIo<T> {
    /// `vectored`: whether `inner`'s `poll_write_vectored` writes several
    /// buffers at once (a TCP stream does; a default implementation writes
    /// only the first).
    pub(crate) fn new(inner: T, vectored: bool) -> Self {
        HyperIo {
            inner,
            vectored,
            write_blocked: false,
        }
    }

    #[cfg(feature = "testing")]
    pub(crate) fn into_inner(self) -> T {
        self.inner
    }
}

impl<T: AsyncRead + Unpin> hyper::rt::Read for HyperIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let want = buf.remaining().min(SCRATCH);
        READ_SCRATCH.with(|cell| match cell.try_borrow_mut() {
            Ok(mut scratch) => read_through(&mut this.inner, cx, &mut scratch, want, &mut buf),
            // NOTE: only if a socket's read polled another `HyperIo` on
            // this thread; it gets a buffer of its own.
            Err(_) => read_through(&mut this.inner, cx, &mut Vec::new(), want, &mut buf),
        })
    }
}

thread_local! {
    /// The scratch buffer reads go through, one per thread: it holds bytes
    /// only during one read (they are copied out at once), so connections
    /// can share it. One per connection cost each new connection an
    /// allocation and an 8 KiB `memset` for its first read (callgrind: 12%
    /// of the client's instructions with a new connection per request), and
    /// up to [`SCRATCH`] of memory per idle pooled connection.
    static READ_SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Reads at most `want` bytes from `inner` into `buf` through `scratch`
/// (grown, zeroed once, to the largest read asked for).
fn read_through<T: AsyncRead + Unpin>(
    inner: &mut T,
    cx: &mut Context<'_>,
    scratch: &mut Vec<u8>,
    want: usize,
    buf: &mut ReadBufCursor<'_>,
) -> Poll<io::Result<()>> {
    if scratch.len() < want {
        scratch.resize(want, 0);
    }
    let n = ready!(Pin::new(inner).poll_read(cx, &mut scratch[..want]))?;
    buf.put_slice(&scratch[..n]);
    Poll::Ready(Ok(()))
}

impl<T: AsyncWrite + Unpin> hyper::rt::Write for HyperIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.write_blocked |= polled.is_pending();
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(Pin::new(&mut this.inner).poll_flush(cx))?;
        if std::mem::take(&mut this.write_blocked) {
            cx.waker().wake_by_ref();
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.vectored
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.write_blocked |= polled.is_pending();
        polled
    }
}

/// hyper's timer on `async-io`, for the ChaosServer's server side.
#[cfg(feature = "testing")]
mod timer {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use std::time::{Duration, Instant};

    use hyper::rt::{Sleep, Timer};

    /// hyper's timer on `async-io` (the server's header-read timeout).
    #[derive(Debug, Clone, Copy, Default)]
    pub(crate) struct AsyncIoTimer;

    struct TimerSleep(async_io::Timer);

    impl Future for TimerSleep {
        type Output = ();

        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            Pin::new(&mut self.0).poll(cx).map(|_| ())
        }
    }

    impl Sleep for TimerSleep {}

    impl Timer for AsyncIoTimer {
        fn sleep(&self, duration: Duration) -> Pin<Box<dyn Sleep>> {
            Box::pin(TimerSleep(async_io::Timer::after(duration)))
        }

        fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn Sleep>> {
            Box::pin(TimerSleep(async_io::Timer::at(deadline)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::{Read, Write};

    /// Reads never ask the socket for more than hyper's free space, and
    /// hand over exactly the bytes read.
    #[test]
    fn reads_are_bounded_by_the_free_space_and_copied_whole() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut io = HyperIo::new(futures_lite::io::Cursor::new(data.clone()), false);
        let mut out = Vec::new();
        futures_lite::future::block_on(async {
            loop {
                let mut storage = vec![std::mem::MaybeUninit::<u8>::uninit(); 70_000];
                let mut rb = hyper::rt::ReadBuf::uninit(&mut storage);
                std::future::poll_fn(|cx| Pin::new(&mut io).poll_read(cx, rb.unfilled()))
                    .await
                    .unwrap();
                let filled = rb.filled();
                assert!(filled.len() <= SCRATCH);
                if filled.is_empty() {
                    break;
                }
                out.extend_from_slice(filled);
            }
        });
        assert_eq!(out, data);
        // The thread's shared scratch grew no further than one read.
        assert!(READ_SCRATCH.with(|s| s.borrow().len()) <= SCRATCH);
        assert!(!io.is_write_vectored());
        assert!(HyperIo::new(futures_lite::io::Cursor::new(Vec::new()), true).is_write_vectored());
    }

    /// A socket whose read itself reads through another `HyperIo` on the
    /// same thread (a proxy of sorts): the shared scratch is taken, and the
    /// inner read gets a buffer of its own instead of a panic.
    #[test]
    fn a_read_nested_in_a_read_uses_its_own_buffer() {
        struct Nested(HyperIo<futures_lite::io::Cursor<Vec<u8>>>);
        impl futures_lite::AsyncRead for Nested {
            fn poll_read(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut [u8],
            ) -> Poll<io::Result<usize>> {
                let mut storage = vec![std::mem::MaybeUninit::<u8>::uninit(); buf.len()];
                let mut rb = hyper::rt::ReadBuf::uninit(&mut storage);
                ready!(Pin::new(&mut self.0).poll_read(cx, rb.unfilled()))?;
                let n = rb.filled().len();
                buf[..n].copy_from_slice(rb.filled());
                Poll::Ready(Ok(n))
            }
        }
        let data = b"nested bytes".to_vec();
        let inner = HyperIo::new(futures_lite::io::Cursor::new(data.clone()), false);
        let mut io = HyperIo::new(Nested(inner), false);
        let mut storage = vec![std::mem::MaybeUninit::<u8>::uninit(); 64];
        let mut rb = hyper::rt::ReadBuf::uninit(&mut storage);
        futures_lite::future::block_on(std::future::poll_fn(|cx| {
            Pin::new(&mut io).poll_read(cx, rb.unfilled())
        }))
        .unwrap();
        assert_eq!(rb.filled(), &data[..]);
    }

    /// A socket with async-net's readiness semantics: a write that would
    /// block stores the task's waker (the reactor wakes it when the socket
    /// turns writable), and a write that then succeeds drops that
    /// registration. Writes alternate between would-block and taking
    /// everything; reads hand over one request and then wait forever.
    struct ScriptedSocket {
        request: Option<Vec<u8>>,
        wire: std::sync::Arc<std::sync::Mutex<Wire>>,
    }

    #[derive(Default)]
    struct Wire {
        writes: usize,
        written: usize,
        write_waker: Option<std::task::Waker>,
    }

    impl futures_lite::AsyncRead for ScriptedSocket {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            match self.request.take() {
                Some(r) => {
                    buf[..r.len()].copy_from_slice(&r);
                    Poll::Ready(Ok(r.len()))
                }
                // No more bytes will ever come.
                None => Poll::Pending,
            }
        }
    }

    impl futures_lite::AsyncWrite for ScriptedSocket {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let mut wire = self.wire.lock().unwrap();
            wire.writes += 1;
            if wire.writes % 2 == 1 {
                wire.write_waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            wire.write_waker = None;
            let n: usize = bufs.iter().map(|b| b.len()).sum();
            wire.written += n;
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[derive(Default)]
    struct Flag(std::sync::atomic::AtomicBool);

    impl std::task::Wake for Flag {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// hyper 1.12's h1 dispatcher (the write re-check of its `poll_loop`,
    /// hyper#4143) can flush its whole buffer right after a write that
    /// would block, and then yield: the successful write dropped the
    /// socket's writable registration, the body is ready, and nothing is
    /// left to wake the connection. It stalled big bodies mid-body (the
    /// soak's big-body stall). The adapter wakes the task itself when a flush
    /// completes after a write that would block.
    #[test]
    fn a_flush_completed_after_a_blocked_write_leaves_a_wake_up() {
        const TOTAL: usize = 4 << 20;
        let chunks = (0..TOTAL / 65536).map(|_| Ok(bytes::Bytes::from(vec![7u8; 65536])));
        let service = hyper::service::service_fn(move |_req| {
            let chunks = chunks.clone();
            async move {
                let body = crate::http::Body::from_stream(
                    futures_lite::stream::iter(chunks),
                    Some(TOTAL as u64),
                );
                Ok::<_, std::convert::Infallible>(hyper::Response::new(body))
            }
        });
        let wire = std::sync::Arc::new(std::sync::Mutex::new(Wire::default()));
        let socket = ScriptedSocket {
            request: Some(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n".to_vec()),
            wire: wire.clone(),
        };
        let mut conn = hyper::server::conn::http1::Builder::new()
            .header_read_timeout(None)
            .serve_connection(HyperIo::new(socket, true), service);
        let flag = std::sync::Arc::new(Flag::default());
        let waker = std::task::Waker::from(flag.clone());
        let mut cx = Context::from_waker(&waker);
        for _ in 0..10_000 {
            let _ = std::future::Future::poll(Pin::new(&mut conn), &mut cx);
            let mut socket = wire.lock().unwrap();
            if socket.written > TOTAL {
                return;
            }
            if flag.0.swap(false, std::sync::atomic::Ordering::SeqCst) {
                continue;
            }
            // The reactor: the socket turned writable.
            match socket.write_waker.take() {
                Some(w) => w.wake(),
                None => panic!(
                    "stalled: pending with no wake-up armed after {} of {TOTAL} bytes",
                    socket.written
                ),
            }
        }
        panic!("not done after 10 000 polls");
    }
}
