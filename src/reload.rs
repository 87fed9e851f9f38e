//! Values read from files and read again when the files change: the export keys file and
//! the TLS certificate. The files are polled rather than watched: a Kubernetes Secret or a
//! cert-manager renewal swaps them through a symlink, which file events report unreliably.
//!
//! Files are often replaced one after another (certbot writes the key, then the chain), so a
//! load that fails is tried again every second for [`SETTLE`] before the failure is logged;
//! meanwhile, and after, the old value stays in use.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::signal::Hangups;

/// How long a failed reload is retried before it is logged as failed.
pub const SETTLE: Duration = Duration::from_secs(5);

/// A value replaced whole when its files change; readers take the one current now and keep
/// it for as long as they need it.
#[derive(Debug)]
pub struct Swap<T>(RwLock<Arc<T>>);

impl<T> Swap<T> {
    pub fn new(value: T) -> Swap<T> {
        Swap(RwLock::new(Arc::new(value)))
    }

    pub fn current(&self) -> Arc<T> {
        Arc::clone(&self.0.read().unwrap_or_else(|p| p.into_inner()))
    }

    fn replace(&self, value: T) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(value);
    }
}

/// How one value is reloaded.
pub struct Reload<T> {
    pub value: Arc<Swap<T>>,
    /// What the log lines call it: `"export keys"`, `"TLS certificate"`.
    pub what: &'static str,
    pub files: Vec<PathBuf>,
    /// How often the files are looked at.
    pub every: Duration,
    /// Reads the files; an error keeps the old value in use.
    pub load: Box<dyn Fn() -> Result<T, String> + Send + Sync>,
}

impl<T> Reload<T> {
    /// Reloads when the files' contents change, and at once on every SIGHUP in `hangups`
    /// (changed or not), until `stop`. A load that fails keeps the old value and logs why.
    pub async fn run(self, mut hangups: Option<Hangups>, stop: CancellationToken) {
        let mut seen = self.fingerprint();
        let mut tick = tokio::time::interval(self.every);
        loop {
            let forced = tokio::select! {
                () = stop.cancelled() => return,
                () = next_hangup(&mut hangups) => true,
                _ = tick.tick() => false,
            };
            if forced {
                tracing::info!("received SIGHUP; reloading {}", self.what);
            } else if self.fingerprint() == seen {
                continue;
            }
            let loaded = self.load_settled(&stop).await;
            seen = self.fingerprint();
            match loaded {
                Some(Ok(value)) => {
                    self.value.replace(value);
                    tracing::info!(files = ?self.files, "{} reloaded", self.what);
                }
                Some(Err(err)) => {
                    tracing::error!(error = %err, "{} reload failed; keeping the old ones", self.what)
                }
                None => return,
            }
        }
    }

    /// Loads the value, trying again every second for [`SETTLE`] while it fails; `None` if
    /// stopped meanwhile.
    async fn load_settled(&self, stop: &CancellationToken) -> Option<Result<T, String>> {
        let deadline = tokio::time::Instant::now() + SETTLE;
        loop {
            let loaded = (self.load)();
            if loaded.is_ok() || tokio::time::Instant::now() >= deadline {
                return Some(loaded);
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = stop.cancelled() => return None,
            }
        }
    }

    /// The files' contents, hashed; `None` while one cannot be read.
    fn fingerprint(&self) -> Option<[u8; 32]> {
        let mut hasher = Sha256::new();
        for file in &self.files {
            hasher.update(std::fs::read(file).ok()?);
        }
        Some(hasher.finalize().into())
    }
}

async fn next_hangup(hangups: &mut Option<Hangups>) {
    match hangups {
        Some(hangups) => hangups.next().await,
        None => std::future::pending().await,
    }
}
