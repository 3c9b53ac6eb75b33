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
        let file_changes = self.resolver_text(&rec.spec.names) != self.resolver_text(&names);
        let old = std::mem::replace(&mut rec.spec.names, names);
        let was_stale = rec.resolver_stale;
        // A paused guest cannot take the file now: it gets it at resume.
        rec.resolver_stale |= live && file_changes && rec.state() == State::Paused;
        self.journal_only(rec).await?;
        if live {
            let res = match self.apply_names(rec).await {
                Ok(()) if file_changes => self.rewrite_resolver(rec).await,
                other => other,
            };
            if let Err(e) = res {
                rec.spec.names = old;
                rec.resolver_stale = was_stale;
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

    /// A resolver file marked stale while the guest was paused, written
    /// now that it runs again. A failure leaves the mark for the next
    /// resume and is logged: the resume itself has happened.
    pub(crate) async fn catch_up_resolver(&self, rec: &mut Record) {
        if !rec.resolver_stale {
            return;
        }
        match self.rewrite_resolver(rec).await {
            Ok(()) => rec.resolver_stale = false,
            Err(e) => {
                tracing::warn!(capsule = %rec.uid, error = &e as &dyn std::error::Error, "resolver file not rewritten at resume");
            }
        }
    }

    /// A live change of the resolver file: dials the running guest. A
    /// paused guest cannot answer: [`Ctx::catch_up_resolver`] writes it at
    /// resume.
    async fn rewrite_resolver(&self, rec: &Record) -> Result<(), Error> {
        let (Some(g), Some(vm)) = (self.cfg.guest, rec.vm()) else {
            return Ok(());
        };
        if rec.state() != State::Running {
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

    #[tokio::test]
    async fn a_resolver_change_while_paused_is_owed_to_the_guest_until_resume() {
        let NetBed { dir, sup, .. } = net_bed();
        sup.create("c1", spec("c1"), State::Running).await.unwrap();
        let journal = crate::state::Journal::new(dir.path());
        let stale = || {
            journal
                .read::<crate::capsule::record::Record>("c1")
                .unwrap()
                .unwrap()
                .resolver_stale
        };
        sup.pause("c1").await.unwrap();
        // allowHosts alone does not change the file: nothing owed.
        sup.update_names("c1", names(&["pypi.org"])).await.unwrap();
        assert!(!stale());
        let mut searched = names(&["pypi.org"]);
        searched.dns.searches = vec!["corp.example".into()];
        sup.update_names("c1", searched).await.unwrap();
        assert!(stale(), "journaled, so an agent restart still owes it");
        sup.resume("c1").await.unwrap();
        assert!(!stale());
    }
}
