//! Certificate rotation without a restart: the files are re-read every
//! interval and, when their bytes changed, a new server configuration
//! replaces the old one for every handshake after that.
//!
//! Content is compared, not mtimes or inotify events: a Kubernetes Secret
//! volume rotates by swapping the `..data` symlink, which leaves the watched
//! files' own inodes untouched. Reading the three files is not atomic
//! against that swap, so a half-rotated read (new certificate, old key) is
//! refused by the key check and retried at the next poll, keeping the
//! configuration that works.

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rustls::ServerConfig;

use super::{ClientNames, Error, Material, TlsFiles};

/// The current server configuration and the files it came from.
#[derive(Debug)]
pub struct Reloader {
    files: TlsFiles,
    names: ClientNames,
    current: RwLock<Arc<ServerConfig>>,
    /// The material `current` was built from.
    loaded: Mutex<Material>,
}

/// What one poll found.
#[derive(Debug)]
pub enum Poll {
    /// The files hold what is loaded.
    Unchanged,
    /// New material is in use from the next handshake on.
    Reloaded,
    /// The files changed but cannot be used; the previous configuration stays.
    Refused(Error),
}

impl Reloader {
    /// Loads the files (blocking); fails when they are unusable, so a bad
    /// start is reported at once.
    pub fn load(files: TlsFiles, names: ClientNames) -> Result<Self, Error> {
        let loaded = files.read()?;
        let config = files.build(&loaded, &names)?;
        Ok(Self {
            files,
            names,
            current: RwLock::new(config),
            loaded: Mutex::new(loaded),
        })
    }

    /// The configuration for the next handshake.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Re-reads the files and swaps the configuration if they changed
    /// (blocking).
    pub fn poll(&self) -> Poll {
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        let material = match self.files.read() {
            Ok(m) => m,
            // A file missing for a moment (the symlink swap) is retried.
            Err(err) => return Poll::Refused(err),
        };
        if material == *loaded {
            return Poll::Unchanged;
        }
        match self.files.build(&material, &self.names) {
            Ok(config) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = config;
                *loaded = material;
                Poll::Reloaded
            }
            // `loaded` stays, so the next poll tries the files again.
            Err(err) => Poll::Refused(err),
        }
    }

    /// Polls every `every` until `stop` resolves, logging reloads and (once
    /// per distinct bad content) refusals.
    pub async fn watch(
        self: Arc<Self>,
        every: Duration,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut last_refusal: Option<String> = None;
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tick.tick() => {}
            }
            let me = self.clone();
            let Ok(outcome) = tokio::task::spawn_blocking(move || me.poll()).await else {
                continue;
            };
            match outcome {
                Poll::Unchanged => last_refusal = None,
                Poll::Reloaded => {
                    last_refusal = None;
                    tracing::info!(cert = %self.files.cert.display(), "reloaded rotated TLS certificates");
                }
                Poll::Refused(err) => {
                    let text = err.to_string();
                    if last_refusal.as_deref() != Some(text.as_str()) {
                        tracing::warn!(
                            error = &err as &dyn std::error::Error,
                            "rotated TLS material not usable yet; keeping the loaded certificates"
                        );
                        last_refusal = Some(text);
                    }
                }
            }
        }
    }
}
