//! Journal format 1, as agents before the typed record wrote it: loose
//! flags and empty strings for "none". Read only, converted to the current
//! [`Record`] with the same meaning, so an agent upgrade loses nothing a
//! journal says may exist on the node.

use std::path::PathBuf;

use serde::Deserialize;
use wrenn_crds::reason::Reason;

use super::{DiskHeld, Held, InFlight, NetAddr, NetHeld, RECORD_VERSION, Record, VmHeld};
use crate::capsule::model::{CapsuleSpec, State};
use crate::guest::GuestToken;
use crate::vmm::MachineHandle;

/// A format-1 journal.
#[derive(Deserialize)]
pub(super) struct RecordV1 {
    uid: String,
    spec: CapsuleSpec,
    state: State,
    prior: Option<State>,
    disk: bool,
    disk_path: Option<PathBuf>,
    #[serde(default)]
    base_image: Option<PathBuf>,
    network: bool,
    ip: Option<String>,
    slot: Option<u32>,
    vm_starting: bool,
    vm: Option<MachineHandle>,
    suspended_image: bool,
    snapshot_in_progress: Option<String>,
    started_unix_nanos: i64,
    message: String,
    reason: String,
    #[serde(default)]
    internal: bool,
    #[serde(default)]
    netns: Option<PathBuf>,
    #[serde(default)]
    guest_token: Option<GuestToken>,
}

impl From<RecordV1> for Record {
    fn from(r: RecordV1) -> Self {
        let disk = r.disk.then_some(DiskHeld { path: r.disk_path });
        // Format 1 kept the address and slot together and the namespace
        // beside them (stale once the network went): only a claimed
        // network's are meaningful.
        let net = r.network.then_some(NetHeld {
            addr: match (r.ip, r.slot) {
                (Some(ip), Some(slot)) => Some(NetAddr {
                    ip,
                    slot,
                    netns: r.netns,
                }),
                _ => None,
            },
            host_ports: Vec::new(),
        });
        let vm = match (r.vm, r.vm_starting) {
            (Some(vm), _) => VmHeld::Running(vm),
            (None, true) => VmHeld::Starting,
            (None, false) => VmHeld::None,
        };
        // `suspended_image` outlived its suspend in format 1; only a
        // suspend in flight reads it.
        let in_flight = match (r.snapshot_in_progress, r.state) {
            (Some(id), _) => Some(InFlight::Snapshot { id }),
            (None, State::Suspending) => Some(InFlight::Suspend {
                image_written: r.suspended_image,
            }),
            (None, _) => None,
        };
        let (reason, message) = reason_of(&r.reason, r.message);
        Record {
            version: RECORD_VERSION,
            uid: r.uid,
            spec: r.spec,
            state: r.state,
            prior: r.prior,
            base_image: r.base_image,
            held: Held { disk, net, vm },
            in_flight,
            started_unix_nanos: r.started_unix_nanos,
            reason,
            message,
            internal: r.internal,
            guest_token: r.guest_token,
            resolver_stale: false,
        }
    }
}

/// Format 1's reason text and message: empty meant none; the spelling of
/// older agents (`VmmCrashed`) is read as today's; a text no reason has
/// any more is kept in the message under `NodeError`.
fn reason_of(text: &str, message: String) -> (Option<Reason>, Option<String>) {
    let message = (!message.is_empty()).then_some(message);
    let reason = match text {
        "" => return (None, message),
        "VmmCrashed" => Reason::VmCrashed,
        t => match t.parse() {
            Ok(r) => r,
            Err(_) => {
                let kept = match message {
                    Some(m) => format!("{t}: {m}"),
                    None => t.to_string(),
                };
                return (Some(Reason::NodeError), Some(kept));
            }
        },
    };
    (Some(reason), message)
}
