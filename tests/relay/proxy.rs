//! A TCP proxy that sits between the relay and the broker, so tests can break the network
//! for real: cut every open connection, refuse new ones, stall the traffic, or hold the
//! broker's replies only.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::AbortHandle;

pub struct Proxy {
    pub addr: SocketAddr,
    state: Arc<State>,
    accept_task: AbortHandle,
}

struct State {
    upstream: SocketAddr,
    refusing: AtomicBool,
    held: watch::Sender<Held>,
    /// Bytes read from the relay (counted even while held).
    from_client: AtomicU64,
    /// Connections accepted from the relay (counted even while refusing).
    attempts: AtomicU64,
    connections: Mutex<Vec<AbortHandle>>,
}

/// Which traffic is held rather than forwarded.
#[derive(Debug, Clone, Copy, Default)]
struct Held {
    both: bool,
    replies: bool,
}

impl Held {
    fn holds(self, from_client: bool) -> bool {
        self.both || (self.replies && !from_client)
    }
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            upstream,
            refusing: AtomicBool::new(false),
            held: watch::channel(Held::default()).0,
            from_client: AtomicU64::new(0),
            attempts: AtomicU64::new(0),
            connections: Mutex::new(Vec::new()),
        });
        let accept_task = tokio::spawn(accept_loop(listener, Arc::clone(&state))).abort_handle();
        Proxy {
            addr,
            state,
            accept_task,
        }
    }

    /// Closes every open connection, both sides, as a network failure would.
    pub fn cut(&self) {
        for connection in self.state.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }

    /// While on, new connections are accepted and immediately closed.
    pub fn refuse(&self, on: bool) {
        self.state.refusing.store(on, Ordering::SeqCst);
    }

    /// While on, bytes are read but not forwarded, in either direction.
    pub fn stall(&self, on: bool) {
        self.state.held.send_modify(|held| held.both = on);
    }

    /// While on, bytes from the broker are read but not forwarded, while the relay's still
    /// reach it: a broker that takes everything and answers late (a long pause), as seen from
    /// the relay.
    pub fn hold_replies(&self, on: bool) {
        self.state.held.send_modify(|held| held.replies = on);
    }

    pub fn bytes_from_client(&self) -> u64 {
        self.state.from_client.load(Ordering::SeqCst)
    }

    /// Connections the relay opened to the proxy so far, refused ones included.
    pub fn connection_attempts(&self) -> u64 {
        self.state.attempts.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept_task.abort();
        self.cut();
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        state.attempts.fetch_add(1, Ordering::SeqCst);
        if state.refusing.load(Ordering::SeqCst) {
            drop(client);
            continue;
        }
        let Ok(server) = TcpStream::connect(state.upstream).await else {
            continue;
        };
        let task = tokio::spawn(pump_both(client, server, Arc::clone(&state)));
        state.connections.lock().unwrap().push(task.abort_handle());
    }
}

async fn pump_both(client: TcpStream, server: TcpStream, state: Arc<State>) {
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::select! {
        () = pump(client_read, server_write, &state, true) => {}
        () = pump(server_read, client_write, &state, false) => {}
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    state: &State,
    from_client: bool,
) {
    let mut held = state.held.subscribe();
    let mut buf = vec![0u8; 64 * 1024];
    // Read while held too (kept here, not forwarded), so `bytes_from_client` says what the
    // relay sent, not only the first piece of it.
    let mut kept = Vec::new();
    loop {
        tokio::select! {
            read = from.read(&mut buf) => {
                let n = match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if from_client {
                    state.from_client.fetch_add(n as u64, Ordering::SeqCst);
                }
                kept.extend_from_slice(&buf[..n]);
            }
            // The watch's value is not kept borrowed while writing.
            released = async { held.wait_for(|held| !held.holds(from_client)).await.is_ok() },
                if !kept.is_empty() => {
                if !released {
                    return;
                }
                if to.write_all(&kept).await.is_err() {
                    return;
                }
                kept.clear();
            }
        }
    }
}
