//! Typed Cloud Hypervisor API: one type per endpoint with its request and
//! response bodies (the model is cloud-hypervisor's own `ApiAction`), and the
//! JSON bodies as the agent sends them.
//!
//! Field names follow `vmm/src/vm_config.rs`; where the OpenAPI spec and the
//! implementation disagree (shared/reference/cloud-hypervisor-notes.md §16)
//! the implementation wins and the test `vmm_openapi` documents the
//! deviation. Optional fields are skipped when `None`, so CH applies its own
//! default — except where a default is wrong for us, which the builders set
//! explicitly (`thp: false`, `nested: false`, `console: Off`).
//! Response types tolerate missing and unknown fields: CH omits unset fields
//! since v53 and adds fields in most releases.
//!
//! Longer than our other files on purpose: it mirrors CH's config and
//! endpoint list one type each, and reads best as one table beside
//! `vm_config.rs`.
//!
//! Why this file is long: one type per Cloud Hypervisor endpoint with its
//! request and response bodies, the whole typed API in one place.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Every API call the agent makes, named as in the URL.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// `GET vmm.ping`: legal at any time, also with no VM.
    VmmPing,
    /// `PUT vmm.shutdown`: deletes the VM and makes the process exit.
    VmmShutdown,
    /// `PUT vm.create`: only with no VM; stores the config unvalidated.
    VmCreate,
    /// `PUT vm.boot`: only in `Created`; validates and starts vCPUs.
    VmBoot,
    /// `PUT vm.shutdown`: from `Running`/`Paused` back to `Created`.
    VmShutdown,
    /// `PUT vm.delete`: always legal (idempotent).
    VmDelete,
    /// `PUT vm.pause`: only in `Running`.
    VmPause,
    /// `PUT vm.resume`: only in `Paused`.
    VmResume,
    /// `PUT vm.reboot`: only when booted.
    VmReboot,
    /// `PUT vm.power-button`: only when booted; the guest decides.
    VmPowerButton,
    /// `PUT vm.snapshot`: only in `Paused`, into an existing empty dir.
    VmSnapshot,
    /// `PUT vm.restore`: only in a VMM with no VM; net fds by SCM_RIGHTS.
    VmRestore,
    /// `GET vm.info`: needs a VM.
    VmInfo,
    /// `GET vm.counters`: needs a VM.
    VmCounters,
    /// `PUT vm.add-net`: cold (before boot) or hotplug; TAP fds by SCM_RIGHTS.
    VmAddNet,
    /// `PUT vm.add-disk`: cold or hotplug.
    VmAddDisk,
    /// `PUT vm.remove-device`: needs the guest to ACK, so not while paused.
    VmRemoveDevice,
    /// `PUT vm.resize`: vCPUs, RAM or balloon.
    VmResize,
}

/// HTTP method of an endpoint (CH accepts only these two).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// `GET`.
    Get,
    /// `PUT`.
    Put,
}

impl Method {
    /// The method token.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
        }
    }
}

/// Timeout class of a call (see `client::Timeouts`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallClass {
    /// Reads that should answer at once — unless CH is busy with a long
    /// call, since requests are serialised (ping, info, counters).
    Query,
    /// State changes that do not scale with guest RAM.
    Control,
    /// Snapshot and restore: they scale with guest RAM.
    Bulk,
    /// `vmm.shutdown`: the process exits right after answering.
    Exit,
}

impl Action {
    /// The endpoint name, as in `/api/v1/<name>`.
    pub fn name(self) -> &'static str {
        use Action::*;
        match self {
            VmmPing => "vmm.ping",
            VmmShutdown => "vmm.shutdown",
            VmCreate => "vm.create",
            VmBoot => "vm.boot",
            VmShutdown => "vm.shutdown",
            VmDelete => "vm.delete",
            VmPause => "vm.pause",
            VmResume => "vm.resume",
            VmReboot => "vm.reboot",
            VmPowerButton => "vm.power-button",
            VmSnapshot => "vm.snapshot",
            VmRestore => "vm.restore",
            VmInfo => "vm.info",
            VmCounters => "vm.counters",
            VmAddNet => "vm.add-net",
            VmAddDisk => "vm.add-disk",
            VmRemoveDevice => "vm.remove-device",
            VmResize => "vm.resize",
        }
    }

    /// The request path.
    pub fn path(self) -> String {
        format!("/api/v1/{}", self.name())
    }

    /// The HTTP method.
    pub fn method(self) -> Method {
        match self {
            Action::VmmPing | Action::VmInfo | Action::VmCounters => Method::Get,
            _ => Method::Put,
        }
    }

    /// Its timeout class.
    pub fn class(self) -> CallClass {
        use Action::*;
        match self {
            VmmPing | VmInfo | VmCounters => CallClass::Query,
            VmSnapshot | VmRestore => CallClass::Bulk,
            VmmShutdown => CallClass::Exit,
            _ => CallClass::Control,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A request body: `None` sends no body at all (CH rejects a body on the
/// endpoints that take none).
pub trait RequestBody {
    /// The encoded body.
    fn to_body(&self) -> Result<Option<Vec<u8>>, serde_json::Error>;
}

impl RequestBody for () {
    fn to_body(&self) -> Result<Option<Vec<u8>>, serde_json::Error> {
        Ok(None)
    }
}

/// A response body decoded from a 2xx answer.
pub trait ResponseBody: Sized {
    /// Decodes `body` (empty for 204).
    fn from_body(body: &[u8]) -> Result<Self, serde_json::Error>;
}

impl ResponseBody for () {
    /// Anything is accepted: `vmm.shutdown` answers 200 with an empty body
    /// where the spec says 204.
    fn from_body(_: &[u8]) -> Result<Self, serde_json::Error> {
        Ok(())
    }
}

impl ResponseBody for Option<PciDeviceInfo> {
    /// `vm.add-*` answers 200 with `{id,bdf}` when booted, 204 when cold.
    fn from_body(body: &[u8]) -> Result<Self, serde_json::Error> {
        if body.iter().all(u8::is_ascii_whitespace) {
            Ok(None)
        } else {
            serde_json::from_slice(body).map(Some)
        }
    }
}

macro_rules! json_request {
    ($($t:ty),*) => {$(
        impl RequestBody for $t {
            fn to_body(&self) -> Result<Option<Vec<u8>>, serde_json::Error> {
                serde_json::to_vec(self).map(Some)
            }
        }
    )*};
}
json_request!(
    VmConfig,
    NetConfig,
    DiskConfig,
    VmSnapshotConfig,
    RestoreConfig,
    VmRemoveDevice,
    VmResize
);

macro_rules! json_response {
    ($($t:ty),*) => {$(
        impl ResponseBody for $t {
            fn from_body(body: &[u8]) -> Result<Self, serde_json::Error> {
                serde_json::from_slice(body)
            }
        }
    )*};
}
json_response!(VmmPingResponse, VmInfo, VmCounters);

/// One API endpoint: its action and typed bodies.
pub trait Endpoint {
    /// The action (path, method, timeout class).
    const ACTION: Action;
    /// What is sent.
    type Request: RequestBody;
    /// What comes back on success.
    type Response: ResponseBody;
}

macro_rules! endpoint {
    ($(#[$doc:meta] $name:ident => $action:ident, $req:ty, $resp:ty;)*) => {$(
        #[$doc]
        #[derive(Clone, Copy, Debug)]
        pub struct $name;
        impl Endpoint for $name {
            const ACTION: Action = Action::$action;
            type Request = $req;
            type Response = $resp;
        }
    )*};
}

/// One unit type per endpoint, named after the endpoint (used as
/// `client.call::<endpoint::VmInfo>(&())`).
pub mod endpoint {
    use super::{
        Action, DiskConfig, Endpoint, NetConfig, PciDeviceInfo, RestoreConfig, VmConfig,
        VmSnapshotConfig, VmmPingResponse,
    };

    endpoint! {
        /// `GET /api/v1/vmm.ping`.
        VmmPing => VmmPing, (), VmmPingResponse;
        /// `PUT /api/v1/vmm.shutdown`.
        VmmShutdown => VmmShutdown, (), ();
        /// `PUT /api/v1/vm.create`.
        VmCreate => VmCreate, VmConfig, ();
        /// `PUT /api/v1/vm.boot`.
        VmBoot => VmBoot, (), ();
        /// `PUT /api/v1/vm.shutdown`.
        VmShutdown => VmShutdown, (), ();
        /// `PUT /api/v1/vm.delete`.
        VmDelete => VmDelete, (), ();
        /// `PUT /api/v1/vm.pause`.
        VmPause => VmPause, (), ();
        /// `PUT /api/v1/vm.resume`.
        VmResume => VmResume, (), ();
        /// `PUT /api/v1/vm.reboot`.
        VmReboot => VmReboot, (), ();
        /// `PUT /api/v1/vm.power-button`.
        VmPowerButton => VmPowerButton, (), ();
        /// `PUT /api/v1/vm.snapshot`.
        VmSnapshot => VmSnapshot, VmSnapshotConfig, ();
        /// `PUT /api/v1/vm.restore` (+ net fds).
        VmRestore => VmRestore, RestoreConfig, ();
        /// `GET /api/v1/vm.info`.
        VmInfo => VmInfo, (), super::VmInfo;
        /// `GET /api/v1/vm.counters`.
        VmCounters => VmCounters, (), super::VmCounters;
        /// `PUT /api/v1/vm.add-net` (+ TAP fds).
        VmAddNet => VmAddNet, NetConfig, Option<PciDeviceInfo>;
        /// `PUT /api/v1/vm.add-disk`.
        VmAddDisk => VmAddDisk, DiskConfig, Option<PciDeviceInfo>;
        /// `PUT /api/v1/vm.remove-device`.
        VmRemoveDevice => VmRemoveDevice, super::VmRemoveDevice, ();
        /// `PUT /api/v1/vm.resize`.
        VmResize => VmResize, super::VmResize, ();
    }
}

// ---- request bodies -------------------------------------------------------

/// `VmConfig`: what `vm.create` stores.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VmConfig {
    /// Kernel and command line.
    pub payload: PayloadConfig,
    /// vCPUs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpus: Option<CpusConfig>,
    /// RAM.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryConfig>,
    /// Block devices.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskConfig>,
    /// NICs. The agent adds fd-backed NICs with `vm.add-net` instead,
    /// because `vm.create` ignores fds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub net: Vec<NetConfig>,
    /// Entropy source.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rng: Option<RngConfig>,
    /// Legacy serial port (ttyS0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial: Option<ConsoleConfig>,
    /// virtio-console (hvc0); CH's API default is `Tty`, which a daemon
    /// must not use.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub console: Option<ConsoleConfig>,
    /// vsock to the guest agent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    /// Memory balloon.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonConfig>,
    /// SMBIOS and PCI segments.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub platform: Option<PlatformConfig>,
    /// Apply Landlock at `vm.create` (v41+).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub landlock_enable: Option<bool>,
    /// Paths Landlock allows beyond those in this config (v41+). `vm.info`
    /// echoes `null` when none were given.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_empty"
    )]
    pub landlock_rules: Vec<LandlockConfig>,
}

/// Reads a JSON `null` list as an empty one.
fn null_as_empty<'de, D, T>(de: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(de)?.unwrap_or_default())
}

/// `LandlockConfig`: one path CH may use under Landlock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LandlockConfig {
    /// File or directory.
    pub path: String,
    /// `r`, `w` or `rw`.
    pub access: String,
}

/// `PayloadConfig`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PayloadConfig {
    /// Absolute path of an ELF vmlinux (PVH) or bzImage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// Kernel command line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// Initramfs path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<String>,
    /// Firmware path (exclusive with `kernel`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub firmware: Option<String>,
}

/// `CpusConfig`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CpusConfig {
    /// vCPUs at boot.
    pub boot_vcpus: u32,
    /// vCPUs the guest may grow to.
    pub max_vcpus: u32,
    /// Nested virtualisation; CH defaults to `true` (v50+).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nested: Option<bool>,
}

/// `MemoryConfig`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemoryConfig {
    /// Bytes.
    pub size: u64,
    /// memfd `MAP_SHARED` (vhost-user, local migration).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared: Option<bool>,
    /// Hugepage backing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hugepages: Option<bool>,
    /// Transparent huge pages; CH defaults to `true`, which defeats sparse
    /// snapshots (wrenn-go-notes §11 #15), so the agent always sends it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thp: Option<bool>,
    /// KSM.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mergeable: Option<bool>,
}

/// `DiskConfig`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DiskConfig {
    /// Absolute path of the image or block device.
    pub path: String,
    /// Device id (user ids must not start with `__`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Read-only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub readonly: Option<bool>,
    /// O_DIRECT.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direct: Option<bool>,
    /// Guest-visible serial.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// `Raw` for our dm devices: no probing (v51 security default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_type: Option<ImageType>,
    /// Queues.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_queues: Option<u32>,
    /// Queue depth.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_size: Option<u32>,
    /// I/O rate limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limiter_config: Option<RateLimiterConfig>,
    /// Follow a qcow2 backing file (off by default since v51).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_files: Option<bool>,
}

/// `ImageType`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImageType {
    /// Raw image or block device.
    Raw,
    /// qcow2.
    Qcow2,
    /// Fixed-size VHD. Never sent; CH may write it into a snapshot's
    /// config, which a restore must read back.
    FixedVhd,
    /// VHDX. Never sent, as `FixedVhd`.
    Vhdx,
    /// Probed by CH. Never sent, as `FixedVhd`.
    Unknown,
}

/// `NetConfig`. TAP fds never go in the JSON (CH ignores them there); they
/// ride as SCM_RIGHTS, one per queue pair.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NetConfig {
    /// Device id, e.g. `net0`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// TAP name in CH's netns (when not passing fds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// Guest MAC.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Host-side MAC (CH-created TAPs only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_mac: Option<String>,
    /// MTU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Queues (2 per pair, even, `num_queues / 2 <= boot_vcpus`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_queues: Option<u32>,
    /// Queue depth.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_size: Option<u32>,
    /// Rate limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limiter_config: Option<RateLimiterConfig>,
    /// What CH echoes back in `vm.info` for fd-backed NICs. Never sent: it
    /// is not in the spec and CH ignores it in requests.
    #[serde(default, skip_serializing)]
    pub fds: Option<Vec<i32>>,
}

/// `RateLimiterConfig`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RateLimiterConfig {
    /// Bytes per refill period.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    /// Operations per refill period.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

/// `TokenBucket`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenBucket {
    /// Capacity.
    pub size: u64,
    /// Initial burst.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    /// Refill period in milliseconds.
    pub refill_time: u64,
}

/// `RngConfig`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RngConfig {
    /// Entropy source path.
    pub src: String,
}

/// `ConsoleMode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsoleMode {
    /// Disabled.
    Off,
    /// A pty (path reported in `vm.info`).
    Pty,
    /// CH's own stdio; never for a daemon.
    Tty,
    /// Written to `file`.
    File,
    /// A Unix listener at `socket`.
    Socket,
    /// Discarded.
    Null,
}

/// `ConsoleConfig` / `SerialConfig`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConsoleConfig {
    /// Mode.
    pub mode: ConsoleMode,
    /// File for `File`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// Socket for `Socket`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
}

/// `VsockConfig`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VsockConfig {
    /// Guest CID, >= 3.
    pub cid: u64,
    /// Host Unix socket CH binds (must not exist yet).
    pub socket: String,
    /// Device id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// `BalloonConfig`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BalloonConfig {
    /// Bytes taken from the guest.
    pub size: u64,
    /// Give memory back under guest pressure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deflate_on_oom: Option<bool>,
    /// Free page reporting (keeps snapshots small).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free_page_reporting: Option<bool>,
}

/// `PlatformConfig` (the fields we set).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PlatformConfig {
    /// SMBIOS system UUID (the capsule UID).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_uuid: Option<String>,
    /// SMBIOS OEM strings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub oem_strings: Vec<String>,
}

/// `VmSnapshotConfig`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmSnapshotConfig {
    /// `file:///abs/empty-dir`.
    pub destination_url: String,
}

/// `MemoryRestoreMode`: PascalCase in JSON (lowercase gives 400).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryRestoreMode {
    /// Read all of `memory-ranges` before returning.
    Copy,
    /// userfaultfd, v52+.
    OnDemand,
}

/// One entry of `RestoreConfig.net_fds` (v40+, not in the spec).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RestoredNetFds {
    /// The NIC id from the snapshot's `config.json`.
    pub id: String,
    /// How many of the SCM_RIGHTS fds (in order) belong to it.
    pub num_fds: u32,
}

/// `RestoreConfig`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RestoreConfig {
    /// `file:///abs/snapshot-dir`.
    pub source_url: String,
    /// Touch all pages up front (not with `OnDemand`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefault: Option<bool>,
    /// v52+.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_restore_mode: Option<MemoryRestoreMode>,
    /// Resume right after restoring (v52+); otherwise the VM is `Paused`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume: Option<bool>,
    /// New TAP fds for fd-backed NICs; every such NIC must be listed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub net_fds: Vec<RestoredNetFds>,
}

/// `VmRemoveDevice`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmRemoveDevice {
    /// Device id.
    pub id: String,
}

/// `VmResize`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VmResize {
    /// vCPUs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub desired_vcpus: Option<u32>,
    /// RAM in bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub desired_ram: Option<u64>,
    /// Balloon size in bytes (memory taken from the guest).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub desired_balloon: Option<u64>,
}

// ---- response bodies ------------------------------------------------------

/// `VmmPingResponse`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct VmmPingResponse {
    /// Crate version (one major ahead of the release on `main`).
    #[serde(default)]
    pub version: String,
    /// `git describe`, e.g. `v53.0-246-gae44c2971`: use this for gating.
    #[serde(default)]
    pub build_version: Option<String>,
    /// The VMM's pid (v32+).
    #[serde(default)]
    pub pid: Option<i64>,
    /// Build features (v36+).
    #[serde(default)]
    pub features: Vec<String>,
}

/// `VmState`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum VmState {
    /// Created or shut down (config kept).
    Created,
    /// vCPUs running.
    Running,
    /// Rarely seen: a shut-down VM reads `Created`.
    Shutdown,
    /// vCPUs stopped.
    Paused,
    /// Debugger breakpoint.
    BreakPoint,
}

/// `VmInfo`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct VmInfo {
    /// The normalised config: what CH understood.
    pub config: serde_json::Value,
    /// Current state.
    pub state: VmState,
    /// RAM minus balloon plus hotplugged.
    #[serde(default)]
    pub memory_actual_size: Option<u64>,
    /// Device id → node.
    #[serde(default)]
    pub device_tree: BTreeMap<String, DeviceNode>,
}

impl VmInfo {
    /// The config decoded into our type (unknown fields dropped).
    pub fn typed_config(&self) -> Result<VmConfig, serde_json::Error> {
        serde_json::from_value(self.config.clone())
    }
}

/// `DeviceNode`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct DeviceNode {
    /// Id.
    #[serde(default)]
    pub id: String,
    /// Children ids.
    #[serde(default)]
    pub children: Vec<String>,
    /// Parent id.
    #[serde(default)]
    pub parent: Option<String>,
    /// PCI address.
    #[serde(default)]
    pub pci_bdf: Option<serde_json::Value>,
}

/// `VmCounters`: device id → counter → value.
pub type VmCounters = BTreeMap<String, BTreeMap<String, u64>>;

/// `PciDeviceInfo` (hotplug answer).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct PciDeviceInfo {
    /// Device id.
    pub id: String,
    /// PCI address, e.g. `0000:00:04.0`.
    pub bdf: String,
}

// ---- builders -------------------------------------------------------------

/// What a capsule VM needs; [`build_vm_config`] turns it into a `VmConfig`.
#[derive(Clone, Debug, PartialEq)]
pub struct VmSpec {
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// Kernel path.
    pub kernel: String,
    /// Kernel command line.
    pub cmdline: String,
    /// Root disk (the capsule's dm device).
    pub root_disk: String,
    /// Serial log file; `None` turns the serial port off.
    pub serial_file: Option<String>,
    /// vsock CID and host socket.
    pub vsock: Option<(u64, String)>,
    /// SMBIOS system UUID.
    pub system_uuid: Option<String>,
}

impl VmSpec {
    /// A VM of `vcpus` and `memory_bytes` booting `kernel` with `cmdline`
    /// from `root_disk`, with no serial port, vsock or SMBIOS UUID (set
    /// those fields after, when wanted).
    pub fn new(
        vcpus: u32,
        memory_bytes: u64,
        kernel: &str,
        cmdline: &str,
        root_disk: &str,
    ) -> Self {
        Self {
            vcpus,
            memory_bytes,
            kernel: kernel.into(),
            cmdline: cmdline.into(),
            root_disk: root_disk.into(),
            serial_file: None,
            vsock: None,
            system_uuid: None,
        }
    }
}

/// Builds the `vm.create` body for `spec`. NICs are added later with
/// `vm.add-net` (fds). Wrong CH defaults are overridden: `thp`, `nested`
/// and `console` (Tty) are always sent.
pub fn build_vm_config(spec: &VmSpec) -> VmConfig {
    VmConfig {
        payload: PayloadConfig {
            kernel: Some(spec.kernel.clone()),
            cmdline: Some(spec.cmdline.clone()),
            ..PayloadConfig::default()
        },
        cpus: Some(CpusConfig {
            boot_vcpus: spec.vcpus,
            max_vcpus: spec.vcpus,
            nested: Some(false),
        }),
        memory: Some(MemoryConfig {
            size: spec.memory_bytes,
            shared: Some(false),
            hugepages: None,
            thp: Some(false),
            mergeable: None,
        }),
        disks: vec![DiskConfig {
            path: spec.root_disk.clone(),
            id: Some("rootfs".into()),
            readonly: Some(false),
            image_type: Some(ImageType::Raw),
            ..DiskConfig::default()
        }],
        net: Vec::new(),
        rng: Some(RngConfig {
            src: "/dev/urandom".into(),
        }),
        serial: Some(match &spec.serial_file {
            Some(f) => ConsoleConfig {
                mode: ConsoleMode::File,
                file: Some(f.clone()),
                socket: None,
            },
            None => ConsoleConfig {
                mode: ConsoleMode::Off,
                file: None,
                socket: None,
            },
        }),
        console: Some(ConsoleConfig {
            mode: ConsoleMode::Off,
            file: None,
            socket: None,
        }),
        vsock: spec.vsock.as_ref().map(|(cid, socket)| VsockConfig {
            cid: *cid,
            socket: socket.clone(),
            id: Some("vsock0".into()),
        }),
        balloon: Some(BalloonConfig {
            size: 0,
            deflate_on_oom: Some(true),
            free_page_reporting: Some(true),
        }),
        platform: spec.system_uuid.as_ref().map(|u| PlatformConfig {
            system_uuid: Some(u.clone()),
            oem_strings: Vec::new(),
        }),
        landlock_enable: None,
        landlock_rules: Vec::new(),
    }
}

/// Builds the `vm.add-net` body for a NIC backed by `queue_pairs` TAP fds.
pub fn build_tap_fd_net(id: &str, mac: &str, queue_pairs: u32) -> NetConfig {
    NetConfig {
        id: Some(id.to_string()),
        mac: Some(mac.to_string()),
        num_queues: Some(queue_pairs.max(1) * 2),
        queue_size: Some(256),
        ..NetConfig::default()
    }
}

/// Builds a `file://` URL for an absolute directory.
pub fn build_file_url(dir: &std::path::Path) -> String {
    format!("file://{}", dir.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_methods() {
        assert_eq!(Action::VmAddNet.path(), "/api/v1/vm.add-net");
        assert_eq!(Action::VmInfo.method(), Method::Get);
        assert_eq!(Action::VmmShutdown.method(), Method::Put);
        assert_eq!(endpoint::VmRestore::ACTION.class(), CallClass::Bulk);
    }

    #[test]
    fn wrong_defaults_are_always_sent() {
        let cfg = build_vm_config(&VmSpec::new(
            2,
            1 << 30,
            "/k",
            "console=ttyS0",
            "/dev/mapper/wrenn-x",
        ));
        let v = serde_json::to_value(&cfg).unwrap();
        assert_eq!(v["memory"]["thp"], false);
        assert_eq!(v["cpus"]["nested"], false);
        assert_eq!(v["console"]["mode"], "Off");
        assert!(v.get("net").is_none());
    }

    #[test]
    fn net_fds_are_never_serialised() {
        let mut net = build_tap_fd_net("net0", "02:00:00:00:00:01", 1);
        net.fds = Some(vec![5]);
        let v = serde_json::to_value(&net).unwrap();
        assert!(v.get("fds").is_none());
        assert_eq!(v["num_queues"], 2);
    }

    #[test]
    fn add_net_answer_is_optional() {
        assert_eq!(<Option<PciDeviceInfo>>::from_body(b"").unwrap(), None);
        let got =
            <Option<PciDeviceInfo>>::from_body(br#"{"id":"net9","bdf":"0000:00:04.0"}"#).unwrap();
        assert_eq!(got.unwrap().bdf, "0000:00:04.0");
    }
}
