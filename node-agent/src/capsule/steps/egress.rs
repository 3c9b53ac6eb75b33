//! Live egress changes: a capsule's policy replaced without touching its
//! VM. The new policy is journaled first, then the capsule's nftables table
//! is swapped in one transaction; readers (and so the operator) see the new
//! policy only once it holds. A failed swap journals the old policy back.
//! An agent that dies between the two steps finds the new policy in the
//! journal, and recovery applies it ([`Ctx::reapply_egress`]).

use super::Ctx;
use crate::capsule::files::blocking;
use crate::capsule::ids::net_id;
use crate::capsule::model::{Egress, Error, State};
use crate::capsule::plan::{Decision, Op, plan_op};
use crate::capsule::record::Record;
use crate::capsule::record::{note, wrong};
use crate::capsule::registry::Entry;
use crate::vmm::Machine;

/// Whether a network change (egress, names, published ports) applies at once
/// (running, paused) or is recorded for when the network comes back
/// (suspended, failed, stopped); refused between states.
pub(crate) fn network_change_is_live(rec: &Record) -> Result<bool, Error> {
    match plan_op(Op::UpdateEgress, rec.state()) {
        Decision::ApplyEgress => Ok(true),
        Decision::RecordEgress => Ok(false),
        Decision::Refuse(hint) => Err(wrong(&rec.uid, rec.state(), hint)),
        _ => Err(wrong(&rec.uid, rec.state(), "wait until it settles")),
    }
}

impl<M: Machine + 'static> Ctx<M> {
    #[tracing::instrument(skip_all, fields(capsule = %rec.uid, step = "update_egress"))]
    pub(crate) async fn update_egress(
        &self,
        entry: &Entry,
        rec: &mut Record,
        egress: Egress,
    ) -> Result<(), Error> {
        if rec.spec.egress == egress {
            return Ok(());
        }
        let live = network_change_is_live(rec)?;
        let old = std::mem::replace(&mut rec.spec.egress, egress);
        // Journaled before the swap, but not shown: until the table is
        // loaded the capsule still runs under the old policy.
        self.journal_only(rec).await?;
        if live && let Err(e) = self.apply_egress(rec).await {
            rec.spec.egress = old;
            self.journal_back(entry, rec, &e).await;
            return Err(e);
        }
        self.show(entry, rec);
        tracing::info!(capsule = %rec.uid, live, "egress policy updated");
        Ok(())
    }

    /// After a failed live network change whose old settings are back in
    /// `rec`: shows the failure and journals `rec` again.
    pub(crate) async fn journal_back(&self, entry: &Entry, rec: &mut Record, e: &Error) {
        note(rec, e);
        if let Err(j) = self.commit(entry, rec).await {
            tracing::error!(capsule = %rec.uid, error = &j as &dyn std::error::Error, "journal the network settings back after a failed update");
        }
    }

    /// Loads `rec`'s journaled policy into its capsule table.
    pub(crate) async fn apply_egress(&self, rec: &Record) -> Result<(), Error> {
        let pol = rec.spec.egress.clone();
        let net = self.host.net.clone();
        let uid = rec.uid.clone();
        blocking(&rec.uid, "update egress", move || {
            let id = net_id(&uid)?;
            net.update_policy(&id, &pol)
                .map_err(|source| Error::Network {
                    action: "apply egress policy to",
                    uid,
                    source: Box::new(source),
                })
        })
        .await?;
        // Whether DNS stays open depends on the policy.
        self.apply_names(rec).await
    }

    /// Recovery: the journal's policy is the one to hold for a capsule
    /// whose VM was adopted. An update may have been journaled by an agent
    /// that died before the swap, and a restarted agent may run with other
    /// limits. A failure leaves the table that was loaded (the swap is
    /// atomic) and is logged.
    pub(crate) async fn reapply_egress(&self, rec: &Record) {
        if rec.vm().is_none() || !matches!(rec.state(), State::Running | State::Paused) {
            return;
        }
        if let Err(e) = self.apply_egress(rec).await {
            tracing::error!(capsule = %rec.uid, error = &e as &dyn std::error::Error, "reapply the journaled egress policy");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capsule::model::testing::spec;
    use crate::network::{CapsuleId as NetId, EgressPolicy, NetCall, SetupStep};
    use wrenn_crds::reason::Reason;

    use crate::capsule::steps::testing::{NetBed as Bed, net_bed as bed};

    fn journaled(b: &Bed, uid: &str) -> Egress {
        let rec: Record = crate::state::Journal::new(b.dir.path())
            .read(uid)
            .unwrap()
            .unwrap();
        rec.spec.egress
    }

    fn listed() -> Egress {
        Egress::AllowList(vec!["203.0.113.0/24".parse().unwrap()])
    }

    #[tokio::test]
    async fn a_running_capsule_gets_the_new_policy_in_place() {
        let b = bed();
        b.sup
            .create("c1", spec("c1"), State::Running)
            .await
            .unwrap();
        let id = NetId::new("c1").unwrap();
        let v = b.sup.update_network("c1", listed()).await.unwrap();
        assert_eq!(v.spec.egress, listed());
        assert_eq!(b.sup.get("c1").unwrap().state, State::Running);
        assert_eq!(journaled(&b, "c1"), listed());
        let calls = b.net.calls();
        // The policy, then the names table (whether DNS stays open
        // depends on the policy).
        assert_eq!(
            calls[calls.len() - 2..],
            [
                NetCall::UpdatePolicy(
                    id.clone(),
                    EgressPolicy::AllowList(vec!["203.0.113.0/24".parse().unwrap()])
                ),
                NetCall::SetNames(id.clone(), Default::default()),
            ]
        );
        // Not rebuilt: one setup, from the create.
        assert_eq!(
            calls
                .iter()
                .filter(|c| matches!(c, NetCall::Setup(..)))
                .count(),
            1
        );
        // The same policy again changes nothing on the host.
        b.sup.update_network("c1", listed()).await.unwrap();
        assert_eq!(b.net.calls().len(), calls.len());
    }

    #[tokio::test]
    async fn a_failed_swap_keeps_the_old_policy_in_the_journal_and_the_view() {
        let b = bed();
        b.sup
            .create("c1", spec("c1"), State::Running)
            .await
            .unwrap();
        b.net.fail_next_setup(SetupStep::LoadCapsuleTable);
        let err = b.sup.update_network("c1", Egress::Deny).await.unwrap_err();
        assert!(matches!(err, Error::Network { .. }), "{err}");
        let v = b.sup.get("c1").unwrap();
        assert_eq!(v.spec.egress, Egress::Allow);
        assert_eq!(v.reason, Some(Reason::NetworkFailed));
        assert_eq!(journaled(&b, "c1"), Egress::Allow);
        // A bad CIDR cannot reach the host: it is refused where it enters
        // the agent (`server::convert::from_network`) and no `Egress` holds
        // one (`network::addr`'s serde test).
    }

    #[tokio::test]
    async fn a_suspended_capsule_gets_the_new_policy_when_it_resumes() {
        let b = bed();
        b.sup
            .create("c1", spec("c1"), State::Suspended)
            .await
            .unwrap();
        let before = b.net.calls().len();
        b.sup.update_network("c1", Egress::Deny).await.unwrap();
        assert_eq!(b.net.calls().len(), before, "no network to change");
        assert_eq!(journaled(&b, "c1"), Egress::Deny);
        b.sup.resume("c1").await.unwrap();
        assert!(b.net.calls()[before..].contains(&NetCall::Setup(
            NetId::new("c1").unwrap(),
            EgressPolicy::Deny
        )));
    }
}
