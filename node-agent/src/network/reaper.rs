//! Work a teardown leaves behind, done on the reaper's own thread.
//!
//! Deleting a veth waits in the kernel for RCU grace periods (about
//! 20 ms on this kind of node), and the conntrack flush that must come
//! before a slot's addresses are handed out again walks the kernel's
//! whole conntrack hash (about 8 ms). Together they were most of a
//! teardown. A teardown therefore takes the capsule's node end out of
//! service at once (down, which drops its routes; renamed, which frees its
//! name for the capsule's next network), marks its slot draining (see
//! `slots`), and leaves the rest here: one conntrack walk for every slot
//! pending at that moment, then those slots freed; the links are deleted
//! on a thread of their own.
//!
//! A retired link is named `wrenn+<ifindex in hex>`; the startup sweep
//! removes those and finishes drains, so a crash before the reaper got to
//! them leaves nothing behind.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use tracing::warn;

use super::SlotAddrs;
use super::slots::SlotAllocator;
use crate::sys::net::{self as sys};

/// The name a retired link with interface index `index` takes.
pub fn retired_name(index: u32) -> String {
    super::serial_name('+', index)
}

/// Whether `name` has the shape of [`retired_name`].
pub fn is_retired_name(name: &str) -> bool {
    super::is_serial_name(name, '+')
}

/// What a teardown hands over.
#[derive(Debug)]
pub enum Job {
    /// Delete this retired link.
    Link(String),
    /// Flush the conntrack entries of this slot's addresses, then free it.
    Drain(u32, SlotAddrs),
}

/// Runs [`Job`]s in the node namespace on two threads of its own, one
/// for drains and one for links, so a slot is never freed late because a
/// veth delete was waiting ahead of it. The threads end once their owner
/// is dropped and every job handed to them is done.
#[derive(Debug)]
pub struct Reaper {
    /// `None` when a thread could not be started: the caller then does
    /// those jobs itself.
    links: Option<mpsc::Sender<String>>,
    drains: Option<mpsc::Sender<(u32, SlotAddrs)>>,
}

/// How long drains whose flush failed wait before the next try.
const RETRY: Duration = Duration::from_secs(1);

fn spawn<T: Send + 'static>(
    name: &str,
    work: impl FnOnce(mpsc::Receiver<T>) + Send + 'static,
) -> Option<mpsc::Sender<T>> {
    let (tx, rx) = mpsc::channel::<T>();
    match std::thread::Builder::new()
        .name(name.into())
        .spawn(move || work(rx))
    {
        Ok(_) => Some(tx),
        Err(e) => {
            warn!(
                error = &e as &dyn std::error::Error,
                thread = name,
                "start a network reaper thread; teardowns do its work themselves"
            );
            None
        }
    }
}

impl Reaper {
    pub fn start(node_netns: PathBuf, slots: Arc<SlotAllocator>) -> Self {
        let ns = node_netns.clone();
        let links = spawn("wrenn-net-links", move |rx: mpsc::Receiver<String>| {
            in_node(&ns, "links", move |nl| {
                rx.into_iter().for_each(|name| delete(nl, &name));
            });
        });
        let drains = spawn("wrenn-net-drain", move |rx| {
            in_node(&node_netns, "drains", move |nl| run_drains(nl, &slots, &rx));
        });
        Self { links, drains }
    }

    /// Hands `job` to its thread; `Err` gives it back when there is no
    /// thread to take it.
    pub fn hand(&self, job: Job) -> Result<(), Job> {
        match job {
            Job::Link(name) => match &self.links {
                Some(tx) => tx.send(name).map_err(|mpsc::SendError(n)| Job::Link(n)),
                None => Err(Job::Link(name)),
            },
            Job::Drain(slot, addrs) => match &self.drains {
                Some(tx) => tx
                    .send((slot, addrs))
                    .map_err(|mpsc::SendError((s, a))| Job::Drain(s, a)),
                None => Err(Job::Drain(slot, addrs)),
            },
        }
    }
}

/// Runs `work` inside the node namespace for the whole life of a reaper
/// thread: one namespace thread and one netlink socket, not one per job.
/// When the namespace cannot be entered, `work` (and the receiver it
/// holds) is dropped, so teardowns do the jobs themselves.
fn in_node(node_netns: &Path, what: &str, work: impl FnOnce(&sys::Netlink) + Send) {
    let ran = sys::run_in_netns(node_netns, |nl| {
        work(nl);
        Ok::<(), std::convert::Infallible>(())
    });
    if let Err(e) = ran {
        warn!(
            error = &e as &dyn std::error::Error,
            jobs = what,
            "network reaper cannot enter the node namespace; teardowns do its work themselves"
        );
    }
}

/// Every drain pending at once is one batch: one conntrack walk. Drains
/// whose flush failed are tried again with the next batch.
fn run_drains(nl: &sys::Netlink, slots: &SlotAllocator, rx: &mpsc::Receiver<(u32, SlotAddrs)>) {
    let mut retry: Vec<(u32, SlotAddrs)> = Vec::new();
    loop {
        let first = if retry.is_empty() {
            match rx.recv() {
                Ok(d) => Some(d),
                Err(_) => return,
            }
        } else {
            match rx.recv_timeout(RETRY) {
                Ok(d) => Some(d),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                // Owner gone: what could not be flushed stays draining;
                // the next agent's sweep finishes it.
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        };
        let mut drains = std::mem::take(&mut retry);
        drains.extend(first.into_iter().chain(rx.try_iter()));
        if let Err(e) = drain(nl, slots, &drains) {
            warn!(
                error = &e as &dyn std::error::Error,
                slots = drains.len(),
                "drain released slots; retrying"
            );
            retry = drains;
        }
    }
}

/// Flushes the conntrack entries of every slot in `drains` in one walk,
/// then frees those slots. Returns the first error.
pub fn drain(
    nl: &sys::Netlink,
    slots: &SlotAllocator,
    drains: &[(u32, SlotAddrs)],
) -> std::io::Result<()> {
    let mine: HashSet<IpAddr> = drains
        .iter()
        .flat_map(|(_, a)| [a.host, a.node_transit, a.capsule_transit])
        .map(IpAddr::V4)
        .collect();
    nl.conntrack_flush(|e| e.addrs().iter().any(|a| mine.contains(a)))?;
    for (slot, _) in drains {
        slots
            .end_release(*slot)
            .map_err(|e| std::io::Error::new(e.kind(), format!("free drained slot {slot}: {e}")))?;
    }
    Ok(())
}

/// Deletes the retired link `name`; a failure is logged (the startup
/// sweep removes it).
fn delete(nl: &sys::Netlink, name: &str) {
    if let Err(e) = nl.del_link(name) {
        warn!(
            link = name,
            error = &e as &dyn std::error::Error,
            "delete a retired link"
        );
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
