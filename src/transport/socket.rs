//! An upstream connection's socket, sized for the plain case.
//!
//! hyper's connection task holds its socket by value for the connection's whole life, and
//! hyper-rustls' `MaybeHttpsStream` keeps rustls' client state inline (1,112 bytes against 40 for
//! a plain TCP stream), so every plain connection would carry a TLS session's room. Here a TLS
//! session is boxed: an HTTP/1.1 connection's task is ~1 KB smaller, and so is what one open
//! stream costs (see `bench/ANALYSIS.md`).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_rustls::MaybeHttpsStream;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// A plain TCP stream, or a boxed TLS session over one.
pub enum Socket {
    /// Plain text (`http://`).
    Plain(TokioIo<TcpStream>),
    /// TLS (`https://`), boxed.
    Tls(Box<MaybeHttpsStream<TokioIo<TcpStream>>>),
}

impl From<MaybeHttpsStream<TokioIo<TcpStream>>> for Socket {
    fn from(io: MaybeHttpsStream<TokioIo<TcpStream>>) -> Self {
        match io {
            MaybeHttpsStream::Http(tcp) => Self::Plain(tcp),
            tls => Self::Tls(Box::new(tls)),
        }
    }
}

impl Read for Socket {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl Write for Socket {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    #[inline]
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    #[inline]
    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
        }
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    #[inline]
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_socket_does_not_carry_a_tls_sessions_room() {
        assert!(std::mem::size_of::<Socket>() <= 48);
        assert!(std::mem::size_of::<MaybeHttpsStream<TokioIo<TcpStream>>>() > 512);
    }
}
