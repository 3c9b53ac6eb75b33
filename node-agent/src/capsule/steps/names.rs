//! Live name changes (`spec.network.dns`, `allowHosts`) and the guest's
//! resolver file. The new names are journaled first, then the capsule's
//! DNS proxy and names table take them in place, then (running capsules,
//! when the file's text changed) the guest's `/etc/resolv.conf` is
//! rewritten. A failure journals the old names back. The resolver file is
//! also written after every `Init` (boot and restore: a restored guest
//! carries the file of the capsule it was snapshotted from).

use super::Ctx;
use super::egress::network_change_is_live;
use crate::capsule::files::blocking;
use crate::capsule::ids::net_id;
use crate::capsule::model::{Error, State};
use crate::capsule::record::Record;
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
        let live = network_change_is_live(rec)?;
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
                self.journal_back(entry, rec, &e).await;
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

#[cfg(test)]
mod tests {
    use crate::capsule::model::State;
    use crate::capsule::model::testing::spec;
    use crate::capsule::steps::testing::{NetBed, net_bed};
    use crate::network::dns::AllowHosts;
    use crate::network::{CapsuleId, Names, NetCall};

    fn names(h: &[&str]) -> Names {
        Names {
            allow_hosts: AllowHosts::parse(&h.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap(),
            ..Names::default()
        }
    }

    #[tokio::test]
    async fn names_are_journaled_applied_in_place_and_reapplied_on_resume() {
        let NetBed { dir, net, sup } = net_bed();
        let id = CapsuleId::new("c1").unwrap();
        sup.create("c1", spec("c1"), State::Running).await.unwrap();
        // The network's setup started the proxy with the spec's names.
        assert!(
            net.calls()
                .contains(&NetCall::SetNames(id.clone(), Names::default()))
        );

        let v = sup.update_names("c1", names(&["pypi.org"])).await.unwrap();
        assert_eq!(v.spec.names, names(&["pypi.org"]));
        assert_eq!(
            net.calls().last(),
            Some(&NetCall::SetNames(id.clone(), names(&["pypi.org"])))
        );
        let journaled: crate::capsule::record::Record = crate::state::Journal::new(dir.path())
            .read("c1")
            .unwrap()
            .unwrap();
        assert_eq!(journaled.spec.names, names(&["pypi.org"]));
        // The same names again change nothing on the host.
        let before = net.calls().len();
        sup.update_names("c1", names(&["pypi.org"])).await.unwrap();
        assert_eq!(net.calls().len(), before);

        // Suspended: recorded, applied when the network is made again.
        sup.suspend("c1").await.unwrap();
        sup.update_names("c1", names(&["*.github.com"]))
            .await
            .unwrap();
        let before = net.calls().len();
        sup.resume("c1").await.unwrap();
        assert!(
            net.calls()[before..]
                .contains(&NetCall::SetNames(id.clone(), names(&["*.github.com"])))
        );
    }
}
