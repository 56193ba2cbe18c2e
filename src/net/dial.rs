//! Opening a client connection: TCP with nodelay, then TLS when asked.

use std::io;
use std::sync::Arc;

use async_net::TcpStream;
use rustls::pki_types::ServerName;

use super::MaybeTls;

/// A client socket: plain TCP or rustls over it.
pub(crate) type ClientIo = MaybeTls<futures_rustls::client::TlsStream<TcpStream>>;

/// Why [`dial`] failed.
#[derive(Debug)]
pub(crate) enum DialError {
    /// The TCP connection failed.
    Connect(io::Error),
    /// The TLS handshake failed (or the host is not a valid server name).
    Tls(io::Error),
}

/// Connects to `host:port` (an IPv6 literal may keep its brackets) with
/// TCP_NODELAY, and runs the TLS handshake when `tls` is given.
///
/// No timeout here: callers bound the whole exchange they care about
/// (TCP + TLS + HTTP handshake or WebSocket upgrade) on their clock.
pub(crate) async fn dial(
    host: &str,
    port: u16,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<ClientIo, DialError> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let tcp = TcpStream::connect((bare, port))
        .await
        .map_err(DialError::Connect)?;
    // NOTE: small requests and frames must not wait for Nagle.
    let _ = tcp.set_nodelay(true);
    let Some(config) = tls else {
        return Ok(MaybeTls::Plain(tcp));
    };
    let name = ServerName::try_from(bare.to_owned())
        .map_err(|e| DialError::Tls(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    // NOTE: boxed: the handshake's state (a rustls connection, over 1 KiB)
    // would size every dial, plain ones too, and each future around it,
    // which are moved whole (`memcpy`) as they start.
    let stream = Box::pin(futures_rustls::TlsConnector::from(config.clone()).connect(name, tcp))
        .await
        .map_err(DialError::Tls)?;
    Ok(MaybeTls::Tls(Box::new(stream)))
}
