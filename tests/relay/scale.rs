//! Horizontal scale: two relays behind HAProxy on loopback, one of them SIGKILLed under load.
//! Every 202 reaches the broker and the survivor takes all the traffic.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use hyper::{Method, StatusCode};

use crate::harness::{
    self, PATIENCE, RelayProcess, env, eventually, request, send, unique_exchange, webhook,
};

/// HAProxy in the foreground, balancing over `backends` and checking their `/readyz`.
struct Haproxy {
    _child: tokio::process::Child,
    addr: SocketAddr,
    config: std::path::PathBuf,
}

impl Haproxy {
    async fn start(backends: &[SocketAddr]) -> Haproxy {
        // HAProxy's port is bound here, on a port the kernel picks, and handed to HAProxy as
        // its standard input (`bind fd@0`). Never released between choosing and using it, it
        // cannot be taken meanwhile by another test's listener (which would then answer in
        // HAProxy's place).
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let servers: String = backends
            .iter()
            .enumerate()
            .map(|(i, backend)| format!("  server relay{i} {backend} check\n"))
            .collect();
        let config = format!(
            "global\n  maxconn 1024\n\
             defaults\n  mode http\n  timeout connect 1s\n  timeout client 10s\n  \
             timeout server 10s\n  retries 2\n  option redispatch\n\
             frontend webhooks\n  bind fd@0\n  default_backend relays\n\
             backend relays\n  balance roundrobin\n  option httpchk GET /readyz\n  \
             http-check expect status 200\n  default-server inter 100ms fall 1 rise 1\n{servers}"
        );
        let path =
            std::env::temp_dir().join(format!("haproxy-{}.cfg", uuid::Uuid::now_v7().simple()));
        std::fs::write(&path, config).unwrap();
        let child = tokio::process::Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::from(OwnedFd::from(listener)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("haproxy is installed (Debian package haproxy)");
        eventually("haproxy to forward a request", PATIENCE, || async {
            match send(addr, request(Method::GET, "/healthz", "")).await {
                Ok(reply) if reply.status == StatusCode::OK => Ok(()),
                other => Err(other),
            }
        })
        .await;
        Haproxy {
            _child: child,
            addr,
            config: path,
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.config);
    }
}

#[tokio::test]
async fn two_relays_behind_a_load_balancer_survive_losing_one() {
    let exchange = unique_exchange();
    let url = harness::amqp_url();
    let mut first = RelayProcess::spawn(&env(&exchange, &url)).await;
    let mut second = RelayProcess::spawn(&env(&exchange, &url)).await;
    first.wait_for("connected to the broker").await;
    second.wait_for("connected to the broker").await;

    let broker = harness::broker().await;
    let mut queue = harness::catch_all(&broker, &exchange).await;

    let lb = Haproxy::start(&[first.addr(), second.addr()]).await;
    let answered = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let answered = Arc::clone(&answered);
            let addr = lb.addr;
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                for _ in 0..80 {
                    let req = request(Method::POST, "/webhooks/hirehop", webhook("job.updated"));
                    let outcome = match send(addr, req).await {
                        Ok(reply) if reply.status == StatusCode::ACCEPTED => {
                            Some(reply.message_id())
                        }
                        // In flight on the killed relay: 502 from the balancer, or a reset.
                        _ => None,
                    };
                    outcomes.push(outcome);
                    answered.fetch_add(1, Ordering::SeqCst);
                }
                outcomes
            })
        })
        .collect();
    harness::wait_count(&answered, 160).await;
    first.signal("KILL");

    let mut accepted = HashSet::new();
    // Per client, the positions of the requests that failed.
    let mut failures: Vec<Vec<usize>> = Vec::new();
    for client in clients {
        let outcomes = client.await.unwrap();
        failures.push(
            (0..outcomes.len())
                .filter(|&i| outcomes[i].is_none())
                .collect(),
        );
        accepted.extend(outcomes.into_iter().flatten());
    }
    // The survivor has taken over by the end: each client's last 20 were accepted.
    assert!(
        failures.iter().flatten().all(|&i| i < 80 - 20),
        "the surviving relay did not take all the traffic (killed after 160 answers; each \
         client's failed requests, of 80: {failures:?})"
    );
    let failed = failures.iter().map(Vec::len).sum::<usize>();
    assert!(failed < 8 * 80 / 10, "{failed} requests failed");

    queue.expect_all(accepted).await;
    drop(lb);
    first.exit().await;
    second.terminate().await;
}
