//! What the supervisor reports to `crate::metrics`: a [`CapsuleSource`] per
//! capsule whose VMM exists, which combines the figures other modules own
//! (the cgroup and `/proc` from `vmm`, the disk from `storage`, NIC
//! counters from the backend, guest memory from the guest agent), and the
//! timing of lifecycle steps. Ring buffers, the sampler and the export are
//! `crate::metrics`'s.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::Ctx;
use crate::capsule::config::GuestSettings;
use crate::capsule::model::{Error, State};
use crate::capsule::record::Record;
use crate::capsule::registry::Entry;
use crate::guest::{self, GuestClient};
use crate::metrics::{self, Outcome, SampleSource, SourceFuture, Step};
use crate::storage::{self, BlockStore};
use crate::vmm::cgroup::CapsuleCgroup;
use crate::vmm::{Machine, MachineHandle, NetCounters};

/// The figures of one capsule's current VMM. A new VMM (restore, adoption)
/// gets a new source, so nothing here outlives the VMM it describes.
pub(crate) struct CapsuleSource<M> {
    machine: Arc<M>,
    vm: MachineHandle,
    store: Arc<dyn BlockStore>,
    disk: Option<storage::CapsuleId>,
    host: Option<(PathBuf, CapsuleCgroup)>,
    guest: Option<GuestMemory>,
}

impl<M> std::fmt::Debug for CapsuleSource<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CapsuleSource")
            .field("capsule", &self.vm.capsule)
            .field("pid", &self.vm.process.pid)
            .field("disk", &self.disk.is_some())
            .field("host", &self.host.is_some())
            .field("guest", &self.guest.is_some())
            .finish()
    }
}

fn ready<'a, T: Send + 'a>(r: Result<Option<T>, metrics::Error>) -> SourceFuture<'a, T> {
    Box::pin(std::future::ready(r))
}

impl<M: Machine + 'static> SampleSource for CapsuleSource<M> {
    fn cpu_usage_ns(&self) -> SourceFuture<'_, u64> {
        let Some((_, cgroup)) = &self.host else {
            return ready(Ok(None));
        };
        ready(
            cgroup
                .cpu_usage_ns()
                .map(Some)
                .map_err(|source| metrics::Error::ReadCgroupCpu { source }),
        )
    }

    /// The VMM and its helpers (QEMU's vhost-device-vsock): together they
    /// are what the capsule costs the host.
    fn host_rss_bytes(&self) -> SourceFuture<'_, u64> {
        let Some((proc_root, _)) = &self.host else {
            return ready(Ok(None));
        };
        let total = std::iter::once(self.vm.process)
            .chain(self.vm.helpers.iter().copied())
            .try_fold(0u64, |sum, p| {
                metrics::read_rss_bytes(proc_root, p).map(|rss| sum.saturating_add(rss))
            });
        ready(total.map(Some))
    }

    fn disk_allocated_bytes(&self) -> SourceFuture<'_, u64> {
        let Some(id) = self.disk.clone() else {
            return ready(Ok(None));
        };
        let store = self.store.clone();
        Box::pin(async move {
            // A stat or a dm status ioctl: blocking, so off the runtime.
            match tokio::task::spawn_blocking(move || store.allocated_bytes(&id)).await {
                Ok(Ok(bytes)) => Ok(Some(bytes)),
                Ok(Err(e)) => Err(metrics::Error::source("disk_allocated_bytes", e)),
                Err(e) => Err(metrics::Error::source("disk_allocated_bytes", e)),
            }
        })
    }

    fn net_counters(&self) -> SourceFuture<'_, NetCounters> {
        Box::pin(async move {
            self.machine
                .counters(&self.vm)
                .await
                .map(Some)
                .map_err(|e| metrics::Error::source("net_counters", e))
        })
    }

    fn guest_memory_used_bytes(&self) -> SourceFuture<'_, u64> {
        match &self.guest {
            Some(g) => Box::pin(g.read()),
            None => ready(Ok(None)),
        }
    }
}

/// Guest memory in use from the guest agent's `Metrics`, over a connection
/// kept between ticks and redialed after a failure.
struct GuestMemory {
    capsule: String,
    socket: PathBuf,
    port: u32,
    within: Duration,
    /// Asked only while the capsule is running: a paused guest cannot
    /// answer, and waiting for it every second would only count errors.
    entry: Weak<Entry>,
    token: Option<guest::GuestToken>,
    client: tokio::sync::Mutex<Option<GuestClient>>,
}

const GUEST_FIGURE: &str = "guest_memory_used_bytes";

impl GuestMemory {
    async fn read(&self) -> Result<Option<u64>, metrics::Error> {
        let running = self
            .entry
            .upgrade()
            .is_some_and(|e| e.state() == State::Running);
        if !running {
            return Ok(None);
        }
        match tokio::time::timeout(self.within, self.ask()).await {
            Ok(Ok(m)) => Ok(guest_memory_used(&m)),
            Ok(Err(e)) => {
                if e.is_link_failure() {
                    self.client.lock().await.take();
                }
                Err(metrics::Error::source(GUEST_FIGURE, e))
            }
            Err(_) => {
                // The connection may be wedged; start clean next tick.
                self.client.lock().await.take();
                Err(metrics::Error::source(
                    GUEST_FIGURE,
                    guest::Error::Timeout {
                        capsule: self.capsule.clone(),
                        rpc: "Metrics",
                        after: self.within,
                    },
                ))
            }
        }
    }

    async fn ask(&self) -> Result<wrenn_proto::guest::v1::GuestMetrics, guest::Error> {
        let client = {
            let mut slot = self.client.lock().await;
            match slot.as_ref() {
                Some(c) => c.clone(),
                None => {
                    let timeouts = guest::Timeouts {
                        dial: self.within,
                        call: self.within,
                        ..guest::Timeouts::default()
                    };
                    let c =
                        GuestClient::connect_with(&self.capsule, &self.socket, self.port, timeouts)
                            .await?
                            .with_token(self.token.as_ref().map_or("", |t| t.expose()))?;
                    slot.insert(c).clone()
                }
            }
        };
        client.metrics().await
    }
}

/// Guest memory in use as DESIGN.md §4 defines it: total − available (page
/// cache the guest can drop counts as free). `None` when the guest reports
/// no total, i.e. could not read its own meminfo.
pub(crate) fn guest_memory_used(m: &wrenn_proto::guest::v1::GuestMetrics) -> Option<u64> {
    (m.memory_total_bytes > 0).then(|| {
        m.memory_total_bytes
            .saturating_sub(m.memory_available_bytes)
    })
}

impl<M: Machine + 'static> Ctx<M> {
    /// Starts sampling `rec`'s VMM (after create, restore or adoption).
    /// History kept from an earlier VMM of the capsule continues.
    pub(crate) fn start_sampling(&self, entry: &Arc<Entry>, rec: &Record) {
        // A build VM is the agent's own work, not a capsule to report.
        if rec.internal {
            return;
        }
        if let Some(source) = self.source(entry, rec, self.cfg.guest) {
            self.cfg.metrics.attach(&rec.uid, Arc::new(source));
        }
    }

    /// The source of `rec`'s VMM; `None` when it has none.
    pub(crate) fn source(
        &self,
        entry: &Arc<Entry>,
        rec: &Record,
        guest: Option<GuestSettings>,
    ) -> Option<CapsuleSource<M>> {
        let vm = rec.vm().cloned()?;
        let guest = guest.map(|g| GuestMemory {
            capsule: rec.uid.clone(),
            socket: vm.vsock_socket.clone(),
            port: g.port,
            within: g.sample_within,
            entry: Arc::downgrade(entry),
            token: rec.guest_token.clone(),
            client: tokio::sync::Mutex::new(None),
        });
        Some(CapsuleSource {
            machine: self.host.machine.clone(),
            store: self.host.store.clone(),
            disk: if rec.held.disk.is_some() {
                storage::CapsuleId::new(&rec.uid).ok()
            } else {
                None
            },
            host: self
                .cfg
                .figures
                .as_ref()
                .map(|f| (f.proc_root.clone(), f.cgroups.open_capsule(&rec.uid))),
            guest,
            vm,
        })
    }
}

impl<M> Ctx<M> {
    /// Runs `work` as one `step`, recording its duration and outcome. A
    /// create cancelled by a delete is `cancelled`, not an error; a future
    /// dropped before the end records `cancelled` too.
    pub(crate) async fn timed<T>(
        &self,
        step: Step,
        work: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        let timer = self.cfg.metrics.start_step(step);
        let res = work.await;
        timer.finish(outcome(&res));
        res
    }

    /// Counts a failed operation by class, once, where it ends.
    pub(crate) fn count_error(&self, e: &Error) {
        if let Some(class) = e.class() {
            self.cfg.metrics.error(class);
        }
    }
}

/// The `outcome` label of a step that returned `res`.
pub(crate) fn outcome<T>(res: &Result<T, Error>) -> Outcome {
    match res {
        Ok(_) => Outcome::Ok,
        Err(Error::Cancelled { .. }) => Outcome::Cancelled,
        Err(_) => Outcome::Error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_memory_used_is_total_minus_available() {
        let m = |total, available| wrenn_proto::guest::v1::GuestMetrics {
            memory_total_bytes: total,
            memory_available_bytes: available,
            // What the guest thinks is used is not what we report.
            memory_used_bytes: 1,
            ..Default::default()
        };
        assert_eq!(guest_memory_used(&m(1 << 30, 1 << 28)), Some(3 << 28));
        assert_eq!(guest_memory_used(&m(100, 200)), Some(0));
        assert_eq!(guest_memory_used(&m(0, 0)), None);
    }
}
