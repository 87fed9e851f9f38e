//! A relay process whose broker is out of reach: its connection goes through a proxy that
//! refuses it until the test says otherwise, and its spool is in a directory the test names,
//! so that a restarted relay finds it again.

use std::path::PathBuf;

use crate::harness::{TestExchange, broker_addr, env, spool_dir, unique_exchange, via};
use crate::proxy::Proxy;

pub struct Offline {
    pub proxy: Proxy,
    pub exchange: TestExchange,
    pub dir: PathBuf,
    dir_str: String,
    url: String,
}

impl Offline {
    pub async fn start() -> Offline {
        Self::start_in(spool_dir(&format!(
            "relay-offline-{}",
            uuid::Uuid::now_v7().simple()
        )))
        .await
    }

    /// With the spool in `dir`.
    pub async fn start_in(dir: PathBuf) -> Offline {
        let proxy = Proxy::start(broker_addr()).await;
        proxy.refuse(true);
        let url = via(&proxy);
        Offline {
            dir_str: dir.to_string_lossy().into_owned(),
            proxy,
            exchange: unique_exchange(),
            dir,
            url,
        }
    }

    /// The relay's settings: [`env`] with the proxy's URL and the spool directory.
    pub fn env(&self) -> Vec<(&str, &str)> {
        let mut relay_env = env(&self.exchange, &self.url);
        relay_env.push(("RELAY_SPOOL__DIR", &self.dir_str));
        relay_env
    }
}

impl Drop for Offline {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
