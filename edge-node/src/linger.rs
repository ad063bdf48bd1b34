//! Lingering close for HTTP/1 connections.
//!
//! When the server ends a connection while its client is still sending (a
//! 413 answered mid-upload, a 431 for a head still arriving, a body the
//! handler never read), closing the socket with unread data makes the
//! kernel send a reset. The client then often sees "broken pipe" or
//! "connection reset" instead of the answer that is already on its way.
//! As nginx's `lingering_close` does, the connection is instead shut for
//! writing (the answer, then FIN) and what the client still sends is read
//! and discarded for a short while before the socket closes.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Longest a closing connection is drained.
const LINGER_FOR: Duration = Duration::from_secs(5);
/// Most a closing connection's client may still send before the socket is
/// closed anyway.
const LINGER_BYTES: usize = 8 * 1024 * 1024;

/// `io`, closed lingering when dropped (see the module docs).
pub(crate) struct LingerOnDrop<I>
where
    I: AsyncRead + AsyncWrite + AsRawFd + Unpin + Send + 'static,
{
    /// Always `Some` until dropped.
    io: Option<I>,
}

impl<I> LingerOnDrop<I>
where
    I: AsyncRead + AsyncWrite + AsRawFd + Unpin + Send + 'static,
{
    /// Wraps a connection's socket (plain or TLS).
    pub(crate) fn new(io: I) -> LingerOnDrop<I> {
        LingerOnDrop { io: Some(io) }
    }

    fn io(&mut self) -> io::Result<&mut I> {
        self.io
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }
}

impl<I> Drop for LingerOnDrop<I>
where
    I: AsyncRead + AsyncWrite + AsRawFd + Unpin + Send + 'static,
{
    fn drop(&mut self) {
        let Some(io) = self.io.take() else { return };
        // A client that closed or reset is not sending: close at once. This
        // is how keep-alive connections usually end.
        if peer_closed(io.as_raw_fd()) {
            return;
        }
        // Outside a runtime (never on a worker thread) the socket just closes.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(linger(io));
        }
    }
}

/// Shuts `io` for writing, then reads and discards until the client
/// closes, [`LINGER_BYTES`] arrive or [`LINGER_FOR`] passes.
async fn linger<I: AsyncRead + AsyncWrite + Unpin>(mut io: I) {
    let drained = tokio::time::timeout(LINGER_FOR, async {
        // TLS: close_notify first. A client that already left makes this
        // fail; reading then ends at once too.
        let _ = io.shutdown().await;
        // Small and inline: a drain after a node-wide close runs for every
        // idle keep-alive connection at once, and usually reads nothing.
        let mut buf = [0u8; 2048];
        let mut read = 0usize;
        while read < LINGER_BYTES {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => read += n,
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::debug!(
            "closed a connection whose client was still sending {} s after its answer",
            LINGER_FOR.as_secs()
        );
    }
}

/// Whether the client closed (FIN) or reset the connection on socket `fd`,
/// looked at without consuming anything. A request it pipelined, or
/// nothing yet, means it is still there. A FIN cannot be told from a
/// client that half-closed its side and still waits. Over TLS a
/// close_notify alert waits unread before the FIN and hides it.
pub(crate) fn peer_closed(fd: RawFd) -> bool {
    let mut byte = 0u8;
    // SAFETY: `fd` is an open socket owned by the caller for the duration
    // of the call; recv writes at most one byte into `byte` and, with
    // MSG_PEEK, consumes nothing. MSG_DONTWAIT: it never blocks the thread.
    let n = unsafe {
        libc::recv(
            fd,
            (&raw mut byte).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => true,
        n if n > 0 => false,
        _ => matches!(
            io::Error::last_os_error().kind(),
            io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::NotConnected
                | io::ErrorKind::BrokenPipe
        ),
    }
}

impl<I> AsyncRead for LingerOnDrop<I>
where
    I: AsyncRead + AsyncWrite + AsRawFd + Unpin + Send + 'static,
{
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().io()?).poll_read(cx, buf)
    }
}

impl<I> AsyncWrite for LingerOnDrop<I>
where
    I: AsyncRead + AsyncWrite + AsRawFd + Unpin + Send + 'static,
{
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.get_mut().io()?).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.get_mut().io()?).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.as_ref().is_some_and(|io| io.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().io()?).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().io()?).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::{TcpListener, TcpStream};

    /// A server that answers early and drops its end while the client still
    /// sends: with the lingering close the client finishes writing and reads
    /// the answer; a plain close resets the connection under the client.
    #[tokio::test]
    async fn a_client_still_sending_reads_the_answer() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.expect("accept");
            let mut io = LingerOnDrop::new(socket);
            let mut head = [0u8; 1024];
            let n = io.read(&mut head).await.expect("read");
            assert!(n > 0);
            io.write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n")
                .await
                .expect("answer");
            // Dropped with most of the upload unread.
        });
        let mut client = TcpStream::connect(addr).await.expect("connect");
        client
            .write_all(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 4194304\r\n\r\n")
            .await
            .expect("head");
        server.await.expect("server");
        // 4 MiB more: far beyond what the kernel's buffers hold unread.
        let chunk = vec![b'a'; 64 * 1024];
        for _ in 0..64 {
            client.write_all(&chunk).await.expect("the upload goes on");
        }
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.expect("read answer");
        assert!(
            answer.starts_with(b"HTTP/1.1 413"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }

    #[tokio::test]
    async fn a_closed_peer_is_seen_and_pending_data_is_not_a_close() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        assert!(!peer_closed(server.as_raw_fd()));
        client.write_all(b"x").await.expect("write");
        server.readable().await.expect("readable");
        assert!(!peer_closed(server.as_raw_fd()));
        drop(client);
        let mut byte = [0u8; 1];
        let mut server = server;
        assert_eq!(server.read(&mut byte).await.expect("read"), 1);
        // Only the FIN is left, once it has arrived.
        let mut closed = false;
        for _ in 0..200 {
            closed = peer_closed(server.as_raw_fd());
            if closed {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(closed);
    }
}
