//! What the HTTP bench and the `http_count` example share: a smol
//! connector and a `Runtime` executor for hyper-util's legacy client, and
//! an nginx started for the run.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::Empty;

/// hyper-util's legacy client needs a connector (a tower `Service<Uri>`);
/// this one opens an async-net socket and adapts it with smol-hyper.
#[derive(Clone)]
pub struct SmolConnector;

pub struct Conn(smol_hyper::rt::FuturesIo<async_net::TcpStream>);

impl hyper_util::client::legacy::connect::Connection for Conn {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        hyper_util::client::legacy::connect::Connected::new()
    }
}

impl hyper::rt::Read for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl tower_service::Service<hyper::Uri> for SmolConnector {
    type Response = Conn;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Conn, std::io::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: hyper::Uri) -> Self::Future {
        Box::pin(async move {
            let host = uri.host().unwrap_or("127.0.0.1").to_owned();
            let port = uri.port_u16().unwrap_or(80);
            let tcp = async_net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            Ok(Conn(smol_hyper::rt::FuturesIo::new(tcp)))
        })
    }
}

pub type Legacy = hyper_util::client::legacy::Client<SmolConnector, Empty<bytes::Bytes>>;

/// An nginx started for the bench (Debian's binary, as `.ci/run` uses):
/// one worker, a 10-byte file, keep-alive for 100 000 requests. `None`
/// (the group is skipped) when there is no `nginx` on the PATH.
pub struct Nginx {
    child: std::process::Child,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its worker (SIGKILL would orphan it).
        let _ = std::process::Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

pub fn nginx() -> Option<Nginx> {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for sub in ["www", "logs", "tmp"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    std::fs::write(root.join("www/ten.txt"), b"0123456789").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let conf = format!(
        "worker_processes 1;\npid {r}/nginx.pid;\nerror_log {r}/logs/error.log;\n\
         events {{ worker_connections 1024; }}\n\
         http {{ access_log off; keepalive_requests 100000;\n\
         client_body_temp_path {r}/tmp/body; proxy_temp_path {r}/tmp/proxy;\n\
         fastcgi_temp_path {r}/tmp/fastcgi; uwsgi_temp_path {r}/tmp/uwsgi; scgi_temp_path {r}/tmp/scgi;\n\
         server {{ listen 127.0.0.1:{port}; root {r}/www; }} }}\n",
        r = root.display()
    );
    std::fs::write(root.join("nginx.conf"), conf).unwrap();
    let child = std::process::Command::new("nginx")
        .args(["-g", "daemon off;", "-p"])
        .arg(root)
        .arg("-c")
        .arg(root.join("nginx.conf"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let nginx = Nginx {
        child,
        url: format!("http://127.0.0.1:{port}/ten.txt"),
        _dir: dir,
    };
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(nginx);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// hyper-util's legacy client spawning its connection tasks on the crate's
/// `Runtime`.
#[derive(Clone)]
pub struct OnRuntime(pub smolkit::runtime::Handle);

impl<F: Future<Output = ()> + Send + 'static> hyper::rt::Executor<F> for OnRuntime {
    fn execute(&self, fut: F) {
        self.0.spawn(fut).detach();
    }
}
