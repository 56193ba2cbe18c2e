//! `Body`: a request or response body that streams.

use std::fmt;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures_lite::{AsyncRead, Stream};
use hyper::body::{Frame, SizeHint};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::error::{BoxError, Error};

type BoxStream = Pin<Box<dyn Stream<Item = Result<Bytes, Error>> + Send + 'static>>;

/// Read size for file and reader bodies.
const CHUNK: usize = 64 * 1024;

/// A request or response body: empty, bytes in memory, or a stream of
/// chunks (a response being received, a file, any `Stream` or `AsyncRead`).
///
/// A body is a [`Stream`] of `Result<Bytes, Error>`; [`into_reader`]
/// gives an [`AsyncRead`] view. [`bytes_limited`], [`text`] and [`json`]
/// read it whole; only `bytes_limited` bounds the memory, so read bodies
/// from servers you do not control with it (or stream them).
///
/// Bodies in memory can be sent again (redirects, retries: see
/// [`try_clone`](Body::try_clone)); streams cannot.
///
/// A response body from [`HyperClient`](super::HyperClient) returns its
/// connection to the pool when read to the end; dropping it earlier closes
/// the connection (the rest of the body is never read).
///
/// [`into_reader`]: Body::into_reader
/// [`bytes_limited`]: Body::bytes_limited
/// [`text`]: Body::text
/// [`json`]: Body::json
pub struct Body {
    kind: Kind,
}

enum Kind {
    Empty,
    Full(Option<Bytes>),
    Stream { stream: BoxStream, len: Option<u64> },
}

impl Body {
    /// An empty body.
    pub fn empty() -> Self {
        Body { kind: Kind::Empty }
    }

    /// A body of these bytes.
    pub fn from_bytes(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        if bytes.is_empty() {
            return Body::empty();
        }
        Body {
            kind: Kind::Full(Some(bytes)),
        }
    }

    /// `value` serialised as JSON (set `Content-Type: application/json` on
    /// the request yourself, or use [`ApiClient`](super::ApiClient) which
    /// does).
    ///
    /// # Errors
    ///
    /// [`Error::Encode`] when serde refuses the value (a map with
    /// non-string keys, a failing `Serialize` impl).
    pub fn from_json<T: Serialize + ?Sized>(value: &T) -> Result<Self, Error> {
        serde_json::to_vec(value)
            .map(Body::from_bytes)
            .map_err(|source| Error::Encode { source })
    }

    /// A stream of chunks. `len`, when known, is sent as Content-Length
    /// and must be exact.
    pub fn from_stream<S>(stream: S, len: Option<u64>) -> Self
    where
        S: Stream<Item = Result<Bytes, Error>> + Send + 'static,
    {
        Body {
            kind: Kind::Stream {
                stream: Box::pin(stream),
                len,
            },
        }
    }

    /// The bytes of a reader, read in 64 KiB chunks as the body is sent.
    pub fn from_reader<R>(reader: R, len: Option<u64>) -> Self
    where
        R: AsyncRead + Send + 'static,
    {
        let reader = Box::pin(reader);
        let stream = futures_lite::stream::unfold(Some((reader, 0u64)), move |state| async move {
            let (mut reader, read) = state?;
            let mut buf = vec![0u8; CHUNK];
            match futures_lite::AsyncReadExt::read(&mut reader, &mut buf).await {
                // NOTE: a reader that ends before its declared length is an
                // error, never a quietly short body (surf's reader does
                // that on a truncated response).
                Ok(0) => match len {
                    Some(len) if read < len => {
                        let e = io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("body ended after {read} of {len} bytes"),
                        );
                        Some((Err(Error::Body { source: e.into() }), None))
                    }
                    _ => None,
                },
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok(Bytes::from(buf)), Some((reader, read + n as u64))))
                }
                Err(e) => Some((Err(Error::Body { source: e.into() }), None)),
            }
        });
        Body::from_stream(stream, len)
    }

    /// The contents of a file, streamed (never read whole into memory),
    /// with its length as Content-Length.
    ///
    /// # Errors
    ///
    /// [`Error::File`] when the file cannot be opened.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future before it completes closes the file; nothing is
    /// read.
    pub async fn from_file(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        let file_err = |source| Error::File {
            path: path.to_path_buf(),
            source,
        };
        let file = smol::fs::File::open(path).await.map_err(file_err)?;
        let len = file.metadata().await.map_err(file_err)?.len();
        Ok(Body::from_reader(file, Some(len)))
    }

    /// The exact length when known (bytes in memory, a file, a response
    /// with Content-Length).
    pub fn len(&self) -> Option<u64> {
        match &self.kind {
            Kind::Empty => Some(0),
            Kind::Full(b) => Some(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Stream { len, .. } => *len,
        }
    }

    /// `true` when the body is known to be empty.
    pub fn is_empty(&self) -> bool {
        self.len() == Some(0)
    }

    /// A copy of a body held in memory; `None` for a stream.
    pub fn try_clone(&self) -> Option<Self> {
        match &self.kind {
            Kind::Empty => Some(Body::empty()),
            Kind::Full(b) => Some(Body {
                kind: Kind::Full(b.clone()),
            }),
            Kind::Stream { .. } => None,
        }
    }

    /// The bytes in memory, without reading (`None` for a stream).
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match &self.kind {
            Kind::Empty => Some(&[]),
            Kind::Full(b) => Some(b.as_deref().unwrap_or(&[])),
            Kind::Stream { .. } => None,
        }
    }

    /// Reads the whole body, however long.
    ///
    /// # Errors
    ///
    /// [`Error::Body`] when the stream fails part way.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future drops the body and what was read of it (a pooled
    /// connection is then closed).
    pub async fn bytes(self) -> Result<Bytes, Error> {
        self.bytes_limited(u64::MAX).await
    }

    /// Reads the whole body, refusing one longer than `limit` bytes (a
    /// declared length over the limit is refused before reading).
    ///
    /// # Errors
    ///
    /// [`Error::BodyTooLarge`] over the limit; [`Error::Body`] when the
    /// stream fails part way.
    ///
    /// # Cancel safety
    ///
    /// As [`bytes`](Body::bytes).
    pub async fn bytes_limited(mut self, limit: u64) -> Result<Bytes, Error> {
        if let Some(len) = self.len()
            && len > limit
        {
            return Err(Error::BodyTooLarge { limit });
        }
        match &mut self.kind {
            Kind::Empty => return Ok(Bytes::new()),
            Kind::Full(b) => return Ok(b.take().unwrap_or_default()),
            Kind::Stream { .. } => {}
        }
        let mut first: Option<Bytes> = None;
        let mut buf: Vec<u8> = Vec::new();
        let mut total: u64 = 0;
        while let Some(chunk) = futures_lite::StreamExt::next(&mut self).await {
            let chunk = chunk?;
            total += chunk.len() as u64;
            if total > limit {
                return Err(Error::BodyTooLarge { limit });
            }
            // NOTE: a body of one chunk is returned without a copy.
            match first.take() {
                None if buf.is_empty() => first = Some(chunk),
                None => buf.extend_from_slice(&chunk),
                Some(f) => {
                    buf.reserve(f.len() + chunk.len());
                    buf.extend_from_slice(&f);
                    buf.extend_from_slice(&chunk);
                }
            }
        }
        Ok(first.unwrap_or_else(|| Bytes::from(buf)))
    }

    /// Reads the whole body as UTF-8 text (invalid sequences replaced).
    ///
    /// # Errors
    ///
    /// As [`bytes`](Body::bytes).
    ///
    /// # Cancel safety
    ///
    /// As [`bytes`](Body::bytes).
    pub async fn text(self) -> Result<String, Error> {
        let bytes = self.bytes().await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Reads the whole body and parses it as JSON.
    ///
    /// # Errors
    ///
    /// [`Error::Json`] with a short excerpt when the body is not a `T`;
    /// as [`bytes`](Body::bytes) otherwise.
    ///
    /// # Cancel safety
    ///
    /// As [`bytes`](Body::bytes).
    pub async fn json<T: DeserializeOwned>(self) -> Result<T, Error> {
        let bytes = self.bytes().await?;
        serde_json::from_slice(&bytes).map_err(|e| Error::json(None, &bytes, e))
    }

    /// An [`AsyncRead`] view of the body.
    pub fn into_reader(self) -> BodyReader {
        BodyReader {
            body: self,
            chunk: Bytes::new(),
        }
    }

    /// A response body from hyper; `conn` (the connection it arrives on,
    /// when the body has one to drive) is moved on at every read and given
    /// back once the last frame has been read.
    pub(crate) fn from_incoming(
        incoming: hyper::body::Incoming,
        conn: Option<Box<dyn BodyConn>>,
    ) -> Self {
        let len = hyper::body::Body::size_hint(&incoming).exact();
        Body::from_stream(IncomingStream { incoming, conn }, len)
    }
}

/// The connection a response body arrives on, held by the body: it has no
/// task of its own, so reading the body is what moves its I/O on.
pub(crate) trait BodyConn: Send {
    /// Moves the connection on (reads what the body is waiting for).
    fn drive(&mut self, cx: &mut Context<'_>);
    /// The body was read to its end: the connection may be reused.
    fn give_back(self: Box<Self>);
}

struct IncomingStream {
    incoming: hyper::body::Incoming,
    conn: Option<Box<dyn BodyConn>>,
}

impl Stream for IncomingStream {
    type Item = Result<Bytes, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(conn) = &mut self.conn {
                conn.drive(cx);
            }
            let frame = ready!(hyper::body::Body::poll_frame(
                Pin::new(&mut self.incoming),
                cx
            ));
            match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if data.is_empty() => continue,
                    Ok(data) => return Poll::Ready(Some(Ok(data))),
                    // Trailers are dropped.
                    Err(_) => continue,
                },
                Some(Err(e)) => {
                    // The connection is broken: never return it.
                    self.conn = None;
                    return Poll::Ready(Some(Err(Error::Body { source: e.into() })));
                }
                None => {
                    if let Some(conn) = self.conn.take() {
                        conn.give_back();
                    }
                    return Poll::Ready(None);
                }
            }
        }
    }
}

impl Stream for Body {
    type Item = Result<Bytes, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match &mut self.kind {
            Kind::Empty => Poll::Ready(None),
            Kind::Full(b) => Poll::Ready(b.take().map(Ok)),
            Kind::Stream { stream, .. } => stream.as_mut().poll_next(cx),
        }
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match ready!(self.poll_next(cx)) {
            Some(Ok(bytes)) => Poll::Ready(Some(Ok(Frame::data(bytes)))),
            Some(Err(e)) => Poll::Ready(Some(Err(Box::new(e)))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Empty => true,
            Kind::Full(b) => b.is_none(),
            Kind::Stream { .. } => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self.len() {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

impl Default for Body {
    fn default() -> Self {
        Body::empty()
    }
}

impl From<Bytes> for Body {
    fn from(b: Bytes) -> Self {
        Body::from_bytes(b)
    }
}

impl From<Vec<u8>> for Body {
    fn from(b: Vec<u8>) -> Self {
        Body::from_bytes(b)
    }
}

impl From<String> for Body {
    fn from(s: String) -> Self {
        Body::from_bytes(s)
    }
}

impl From<&'static str> for Body {
    fn from(s: &'static str) -> Self {
        Body::from_bytes(s)
    }
}

impl From<&'static [u8]> for Body {
    fn from(s: &'static [u8]) -> Self {
        Body::from_bytes(s)
    }
}

impl fmt::Debug for Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Empty => f.write_str("Body(empty)"),
            Kind::Full(b) => write!(f, "Body({} bytes)", b.as_ref().map_or(0, |b| b.len())),
            Kind::Stream { len: Some(n), .. } => write!(f, "Body(stream of {n} bytes)"),
            Kind::Stream { len: None, .. } => f.write_str("Body(stream)"),
        }
    }
}

/// An [`AsyncRead`] over a [`Body`] (from [`Body::into_reader`]). A body
/// error is an `io::Error` whose inner error is the [`Error`].
#[derive(Debug)]
pub struct BodyReader {
    body: Body,
    chunk: Bytes,
}

impl AsyncRead for BodyReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        while self.chunk.is_empty() {
            match ready!(Pin::new(&mut self.body).poll_next(cx)) {
                Some(Ok(chunk)) => self.chunk = chunk,
                Some(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
                None => return Poll::Ready(Ok(0)),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        Poll::Ready(Ok(n))
    }
}
