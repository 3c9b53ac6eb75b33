//! `console [-f] CAP`: the capsule's serial console (the boot log and
//! what the guest prints there), its last lines with `--tail`, and with
//! `-f` what comes next until Ctrl-C. A WebSocket ([`crate::transfer`]),
//! so following is not cut by the API server's request timeout.

use tokio::io::AsyncWriteExt as _;

use crate::cluster::Target;
use crate::transfer::{self, Session};

/// Prints the console of `capsule` to stdout.
pub async fn show(
    target: &Target,
    capsule: &str,
    follow: bool,
    tail: Option<u32>,
) -> Result<(), transfer::Error> {
    let mut query = format!("follow={follow}");
    if let Some(n) = tail {
        query.push_str(&format!("&tailLines={n}"));
    }
    let mut s = Session::open(target, capsule, "console", &query).await?;
    let mut out = tokio::io::stdout();
    while let Some(b) = s.next().await? {
        // A reader that went away (`| head`) ends us quietly.
        if out.write_all(&b).await.is_err() || out.flush().await.is_err() {
            return Ok(());
        }
    }
    Ok(())
}
