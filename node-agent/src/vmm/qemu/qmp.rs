//! A small typed QMP client (QEMU Machine Protocol, JSON lines over the
//! `-qmp unix:` socket): greeting, `qmp_capabilities`, then one command at a
//! time matched to its reply by `id`. Asynchronous events that arrive in
//! between are kept, so a caller can ask whether the guest shut itself
//! down. Every exchange is bounded by a timeout.
//!
//! Only the commands the QEMU backend needs have types here; each is one
//! [`Command`] impl with its argument and return types.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// Longest reply line accepted (QMP replies here are small).
const MAX_LINE: usize = 1 << 20;

/// Errors of the QMP client.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Connecting to the QMP socket failed.
    #[error("connect to QMP socket {}", socket.display())]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the socket failed, or QEMU closed it.
    #[error("QMP {command} on {}", socket.display())]
    Io {
        /// The command in flight (`greeting` before any).
        command: &'static str,
        /// The socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A line that is not the JSON we expect.
    #[error("QMP {command} on {}: unreadable reply {line:?}", socket.display())]
    Protocol {
        /// The command in flight.
        command: &'static str,
        /// The socket.
        socket: PathBuf,
        /// The line (truncated).
        line: String,
    },
    /// QEMU answered with an error object.
    #[error("QMP {command} refused: {class}: {desc}")]
    Command {
        /// The command.
        command: &'static str,
        /// QMP error class (`GenericError`, `CommandNotFound`, ...).
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// No reply in time.
    #[error("QMP {command} on {} timed out after {after:?}", socket.display())]
    Timeout {
        /// The command.
        command: &'static str,
        /// The socket.
        socket: PathBuf,
        /// The bound.
        after: Duration,
    },
}

/// One QMP command: its name, arguments and reply.
pub trait Command: Serialize {
    /// The `execute` name.
    const NAME: &'static str;
    /// The `return` value.
    type Reply: DeserializeOwned;
    /// Whether the command takes no arguments (sent without `arguments`).
    fn has_arguments(&self) -> bool {
        true
    }
}

macro_rules! no_args {
    ($ty:ident, $name:literal, $reply:ty, $doc:literal) => {
        #[doc = $doc]
        #[derive(Debug, Serialize)]
        pub struct $ty;
        impl Command for $ty {
            const NAME: &'static str = $name;
            type Reply = $reply;
            fn has_arguments(&self) -> bool {
                false
            }
        }
    };
}

/// An empty `return` object.
#[derive(Debug, Deserialize, PartialEq, Eq)]
pub struct Empty {}

no_args!(Stop, "stop", Empty, "Stops the vCPUs.");
no_args!(Cont, "cont", Empty, "Starts stopped vCPUs.");
no_args!(Quit, "quit", Empty, "Ends QEMU at once.");
no_args!(
    QueryStatus,
    "query-status",
    StatusInfo,
    "The run state of the VM."
);
no_args!(
    QueryMigrate,
    "query-migrate",
    MigrationInfo,
    "Progress of the running migration."
);
no_args!(
    QueryVersion,
    "query-version",
    VersionInfo,
    "QEMU's version."
);

no_args!(
    QueryKvm,
    "query-kvm",
    KvmInfo,
    "Whether KVM is present and in use."
);
no_args!(QueryPci, "query-pci", Vec<PciBus>, "The PCI tree.");
no_args!(
    QueryVirtio,
    "x-query-virtio",
    Vec<VirtioDevice>,
    "The virtio devices and their QOM paths (QEMU 7.2+, experimental)."
);

/// One device of `x-query-virtio`.
#[derive(Debug, Deserialize)]
pub struct VirtioDevice {
    /// Its backend's QOM path, for [`QueryVirtioStatus`].
    pub path: String,
    /// The model, e.g. `vhost-vsock` (vhost-user-vsock-pci's backend).
    pub name: String,
}

/// The state of one virtio device.
#[derive(Debug, Serialize)]
pub struct QueryVirtioStatus {
    /// [`VirtioDevice::path`].
    pub path: String,
}

impl Command for QueryVirtioStatus {
    const NAME: &'static str = "x-query-virtio-status";
    type Reply = VirtioStatus;
}

/// `x-query-virtio-status` reply (the fields we read).
#[derive(Debug, Deserialize)]
pub struct VirtioStatus {
    /// The vhost backend's rings are set up and running: the guest driver
    /// finished the device's setup (DRIVER_OK) and the VM runs.
    #[serde(rename = "vhost-started", default)]
    pub vhost_started: bool,
}

/// `query-kvm` reply.
#[derive(Debug, Deserialize, PartialEq, Eq)]
pub struct KvmInfo {
    /// KVM runs this VM.
    pub enabled: bool,
    /// KVM is available.
    pub present: bool,
}

/// One bus of `query-pci`.
#[derive(Debug, Deserialize)]
pub struct PciBus {
    /// Devices on it.
    pub devices: Vec<PciDevice>,
}

/// One device of `query-pci` (the fields we read).
#[derive(Debug, Deserialize)]
pub struct PciDevice {
    /// The `id=` it was created with.
    #[serde(default)]
    pub qdev_id: String,
    /// Devices behind it when it is a bridge or root port.
    #[serde(default)]
    pub pci_bridge: Option<PciBridge>,
}

/// The secondary side of a bridge.
#[derive(Debug, Deserialize)]
pub struct PciBridge {
    /// Devices behind the bridge.
    #[serde(default)]
    pub devices: Vec<PciDevice>,
}

impl PciBus {
    /// Every device on the bus and behind its bridges.
    pub fn all_devices(&self) -> Vec<&PciDevice> {
        fn walk<'a>(devs: &'a [PciDevice], out: &mut Vec<&'a PciDevice>) {
            for d in devs {
                out.push(d);
                if let Some(b) = &d.pci_bridge {
                    walk(&b.devices, out);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.devices, &mut out);
        out
    }
}

/// Hot-plugs a device.
#[derive(Debug, Serialize)]
pub struct DeviceAdd {
    /// Device model.
    pub driver: String,
    /// Its id.
    pub id: String,
    /// The chardev it uses.
    pub chardev: String,
    /// The bus (root port) it goes on.
    pub bus: String,
}

impl Command for DeviceAdd {
    const NAME: &'static str = "device_add";
    type Reply = Empty;
}

/// Asks the guest to release a device (completes asynchronously).
#[derive(Debug, Serialize)]
pub struct DeviceDel {
    /// The device id.
    pub id: String,
}

impl Command for DeviceDel {
    const NAME: &'static str = "device_del";
    type Reply = Empty;
}

/// Adds a chardev.
#[derive(Debug, Serialize)]
pub struct ChardevAdd {
    /// Its id.
    pub id: String,
    /// The backend, in QMP's tagged form.
    pub backend: serde_json::Value,
}

impl ChardevAdd {
    /// A client socket chardev connecting to `path`.
    pub fn unix_client(id: &str, path: &Path) -> Self {
        Self {
            id: id.to_string(),
            backend: serde_json::json!({
                "type": "socket",
                "data": {
                    "addr": {"type": "unix", "data": {"path": path.display().to_string()}},
                    "server": false
                }
            }),
        }
    }
}

/// `chardev-add` returns an object (pty path for pty chardevs).
#[derive(Debug, Deserialize)]
pub struct ChardevReturn {}

impl Command for ChardevAdd {
    const NAME: &'static str = "chardev-add";
    type Reply = ChardevReturn;
}

/// Removes a chardev no device uses.
#[derive(Debug, Serialize)]
pub struct ChardevRemove {
    /// Its id.
    pub id: String,
}

impl Command for ChardevRemove {
    const NAME: &'static str = "chardev-remove";
    type Reply = Empty;
}

/// `query-status` reply.
#[derive(Debug, Deserialize, PartialEq, Eq)]
pub struct StatusInfo {
    /// vCPUs running.
    pub running: bool,
    /// The run state (`running`, `paused`, `postmigrate`, `inmigrate`,
    /// `prelaunch`, `shutdown`, `guest-panicked`, ...).
    pub status: String,
}

/// `query-version` reply.
#[derive(Debug, Deserialize, PartialEq, Eq)]
pub struct VersionInfo {
    /// Numeric version.
    pub qemu: QemuVersion,
    /// Distribution suffix.
    pub package: String,
}

/// Major, minor, micro.
#[derive(Debug, Deserialize, PartialEq, Eq)]
pub struct QemuVersion {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Micro.
    pub micro: u32,
}

/// `query-migrate` reply (the fields we read).
#[derive(Debug, Deserialize, PartialEq, Eq)]
pub struct MigrationInfo {
    /// `none`, `setup`, `active`, `completed`, `failed`, `cancelled`, ...;
    /// absent before any migration.
    pub status: Option<String>,
    /// Why it failed.
    #[serde(rename = "error-desc")]
    pub error_desc: Option<String>,
}

/// Starts an outgoing migration to `uri` (`exec:` or `file:`).
#[derive(Debug, Serialize)]
pub struct Migrate {
    /// Destination.
    pub uri: String,
}

impl Command for Migrate {
    const NAME: &'static str = "migrate";
    type Reply = Empty;
}

/// Starts the incoming migration of a QEMU launched with `-incoming defer`.
#[derive(Debug, Serialize)]
pub struct MigrateIncoming {
    /// Source.
    pub uri: String,
}

impl Command for MigrateIncoming {
    const NAME: &'static str = "migrate-incoming";
    type Reply = Empty;
}

/// Migration parameters (only the bandwidth cap is set here).
#[derive(Debug, Serialize)]
pub struct MigrateSetParameters {
    /// Bytes per second; QEMU's default (128 MiB/s) would slow a local
    /// file write for no reason.
    #[serde(rename = "max-bandwidth")]
    pub max_bandwidth: u64,
}

impl Command for MigrateSetParameters {
    const NAME: &'static str = "migrate-set-parameters";
    type Reply = Empty;
}

/// An asynchronous QMP event, as received.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Event {
    /// `SHUTDOWN`, `STOP`, `RESUME`, `MIGRATION`, ...
    pub event: String,
    /// Event data.
    #[serde(default)]
    pub data: serde_json::Value,
}

impl Event {
    /// A `SHUTDOWN` the guest caused (poweroff, or reset with
    /// `-no-reboot`), as opposed to one the host asked for.
    pub fn is_guest_shutdown(&self) -> bool {
        self.event == "SHUTDOWN" && self.data.get("guest") == Some(&serde_json::Value::Bool(true))
    }
}

#[derive(Serialize)]
struct Execute<'a, A: Serialize> {
    execute: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    arguments: Option<&'a A>,
    id: u64,
}

#[derive(Deserialize)]
struct RawError {
    class: String,
    desc: String,
}

/// A connected, capability-negotiated QMP session.
#[derive(Debug)]
pub struct Qmp {
    socket: PathBuf,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    next_id: u64,
    timeout: Duration,
    events: Vec<Event>,
}

impl Qmp {
    /// Connects, reads the greeting and leaves negotiation mode, all within
    /// `timeout`, which then bounds every later command.
    pub async fn connect(socket: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let stream = tokio::time::timeout(timeout, UnixStream::connect(socket))
            .await
            .map_err(|_| QmpError::Timeout {
                command: "connect",
                socket: socket.to_path_buf(),
                after: timeout,
            })?
            .map_err(|source| QmpError::Connect {
                socket: socket.to_path_buf(),
                source,
            })?;
        let (r, w) = stream.into_split();
        let mut qmp = Self {
            socket: socket.to_path_buf(),
            reader: BufReader::new(r),
            writer: w,
            next_id: 1,
            timeout,
            events: Vec::new(),
        };
        let greeting = qmp.bounded("greeting", Self::read_value).await?;
        if greeting.get("QMP").is_none() {
            return Err(qmp.protocol("greeting", &greeting.to_string()));
        }
        qmp.execute_raw("qmp_capabilities", None::<&()>).await?;
        Ok(qmp)
    }

    /// Events received so far (and clears them).
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// Runs `cmd` and returns its typed reply.
    pub async fn execute<C: Command>(&mut self, cmd: &C) -> Result<C::Reply, QmpError> {
        let args = cmd.has_arguments().then_some(cmd);
        let value = self.execute_raw(C::NAME, args).await?;
        serde_json::from_value(value.clone())
            .map_err(|_| self.protocol(C::NAME, &value.to_string()))
    }

    async fn execute_raw<A: Serialize>(
        &mut self,
        name: &'static str,
        args: Option<&A>,
    ) -> Result<serde_json::Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut line = serde_json::to_vec(&Execute {
            execute: name,
            arguments: args,
            id,
        })
        .map_err(|_| self.protocol(name, "arguments do not serialize"))?;
        line.push(b'\n');
        let socket = self.socket.clone();
        let after = self.timeout;
        let exchange = async {
            self.writer
                .write_all(&line)
                .await
                .map_err(|source| QmpError::Io {
                    command: name,
                    socket: socket.clone(),
                    source,
                })?;
            loop {
                let v = self.read_value().await.map_err(|e| match e {
                    QmpError::Io { socket, source, .. } => QmpError::Io {
                        command: name,
                        socket,
                        source,
                    },
                    other => other,
                })?;
                if v.get("event").is_some() {
                    if let Ok(ev) = serde_json::from_value::<Event>(v) {
                        self.events.push(ev);
                    }
                    continue;
                }
                if v.get("id").and_then(serde_json::Value::as_u64) != Some(id) {
                    // A reply to an earlier, abandoned command.
                    continue;
                }
                if let Some(err) = v.get("error") {
                    let err: RawError = serde_json::from_value(err.clone())
                        .map_err(|_| self.protocol(name, &v.to_string()))?;
                    return Err(QmpError::Command {
                        command: name,
                        class: err.class,
                        desc: err.desc,
                    });
                }
                return match v.get("return") {
                    Some(r) => Ok(r.clone()),
                    None => Err(self.protocol(name, &v.to_string())),
                };
            }
        };
        let timeout_socket = socket.clone();
        tokio::time::timeout(after, exchange)
            .await
            .map_err(|_| QmpError::Timeout {
                command: name,
                socket: timeout_socket,
                after,
            })?
    }

    async fn bounded<T>(
        &mut self,
        what: &'static str,
        f: impl AsyncFnOnce(&mut Self) -> Result<T, QmpError>,
    ) -> Result<T, QmpError> {
        let after = self.timeout;
        let socket = self.socket.clone();
        tokio::time::timeout(after, f(self))
            .await
            .map_err(|_| QmpError::Timeout {
                command: what,
                socket,
                after,
            })?
    }

    /// Waits up to `within` for events (e.g. `SHUTDOWN` after the guest
    /// powers off); returns when the connection closes or time is up.
    pub async fn drain_events(&mut self, within: Duration) -> Vec<Event> {
        let _ = tokio::time::timeout(within, async {
            while let Ok(v) = self.read_value().await {
                if let Ok(ev) = serde_json::from_value::<Event>(v) {
                    self.events.push(ev);
                }
            }
        })
        .await;
        self.take_events()
    }

    async fn read_value(&mut self) -> Result<serde_json::Value, QmpError> {
        let mut line = String::new();
        let io = |source| QmpError::Io {
            command: "read",
            socket: self.socket.clone(),
            source,
        };
        let n = (&mut self.reader)
            .take(MAX_LINE as u64)
            .read_line(&mut line)
            .await
            .map_err(io)?;
        if n == 0 {
            return Err(QmpError::Io {
                command: "read",
                socket: self.socket.clone(),
                source: std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
            });
        }
        serde_json::from_str(line.trim()).map_err(|_| self.protocol("read", &line))
    }

    fn protocol(&self, command: &'static str, line: &str) -> QmpError {
        QmpError::Protocol {
            command,
            socket: self.socket.clone(),
            line: line.chars().take(200).collect(),
        }
    }
}

use tokio::io::AsyncReadExt as _;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_serialize_as_qmp_expects() {
        let v = serde_json::to_value(Execute {
            execute: Migrate::NAME,
            arguments: Some(&Migrate {
                uri: "exec:cat > /x".into(),
            }),
            id: 7,
        })
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"execute": "migrate", "arguments": {"uri": "exec:cat > /x"}, "id": 7})
        );
        let v = serde_json::to_value(Execute::<()> {
            execute: Stop::NAME,
            arguments: None,
            id: 1,
        })
        .unwrap();
        assert_eq!(v, serde_json::json!({"execute": "stop", "id": 1}));
        let v = serde_json::to_value(MigrateSetParameters {
            max_bandwidth: 1 << 40,
        })
        .unwrap();
        assert_eq!(v, serde_json::json!({"max-bandwidth": 1u64 << 40}));
    }

    #[test]
    fn guest_shutdown_is_told_from_host_quit() {
        let guest: Event = serde_json::from_str(
            r#"{"event":"SHUTDOWN","data":{"guest":true,"reason":"guest-shutdown"}}"#,
        )
        .unwrap();
        let host: Event = serde_json::from_str(
            r#"{"event":"SHUTDOWN","data":{"guest":false,"reason":"host-qmp-quit"}}"#,
        )
        .unwrap();
        assert!(guest.is_guest_shutdown());
        assert!(!host.is_guest_shutdown());
    }
}
