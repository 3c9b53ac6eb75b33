//! Live name changes (`spec.network.dns`, `allowHosts`) and the guest's
//! resolver file. The new names are journaled first, then the capsule's
//! DNS proxy and names table take them in place, then (running capsules,
//! when the file's text changed) the guest's `/etc/resolv.conf` is
//! rewritten. A failure journals the old names back. The resolver file is
//! also written after every `Init` (boot and restore: a restored guest
//! carries the file of the capsule it was snapshotted from).

use super::Ctx;
use crate::capsule::files::blocking;
use crate::capsule::ids::net_id;
use crate::capsule::model::{Error, State};
use crate::capsule::plan::{Decision, Op, plan_op};
use crate::capsule::record::{Record, note, wrong};
use crate::capsule::registry::Entry;
use crate::guest::GuestClient;
use crate::network::Names;
use crate::vmm::Machine;

/// Where the guest's resolver reads its configuration.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

impl<M: Machine + 'static> Ctx<M> {
    #[tracing::instrument(skip_all, fields(capsule = %rec.uid, step = "update_names"))]
    pub(crate) async fn update_names(
        &self,
        entry: &Entry,
        rec: &mut Record,
        names: Names,
    ) -> Result<(), Error> {
        if rec.spec.names == names {
            return Ok(());
        }
        let live = match plan_op(Op::UpdateEgress, rec.state) {
            Decision::ApplyEgress => true,
            Decision::RecordEgress => false,
            Decision::Refuse(hint) => return Err(wrong(&rec.uid, rec.state, hint)),
            _ => return Err(wrong(&rec.uid, rec.state, "wait until it settles")),
        };
        let old = std::mem::replace(&mut rec.spec.names, names);
        self.journal_only(rec).await?;
        if live {
            let res = match self.apply_names(rec).await {
                Ok(()) if self.resolver_text(&old) != self.resolver_text(&rec.spec.names) => {
                    self.rewrite_resolver(rec).await
                }
                other => other,
            };
            if let Err(e) = res {
                rec.spec.names = old;
                // Put the old settings back on the host too.
                if let Err(back) = self.apply_names(rec).await {
                    tracing::error!(capsule = %rec.uid, error = &back as &dyn std::error::Error, "restore the names after a failed update");
                }
                note(rec, &e);
                if let Err(j) = self.commit(entry, rec).await {
                    tracing::error!(capsule = %rec.uid, error = &j as &dyn std::error::Error, "journal the names back after a failed update");
                }
                return Err(e);
            }
        }
        self.show(entry, rec);
        tracing::info!(capsule = %rec.uid, live, "names updated");
        Ok(())
    }

    /// Makes the capsule's proxy and names table hold `rec`'s journaled
    /// names under its journaled egress policy.
    pub(crate) async fn apply_names(&self, rec: &Record) -> Result<(), Error> {
        let (pol, names) = (rec.spec.egress.clone(), rec.spec.names.clone());
        let net = self.host.net.clone();
        let uid = rec.uid.clone();
        blocking(&rec.uid, "apply names", move || {
            let id = net_id(&uid)?;
            net.set_names(&id, &pol, &names)
                .map_err(|source| Error::Network {
                    action: "apply DNS settings to",
                    uid,
                    source: Box::new(source),
                })
        })
        .await
    }

    fn resolver_text(&self, names: &Names) -> String {
        names.dns.render("", &self.host.net.cluster_dns())
    }

    /// Writes the guest's resolver file through `client` (initialized).
    pub(crate) async fn write_resolver(
        &self,
        rec: &Record,
        client: &GuestClient,
    ) -> Result<(), Error> {
        let text = rec
            .spec
            .names
            .dns
            .render(&rec.spec.namespace, &self.host.net.cluster_dns());
        client
            .put_file(RESOLV_CONF, 0o644, text.into_bytes())
            .await
            .map(drop)
            .map_err(|source| Error::Guest {
                action: "write the resolver file of",
                uid: rec.uid.clone(),
                source: Box::new(source),
            })
    }

    /// A live change of the resolver file: dials the running guest. A
    /// paused guest cannot answer; it keeps its file until the next
    /// restore (logged).
    async fn rewrite_resolver(&self, rec: &Record) -> Result<(), Error> {
        let (Some(g), Some(vm)) = (self.cfg.guest, rec.vm()) else {
            return Ok(());
        };
        if rec.state != State::Running {
            tracing::warn!(capsule = %rec.uid, state = ?rec.state, "resolver file not rewritten: the guest is not running");
            return Ok(());
        }
        let err = |source| Error::Guest {
            action: "reach for the resolver file",
            uid: rec.uid.clone(),
            source: Box::new(source),
        };
        let token = rec.guest_token.as_ref().map_or("", |t| t.expose());
        let client = GuestClient::connect_with(&rec.uid, &vm.vsock_socket, g.port, g.timeouts)
            .await
            .and_then(|c| c.with_token(token))
            .map_err(err)?;
        self.write_resolver(rec, &client).await
    }
}
