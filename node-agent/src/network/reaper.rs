//! Retired node links and the thread that deletes them.
//!
//! Deleting a veth waits in the kernel for RCU grace periods (about
//! 20 ms on this kind of node, most of a teardown). A teardown therefore
//! takes the capsule's node end out of service at once (down, which drops
//! its routes; renamed, which frees its name for the capsule's next
//! network) and leaves the deletion to the reaper. A retired link is
//! named `wrenn+<ifindex in hex>`: the startup sweep removes those too,
//! so one left by a crash before the reaper got to it does not stay.

use std::path::PathBuf;
use std::sync::mpsc;

use tracing::warn;

use super::PREFIX;
use crate::sys::net::{self as sys};

/// The name a retired link with interface index `index` takes (at most
/// 14 bytes, under the kernel's 15).
pub fn retired_name(index: u32) -> String {
    format!("{PREFIX}+{index:x}")
}

/// Whether `name` has the shape of [`retired_name`].
pub fn is_retired_name(name: &str) -> bool {
    name.strip_prefix(PREFIX)
        .and_then(|rest| rest.strip_prefix('+'))
        .is_some_and(|hex| {
            (1..=8).contains(&hex.len()) && hex.chars().all(|c| c.is_ascii_hexdigit())
        })
}

/// Deletes retired links in the node namespace on its own thread, in
/// the order they were retired. The thread ends once its owner is
/// dropped and every link handed to it is gone.
#[derive(Debug)]
pub struct Reaper {
    /// `None` when the thread could not be started: links are then
    /// deleted by the caller.
    tx: Option<mpsc::Sender<String>>,
}

impl Reaper {
    pub fn start(node_netns: PathBuf) -> Self {
        let (tx, rx) = mpsc::channel::<String>();
        let started = std::thread::Builder::new()
            .name("wrenn-net-reaper".into())
            .spawn(move || {
                for name in rx {
                    delete(&node_netns, &name);
                }
            });
        match started {
            Ok(_) => Self { tx: Some(tx) },
            Err(e) => {
                warn!(
                    error = &e as &dyn std::error::Error,
                    "start the link reaper; retired links are deleted in place"
                );
                Self { tx: None }
            }
        }
    }

    /// Hands `name` to the thread; `Err` gives it back when there is no
    /// thread to take it.
    pub fn reap(&self, name: String) -> Result<(), String> {
        match &self.tx {
            Some(tx) => tx.send(name).map_err(|mpsc::SendError(n)| n),
            None => Err(name),
        }
    }
}

fn delete(node_netns: &std::path::Path, name: &str) {
    let res = sys::run_in_netns(node_netns, |nl| nl.del_link(name));
    match res {
        Ok(Ok(_)) => {}
        // The startup sweep removes it.
        Ok(Err(e)) | Err(e) => {
            warn!(
                link = name,
                error = &e as &dyn std::error::Error,
                "delete a retired link"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retired_names_fit_the_kernel_and_never_look_like_a_capsules() {
        let longest = retired_name(u32::MAX);
        assert_eq!(longest, "wrenn+ffffffff");
        assert!(longest.len() <= 15);
        for index in [1, 0xabc, u32::MAX] {
            let n = retired_name(index);
            assert!(is_retired_name(&n), "{n}");
            assert!(!super::super::is_resource_name(&n), "{n}");
        }
        for other in [
            "wrenn-abc",
            "wrenn+",
            "wrenn+xyz",
            "wrenn+123456789",
            "eth0+1",
        ] {
            assert!(!is_retired_name(other), "{other}");
        }
    }
}
