#![allow(dead_code)]
//! A loopback port where nothing listens, held for the test's lifetime.
//!
//! Binding port 0 and releasing it again leaves a window in which another test (or the kernel,
//! for an outgoing connection) takes the port. [`ClosedPort`] keeps its socket bound but never
//! listens on it: connections to the port are refused, and nothing else can bind it until the
//! guard is dropped.
//!
//! `mod support` suites reach it as `support::port`; suites without it include it by path
//! (`#[path = "support/port.rs"] mod port;`).

/// A bound, never-listening loopback socket. Keep it alive as long as the port must stay closed.
#[derive(Debug)]
pub struct ClosedPort {
    socket: tokio::net::TcpSocket,
    /// The port.
    pub port: u16,
}

impl ClosedPort {
    /// Binds `127.0.0.1:0` without listening.
    pub fn new() -> Self {
        let socket = tokio::net::TcpSocket::new_v4().expect("create a TCP socket");
        socket
            .bind(std::net::SocketAddr::from((
                std::net::Ipv4Addr::LOCALHOST,
                0,
            )))
            .expect("bind a loopback port");
        let port = socket.local_addr().expect("bound address").port();
        Self { socket, port }
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }
}
