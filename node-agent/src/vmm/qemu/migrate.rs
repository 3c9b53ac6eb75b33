//! Snapshots as migrations: a paused VM's memory and device state goes to
//! a file through the agent's stream socket ([`stream`]),
//! and a fresh QEMU started with `-incoming defer` loads it back. The vsock
//! device must be off the VM for both (see [`vsock`](super::vsock)); the
//! caller unplugs and plugs it.

use std::path::Path;
use std::time::Duration;

use super::error::QemuError;
use super::qmp::{self, Qmp};
use super::stream::{self, Transfer};
use crate::vmm::Error;

/// How long a migration of `memory_bytes` of guest RAM may take.
pub(super) fn timeout(per_gib: Duration, memory_bytes: u64) -> Duration {
    let gib = memory_bytes.div_ceil(1 << 30).max(1);
    per_gib * u32::try_from(gib).unwrap_or(u32::MAX)
}

/// The error of a failed copy between QEMU and `file`.
pub(super) fn stream_err(
    capsule: &str,
    step: &'static str,
    file: &Path,
) -> impl Fn(std::io::Error) -> Error {
    let (capsule, file) = (capsule.to_string(), file.to_path_buf());
    move |source| Error::Qemu {
        capsule: capsule.clone(),
        what: step,
        source: QemuError::Stream {
            file: file.clone(),
            source,
        },
    }
}

fn qmp_err(capsule: &str, step: &'static str) -> impl Fn(qmp::QmpError) -> Error {
    let capsule = capsule.to_string();
    move |source| Error::Qmp {
        capsule: capsule.clone(),
        step,
        source,
    }
}

/// Starts writing the paused VM's state to `file` (through a socket in
/// `run_dir`), unthrottled; [`complete`] waits for it.
pub(super) async fn start_save(
    q: &mut Qmp,
    capsule: &str,
    run_dir: &Path,
    file: &Path,
) -> Result<Transfer, Error> {
    q.execute(&qmp::MigrateSetParameters {
        max_bandwidth: u64::MAX >> 1,
    })
    .await
    .map_err(qmp_err(capsule, "snapshot"))?;
    let transfer = stream::save(run_dir, file).map_err(stream_err(capsule, "snapshot", file))?;
    q.execute(&qmp::Migrate {
        uri: transfer.uri(),
    })
    .await
    .map_err(qmp_err(capsule, "snapshot"))?;
    Ok(transfer)
}

/// Loads the state `transfer` streams from `file` into a QEMU started with
/// `-incoming defer`, and waits up to `settle` for it to leave
/// `inmigrate`.
pub(super) async fn load(
    q: &mut Qmp,
    capsule: &str,
    transfer: Transfer,
    file: &Path,
    within: Duration,
    settle: Duration,
) -> Result<(), Error> {
    q.execute(&qmp::MigrateIncoming {
        uri: transfer.uri(),
    })
    .await
    .map_err(qmp_err(capsule, "restore"))?;
    complete(q, capsule, transfer, file, "restore", within).await?;
    // The migration thread sets the run state just after "completed".
    let deadline = tokio::time::Instant::now() + settle;
    loop {
        let state = q
            .execute(&qmp::QueryStatus)
            .await
            .map_err(qmp_err(capsule, "restore"))?
            .status;
        if state != "inmigrate" || tokio::time::Instant::now() > deadline {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits up to `within` for the migration through `transfer` to complete
/// on QEMU's side, then for the copy to `file` to finish.
pub(super) async fn complete(
    q: &mut Qmp,
    capsule: &str,
    transfer: Transfer,
    file: &Path,
    step: &'static str,
    within: Duration,
) -> Result<(), Error> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let info = q
            .execute(&qmp::QueryMigrate)
            .await
            .map_err(qmp_err(capsule, step))?;
        match info.status.as_deref() {
            Some("completed") => break,
            Some(s @ ("failed" | "cancelled")) => {
                return Err(Error::Qemu {
                    capsule: capsule.to_string(),
                    what: step,
                    source: QemuError::Migration {
                        status: s.to_string(),
                        file: file.to_path_buf(),
                        desc: info.error_desc.unwrap_or_default(),
                    },
                });
            }
            _ => {}
        }
        if tokio::time::Instant::now() > deadline {
            return Err(Error::Qemu {
                capsule: capsule.to_string(),
                what: step,
                source: QemuError::MigrationTimeout {
                    file: file.to_path_buf(),
                },
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    transfer
        .finish(within)
        .await
        .map(drop)
        .map_err(stream_err(capsule, step, file))
}
