//! The vsock workaround over QMP. QEMU 7.2 refuses to migrate a
//! vhost-user-vsock device, and vhost-device-vsock 0.3 stops serving for
//! good after some host traffic; so the device sits on its own PCIe root
//! port and is unplugged and plugged again around migrations and after a
//! silent resume. This file holds the QMP side of that and the record of
//! which helper serves a capsule now; starting a fresh helper is
//! `QemuMachine`'s.

use std::path::Path;
use std::time::Duration;

use super::args::{VSOCK_PORT_ID, run_dir};
use super::error::QemuError;
use super::qmp::{self, Qmp, QmpError};
use crate::vmm::Error;
use crate::vmm::machine::MachineHandle;
use crate::vmm::process::ProcessIdentity;

/// The vsock helper running now: a respawn replaces the one the supervisor
/// journaled with the handle, so adoption reads this first.
pub(super) const HELPER_FILE: &str = "helper.json";
/// How long a vsock helper gets to re-create its socket after an unplug.
const HELPER_RELISTEN: Duration = Duration::from_secs(2);
/// Pause between two looks at the vsock device while the guest sets it up.
const VSOCK_POLL: Duration = Duration::from_millis(50);

/// Whether the helper listens on `vhost` again within a moment of an
/// unplug. vhost-device-vsock 0.3 does not always (seen after a second
/// unplug); the caller then starts a fresh one, which always listens.
pub(super) async fn relistens(vhost: &Path) -> bool {
    let back = tokio::time::Instant::now() + HELPER_RELISTEN;
    while !vhost.exists() && tokio::time::Instant::now() < back {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    vhost.exists()
}

/// Plugs vsock device `n` into the root port, retrying `chardev-add` for
/// up to `within` while the helper re-creates its socket.
pub(super) async fn plug(
    q: &mut Qmp,
    capsule: &str,
    vhost: &Path,
    n: u32,
    within: Duration,
) -> Result<(), Error> {
    let err = |source| Error::Qmp {
        capsule: capsule.to_string(),
        step: "plug vsock",
        source,
    };
    let chardev = format!("vsock-chr{n}");
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let add = qmp::ChardevAdd::unix_client(&chardev, vhost);
        match q.execute(&add).await {
            Ok(_) => break,
            Err(e)
                if tokio::time::Instant::now() < deadline
                    && matches!(e, QmpError::Command { .. }) =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(source) => return Err(err(source)),
        }
    }
    q.execute(&qmp::DeviceAdd {
        driver: "vhost-user-vsock-pci".into(),
        id: format!("vsock{n}"),
        chardev,
        bus: VSOCK_PORT_ID.into(),
    })
    .await
    .map_err(err)?;
    Ok(())
}

/// Unplugs whatever vsock device is on the root port and waits up to
/// `within` for the guest to release it; the guest must run to do so.
pub(super) async fn unplug(q: &mut Qmp, capsule: &str, within: Duration) -> Result<(), Error> {
    let err = |source| Error::Qmp {
        capsule: capsule.to_string(),
        step: "unplug vsock",
        source,
    };
    let Some((id, chardev)) = current(q).await.map_err(err)? else {
        return Ok(());
    };
    q.execute(&qmp::DeviceDel { id: id.clone() })
        .await
        .map_err(err)?;
    let deadline = tokio::time::Instant::now() + within;
    while current(q).await.map_err(err)?.is_some() {
        if tokio::time::Instant::now() > deadline {
            return Err(Error::Qemu {
                capsule: capsule.to_string(),
                what: "unplug vsock",
                source: QemuError::Unplug { id, within },
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if let Some(chardev) = chardev {
        // The device is gone; its chardev may already be too.
        let _ = q.execute(&qmp::ChardevRemove { id: chardev }).await;
    }
    Ok(())
}

/// The id and chardev of the vsock device on its root port, if any.
pub(super) async fn current(q: &mut Qmp) -> Result<Option<(String, Option<String>)>, QmpError> {
    let buses = q.execute(&qmp::QueryPci).await?;
    for bus in buses {
        for dev in bus.all_devices() {
            // `vsock<N>`, not the root port it sits on.
            if let Some(n) = dev.qdev_id.strip_prefix("vsock")
                && !n.is_empty()
                && n.bytes().all(|b| b.is_ascii_digit())
            {
                return Ok(Some((dev.qdev_id.clone(), Some(format!("vsock-chr{n}")))));
            }
        }
    }
    Ok(None)
}

/// vhost-device-vsock 0.3 stops serving for good when a host connection
/// reaches it while the device's rings are not running (its worker thread
/// ends on the first error, and the process stays): during the guest
/// driver's setup of the device at boot or after a restore's hot-plug, and
/// while the VM is stopped. So no dial until QEMU reports the vhost backend
/// started. QMP answers under the lock the device setup holds, so
/// "started" means the setup is done.
pub(super) async fn wait_started(
    q: &mut Qmp,
    capsule: &str,
    within: Duration,
) -> Result<(), Error> {
    let until = tokio::time::Instant::now() + within;
    let qerr = |source| Error::Qmp {
        capsule: capsule.to_string(),
        step: "wait for vsock",
        source,
    };
    loop {
        let devices = q.execute(&qmp::QueryVirtio).await.map_err(qerr)?;
        if let Some(dev) = devices.iter().find(|d| d.name == "vhost-vsock") {
            let status = q
                .execute(&qmp::QueryVirtioStatus {
                    path: dev.path.clone(),
                })
                .await
                .map_err(qerr)?;
            if status.vhost_started {
                return Ok(());
            }
        }
        if tokio::time::Instant::now() >= until {
            return Err(Error::Qemu {
                capsule: capsule.to_string(),
                what: "wait for vsock",
                source: QemuError::VsockSetup { within },
            });
        }
        tokio::time::sleep(VSOCK_POLL).await;
    }
}

/// The helpers of `vm`: those a respawn recorded, else those journaled.
pub(super) fn current_helpers(vm: &MachineHandle) -> Vec<ProcessIdentity> {
    std::fs::read(run_dir(vm).join(HELPER_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| vm.helpers.clone())
}

/// Records `helper` as the one serving `vm`, for adoption after an agent
/// restart.
pub(super) fn record_helper(vm: &MachineHandle, helper: ProcessIdentity) -> Result<(), Error> {
    let fail = |source| Error::Qemu {
        capsule: vm.capsule.clone(),
        what: "restart the vsock helper",
        source,
    };
    let dir = run_dir(vm);
    let record =
        serde_json::to_vec(&[helper]).map_err(|e| fail(QemuError::EncodeHelperRecord(e)))?;
    // Rename over the old record, so adoption never reads half of it.
    let (tmp, path) = (
        dir.join(format!(".{HELPER_FILE}.tmp")),
        dir.join(HELPER_FILE),
    );
    std::fs::write(&tmp, &record)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|source| fail(QemuError::WriteHelperRecord { path, source }))
}

/// `--guest-cid` from a running helper's command line.
pub(super) fn helper_cid(proc_root: &Path, pid: i32) -> Option<u32> {
    let cmdline = std::fs::read(proc_root.join(pid.to_string()).join("cmdline")).ok()?;
    let mut args = cmdline.split(|b| *b == 0);
    while let Some(a) = args.next() {
        if a == b"--guest-cid" {
            return std::str::from_utf8(args.next()?).ok()?.parse().ok();
        }
    }
    None
}
