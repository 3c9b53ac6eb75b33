//! Published ports: a capsule's declared TCP ports with sources, given host
//! ports by `crate::network` (which journals its claims before the rules
//! that use them). The wanted ports are journaled in the spec before they
//! are published; the host ports are journaled in the record after, and
//! shown. A capsule whose ports cannot be published (the host-port range
//! is full) still runs: the failure is its reason until a later
//! UpdateNetwork publishes them.

use super::Ctx;
use crate::capsule::files::blocking;
use crate::capsule::ids::net_id;
use crate::capsule::model::{Error, HostPort, PortRule};
use crate::capsule::record::{Record, note};
use crate::capsule::registry::Entry;
use crate::vmm::Machine;

/// Whether every wanted port has a host port.
fn all_published(rec: &Record) -> bool {
    let held = rec
        .held
        .net
        .as_ref()
        .map(|n| n.host_ports.as_slice())
        .unwrap_or_default();
    rec.spec
        .ports
        .iter()
        .all(|r| held.iter().any(|h| h.port == r.port))
        && held.len() == rec.spec.ports.len()
}

impl<M: Machine + 'static> Ctx<M> {
    #[tracing::instrument(skip_all, fields(capsule = %rec.uid, step = "update_ports"))]
    pub(crate) async fn update_ports(
        &self,
        entry: &Entry,
        rec: &mut Record,
        ports: Vec<PortRule>,
    ) -> Result<(), Error> {
        if rec.spec.ports == ports && (rec.held.net.is_none() || all_published(rec)) {
            return Ok(());
        }
        let live = super::egress::network_change_is_live(rec)?;
        let old = std::mem::replace(&mut rec.spec.ports, ports);
        self.journal_only(rec).await?;
        if live {
            match self.publish(rec).await {
                Ok(host_ports) => rec.ports_published(host_ports),
                Err(e) => {
                    // The previous ports still hold (a failed publish
                    // changes nothing); say so in the journal.
                    rec.spec.ports = old;
                    note(rec, &e);
                    if let Err(j) = self.commit(entry, rec).await {
                        tracing::error!(capsule = %rec.uid, error = &j as &dyn std::error::Error, "journal the ports back after a failed update");
                    }
                    return Err(e);
                }
            }
        }
        self.commit(entry, rec).await?;
        tracing::info!(capsule = %rec.uid, live, "published ports updated");
        Ok(())
    }

    /// Publishes `rec`'s ports once its network is made (create, resume).
    /// A failure does not fail the capsule: it becomes the capsule's reason
    /// and the ports stay unpublished until an UpdateNetwork succeeds.
    pub(crate) async fn publish_at_create(&self, rec: &mut Record) {
        if rec.spec.ports.is_empty()
            && rec
                .held
                .net
                .as_ref()
                .is_none_or(|n| n.host_ports.is_empty())
        {
            return;
        }
        match self.publish(rec).await {
            Ok(host_ports) => rec.ports_published(host_ports),
            Err(e) => {
                tracing::warn!(capsule = %rec.uid, error = &e as &dyn std::error::Error, "publish ports");
                note(rec, &e);
            }
        }
    }

    async fn publish(&self, rec: &Record) -> Result<Vec<HostPort>, Error> {
        let rules = rec.spec.ports.clone();
        let net = self.host.net.clone();
        let uid = rec.uid.clone();
        blocking(&rec.uid, "publish ports", move || {
            let id = net_id(&uid)?;
            net.publish(&id, &rules).map_err(|source| Error::Network {
                action: "publish ports of",
                uid,
                source: Box::new(source),
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capsule::model::State;
    use crate::capsule::model::testing::spec;
    use crate::capsule::steps::testing::{NetBed, net_bed};
    use crate::network::{CapsuleId as NetId, FakeNet, NetCall, NetOps as _};

    fn rule(port: u16) -> PortRule {
        PortRule {
            port,
            from: vec!["10.244.0.0/16".parse().unwrap()],
        }
    }

    fn publishes(net: &FakeNet) -> Vec<Vec<u16>> {
        net.calls()
            .into_iter()
            .filter_map(|c| match c {
                NetCall::Publish(_, rules) => Some(rules.iter().map(|r| r.port).collect()),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn ports_are_published_at_create_and_changed_live_keeping_host_ports() {
        let NetBed { dir, net, sup } = net_bed();
        let mut s = spec("c1");
        s.ports = vec![rule(8080)];
        let v = sup.create("c1", s, State::Running).await.unwrap();
        assert_eq!(v.host_ports.len(), 1);
        let h8080 = v.host_ports[0].host_port;

        let v = sup
            .update_ports("c1", vec![rule(22), rule(8080)])
            .await
            .unwrap();
        assert_eq!(v.spec.ports, vec![rule(22), rule(8080)]);
        let kept = v.host_ports.iter().find(|h| h.port == 8080).unwrap();
        assert_eq!(kept.host_port, h8080);
        assert_eq!(v.host_ports.len(), 2);
        // The journal has them: a restarted agent shows the same ports.
        let rec: Record = crate::state::Journal::new(dir.path())
            .read("c1")
            .unwrap()
            .unwrap();
        assert_eq!(
            rec.held.net.as_ref().map(|n| n.host_ports.clone()),
            Some(v.host_ports.clone())
        );

        // The same ports again: nothing to do.
        sup.update_ports("c1", vec![rule(22), rule(8080)])
            .await
            .unwrap();
        assert_eq!(publishes(&net), vec![vec![8080], vec![22, 8080]]);

        let v = sup.update_ports("c1", vec![]).await.unwrap();
        assert!(v.host_ports.is_empty());
        assert!(
            net.host_ports(&NetId::new("c1").unwrap()).is_empty(),
            "host ports given back"
        );
    }

    #[tokio::test]
    async fn a_suspended_capsule_records_ports_and_publishes_them_on_resume() {
        let NetBed {
            dir: _dir,
            net,
            sup,
        } = net_bed();
        sup.create("c1", spec("c1"), State::Running).await.unwrap();
        sup.suspend("c1").await.unwrap();
        let v = sup.update_ports("c1", vec![rule(80)]).await.unwrap();
        assert_eq!(v.spec.ports, vec![rule(80)]);
        assert!(publishes(&net).is_empty());
        let v = sup.resume("c1").await.unwrap();
        assert_eq!(v.host_ports.len(), 1);
        assert_eq!(publishes(&net), vec![vec![80]]);
    }
}
