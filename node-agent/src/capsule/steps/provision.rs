//! The host resources a VM runs on: the base image, the capsule's disk and
//! network, each journaled before it is made, and the machine spec that
//! names them. A restore makes them again the same way (adopting what is
//! left).

use super::Ctx;
use crate::capsule::files::blocking;
use crate::capsule::ids::{disk_id, net_id};
use crate::capsule::model::Error;
use crate::capsule::record::{NetAddr, Record};
use crate::capsule::registry::Entry;
use crate::network::CapsuleNet;
use crate::storage::{self, CapsuleDisk, DiskRequest};
use crate::vmm::cgroup::CgroupLimits;
use crate::vmm::{DiskFormat, Machine, MachineSpec, TapSpec};

impl<M: Machine + 'static> Ctx<M> {
    /// The machine spec of `rec` with its network and disk.
    pub(crate) fn machine_spec(
        &self,
        rec: &Record,
        net: &CapsuleNet,
        disk: &CapsuleDisk,
    ) -> MachineSpec {
        let spec = &rec.spec;
        let mac = net
            .mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        let cmdline = crate::capsule::cmdline::build(
            &self.cfg.base_cmdline,
            &net.kernel_ip_arg(),
            &spec.cmdline,
        );
        let run_dir = self.layout.run_dir(&rec.uid);
        MachineSpec {
            capsule: rec.uid.clone(),
            vcpus: spec.resources.vcpus,
            memory_bytes: spec.resources.memory_bytes,
            kernel: spec
                .kernel
                .clone()
                .unwrap_or_else(|| self.cfg.kernel.clone()),
            initramfs: self.cfg.initramfs.clone(),
            cmdline,
            root_disk: disk.path.clone(),
            root_disk_format: match disk.format {
                storage::DiskFormat::Raw => DiskFormat::Raw,
                storage::DiskFormat::Qcow2 => DiskFormat::Qcow2,
            },
            netns: Some(net.netns.clone()),
            tap: Some(TapSpec {
                name: net.tap.clone(),
                mac,
            }),
            // Slots are unique per node and start at 1; CIDs start at 3.
            vsock_cid: net.slot.saturating_add(2),
            vsock_socket: run_dir.join("vsock.sock"),
            limits: CgroupLimits::build_for_vm(spec.resources.vcpus, spec.resources.memory_bytes),
            run_dir,
        }
    }

    /// Makes (or adopts) the disk and the network of `rec`. Both are claimed
    /// in one commit, with the base they are made from, before either is
    /// made: one wait for the journal instead of three. A teardown of a
    /// claim never made finds nothing and succeeds, as after a crash
    /// between a claim and its making.
    #[tracing::instrument(skip_all, fields(capsule = %rec.uid, step = "ensure_disk_and_net"))]
    pub(crate) async fn ensure_disk_and_net(
        &self,
        entry: &Entry,
        rec: &mut Record,
    ) -> Result<(CapsuleDisk, CapsuleNet), Error> {
        let uid = rec.uid.clone();
        let (base, owed) = self.ensure_base(entry, rec).await?;
        // A template build can take minutes; a delete meanwhile wins.
        if entry.cancelled() {
            return Err(Error::Cancelled { uid });
        }
        let disk_claimed = rec.claim_disk();
        let net_claimed = rec.claim_net();
        if owed || disk_claimed || net_claimed {
            self.commit(entry, rec).await?;
        }
        let req = DiskRequest {
            capsule: disk_id(&uid)?,
            template: base,
            size_bytes: rec.spec.resources.disk_bytes,
        };
        let store = self.host.store.clone();
        let u = uid.clone();
        let disk = blocking(&uid, "create disk", move || {
            store.ensure_disk(&req).map_err(|source| Error::Storage {
                action: "create",
                uid: u,
                source: Box::new(source),
            })
        })
        .await?;
        rec.disk_made(disk.path.clone()).map_err(|r| r.on(rec))?;
        if entry.cancelled() {
            return Err(Error::Cancelled { uid });
        }
        let net = self.host.net.clone();
        let id = net_id(&uid)?;
        let pol = rec.spec.egress.clone();
        let names = rec.spec.names.clone();
        let u = uid.clone();
        let capsule_net = blocking(&uid, "set up network", move || {
            let n = net.setup(&id, &pol).map_err(|source| Error::Network {
                action: "set up",
                uid: u.clone(),
                source: Box::new(source),
            })?;
            // The guest's resolver: proxy and names table (torn down with
            // the network).
            net.set_names(&id, &pol, &names)
                .map_err(|source| Error::Network {
                    action: "start the DNS proxy of",
                    uid: u,
                    source: Box::new(source),
                })?;
            Ok(n)
        })
        .await?;
        rec.net_made(NetAddr {
            ip: capsule_net.addrs.host.to_string(),
            slot: capsule_net.slot,
            netns: Some(capsule_net.netns.clone()),
        })
        .map_err(|r| r.on(rec))?;
        self.publish_at_create(rec).await;
        Ok((disk, capsule_net))
    }
}
