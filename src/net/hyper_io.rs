//! hyper's I/O and timer traits over `futures_io` sockets and `async-io`
//! timers, without `unsafe`.
//!
//! This replaces `smol-hyper`'s adapter, which zeroes the whole free part
//! of hyper's read buffer on every read (hyper's buffer grows to hundreds
//! of KiB on big bodies, so a 16 KiB read paid a 400 KiB `memset`) and
//! does not forward `is_write_vectored` (so hyper flattened every body
//! chunk into its own buffer before writing). Here a read goes into a
//! scratch buffer owned by the connection, sized to what hyper asks for
//! (at most [`SCRATCH`]), and is copied out with `put_slice`: one copy of
//! the bytes read, no zeroing; writes say they are vectored when the
//! socket is.

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
    scratch: Vec<u8>,
    vectored: bool,
}

impl<T> HyperIo<T> {
    /// `vectored`: whether `inner`'s `poll_write_vectored` writes several
    /// buffers at once (a TCP stream does; a default implementation writes
    /// only the first).
    pub(crate) fn new(inner: T, vectored: bool) -> Self {
        HyperIo {
            inner,
            scratch: Vec::new(),
            vectored,
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
        if this.scratch.len() < want {
            // Grows to the largest read asked for, once per connection.
            this.scratch.resize(want, 0);
        }
        let n = ready!(Pin::new(&mut this.inner).poll_read(cx, &mut this.scratch[..want]))?;
        buf.put_slice(&this.scratch[..n]);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> hyper::rt::Write for HyperIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
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
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
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
        assert!(io.scratch.len() <= SCRATCH);
        assert!(!io.is_write_vectored());
        assert!(HyperIo::new(futures_lite::io::Cursor::new(Vec::new()), true).is_write_vectored());
    }
}
