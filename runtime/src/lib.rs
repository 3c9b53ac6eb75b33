//! Process plumbing the Wrenn binaries (operator, node agent, gateway)
//! share, so each is written once: when to stop ([`stop_signal`]), how
//! PEM files are read ([`pem`]) and how logging is set up ([`log`]). It
//! holds no policy: what a binary does on the signal, which certificates
//! it trusts and how it exits on bad flags stay with the binary.
#![forbid(unsafe_code)]

pub mod log;
pub mod pem;

/// Resolves on SIGTERM (what the kubelet sends) or SIGINT. Without a
/// SIGTERM handler (it cannot be installed) it waits for SIGINT only, and
/// says so.
pub async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(err) => {
            tracing::warn!(
                error = &err as &dyn std::error::Error,
                "no SIGTERM handler; stopping on SIGINT only"
            );
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
