//! One pass of a Capsule reconcile: what the plan decided, carried out on
//! the node agent and the status, and what the reconcile learnt from it
//! ([`Known`]) for the next pass.

use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::api::DeleteParams;
use kube::runtime::controller::Action;
use tracing::Instrument;
use wrenn_crds::capsule::{CapsulePhase, OperatingMode};
use wrenn_proto::agent::v1 as pb;

use super::source::{Source, proto_state, to_proto_spec};
use super::writer::{Writer, refresh_usage};
use super::{Context, Error, placed};
use crate::agent::{self, NodeAgent, to_vm};
use crate::placement::plan_placement;
use crate::plan::{Facts, NodeAction, Plan, Requeue, Vm, plan_placed, plan_unschedulable};
use crate::pool::plan_fresher;

/// How long a create may take before its placement is written on its own
/// (see `Writer::hold`): agents that answer at once save the write, a
/// create a user waits for shows its node.
const SHOW_PLACEMENT_AFTER: Duration = Duration::from_millis(50);

/// What one reconcile has learnt between passes: fresher than the object
/// it started from.
pub(super) struct Known {
    /// The placement (`status.nodeName`, or where a VM was found).
    pub(super) node: Option<String>,
    /// The phase last written.
    pub(super) phase: Option<CapsulePhase>,
    /// The VM a node call just returned, ahead of the pool's copy.
    pub(super) fresh: Option<Vm>,
}

impl Known {
    /// The VM as the plan sees it: `None` when its node's agent is unknown.
    /// A node call's answer goes first, unless the stream has since
    /// reported a later state ([`plan_fresher`]).
    pub(super) fn observe(&self, ctx: &Context, uid: &str) -> Option<Option<Vm>> {
        match (&self.fresh, &self.node) {
            (Some(vm), Some(n)) => {
                let reported = ctx.pool.reported(n, uid);
                Some(Some(plan_fresher(vm, reported.as_ref()).clone()))
            }
            (Some(vm), None) => Some(Some(vm.clone())),
            (None, Some(n)) => ctx.pool.observe(n, uid),
            (None, None) => Some(None),
        }
    }

    /// The placed node and its agent's client: `Ok(None)` when the capsule
    /// is not placed (no node to act on), [`Unreachable`] while the node's
    /// agent is not synced (the reconcile backs off and retries).
    fn placed_agent(&self, ctx: &Context) -> Result<Option<Placed>, Unreachable> {
        let Some(node) = self.node.clone() else {
            return Ok(None);
        };
        match ctx.pool.client(&node) {
            Some(client) => Ok(Some(Placed { node, client })),
            None => Err(Unreachable(node)),
        }
    }

    /// Records what a node call returned.
    fn returned(&mut self, ctx: &Context, node: &str, c: pb::Capsule) {
        self.fresh = Some(to_vm(&c));
        ctx.pool.note(node, c);
    }
}

/// A placed capsule's node and its agent's client.
struct Placed {
    node: String,
    client: Arc<dyn NodeAgent>,
}

/// The placed node's agent is not synced.
struct Unreachable(String);

impl From<Unreachable> for Error {
    fn from(Unreachable(node): Unreachable) -> Self {
        Error::NodeUnreachable { node }
    }
}

/// How a pass ended.
pub(super) enum Next {
    /// Plan again with what was learnt.
    Again,
    /// Placed on this node (recorded in the status): plan again.
    Placed(String),
    /// Done: requeue then (counted as a good reconcile).
    Requeue(Requeue),
    /// Done: leave the reconcile as it is (no backoff reset).
    Return(Action),
}

/// One pass's step: what the plan decided, carried out.
pub(super) struct Pass<'a> {
    pub(super) ctx: &'a Context,
    pub(super) ns: &'a str,
    pub(super) plan: &'a Plan,
    pub(super) src: &'a Source,
    /// `spec.network` as the node enforces it, selectors resolved.
    pub(super) network: &'a pb::NetworkPolicy,
}

impl Pass<'_> {
    /// Nothing to do on the node: show the status (and usage while running).
    #[tracing::instrument(name = "capsule.show", skip_all)]
    pub(super) async fn show(&self, w: &mut Writer<'_>, known: &Known) -> Result<Next, Error> {
        let Some(draft) = &self.plan.status else {
            return Ok(Next::Requeue(self.plan.requeue()));
        };
        let resources = Some(self.src.resources).filter(|_| known.node.is_some());
        w.write(self.ctx, draft, resources).await?;
        if draft.phase == CapsulePhase::Running {
            refresh_usage(w, self.ctx, known.node.as_deref()).await?;
        }
        Ok(Next::Requeue(self.plan.requeue()))
    }

    /// Chooses a node and reserves it; the status shows it with the
    /// create's outcome (see `Writer::hold`).
    #[tracing::instrument(name = "capsule.place", skip_all)]
    pub(super) async fn place(&self, w: &mut Writer<'_>, facts: &Facts<'_>) -> Result<Next, Error> {
        let ctx = self.ctx;
        let cap = w.cap;
        // Before every agent listed its VMs, one may already hold this
        // capsule; a nodeSelector matched before the Node labels are
        // listed would call every node a mismatch.
        let labels_pending = !cap.spec.node_selector.is_empty()
            && futures::FutureExt::now_or_never(ctx.nodes.wait_until_ready()).is_none();
        if !ctx.pool.settled(ctx.settings.settle_grace) || labels_pending {
            return Ok(Next::Return(Action::requeue(
                Requeue::NotReady.after(ctx.settings.usage_interval),
            )));
        }
        let nodes = ctx.nodes.clone();
        let decide = || {
            let views = ctx.pool.views(
                |n| crate::pool::node_labels(&nodes, n),
                &placed(&ctx.capsules, &w.uid),
            );
            plan_placement(&self.src.request(cap), &views)
        };
        let mut decided = decide();
        if decided.is_err() {
            // NodeInfo may predate a snapshot or template that just became
            // ready (its trigger brought us here): ask the agents, not the
            // last refresh, before showing the capsule as unschedulable.
            ctx.pool
                .refresh_infos()
                .instrument(tracing::info_span!("agent.refresh_infos"))
                .await;
            decided = decide();
        }
        match decided {
            Ok(chosen) => {
                ctx.pool.reserve(&w.uid, &chosen, self.src.resources);
                w.hold(ctx, plan_placed(facts, &chosen), Some(self.src.resources));
                Ok(Next::Placed(chosen))
            }
            Err(why) => {
                let plan = plan_unschedulable(facts, why.to_string());
                if let Some(draft) = &plan.status {
                    w.write(ctx, draft, None).await?;
                }
                Ok(Next::Requeue(plan.requeue()))
            }
        }
    }

    /// Creates the VM on the placed node. A refusal of the spec shows as a
    /// failed VM: retrying cannot help.
    #[tracing::instrument(name = "capsule.create", skip_all)]
    pub(super) async fn create(
        &self,
        w: &mut Writer<'_>,
        mode: OperatingMode,
        known: &mut Known,
    ) -> Result<Next, Error> {
        let Some(Placed { node, client }) = known.placed_agent(self.ctx)? else {
            return Ok(Next::Requeue(Requeue::Settled));
        };
        let req = pb::CreateCapsuleRequest {
            uid: w.uid.clone(),
            spec: Some(to_proto_spec(
                w.cap,
                self.ns,
                self.src,
                self.network.clone(),
            )),
            initial_state: proto_state(mode),
        };
        let call = client
            .create_capsule(req)
            .instrument(tracing::info_span!("agent.create_capsule"));
        let mut call = std::pin::pin!(call);
        let created = tokio::select! {
            created = &mut call => created,
            _ = tokio::time::sleep(SHOW_PLACEMENT_AFTER) => {
                // A create that takes a while (an agent that answers once
                // the guest booted, an image to unpack): show the node it
                // happens on meanwhile, as a scheduler binds a Pod.
                if let Err(err) = w.write_held(self.ctx).await {
                    tracing::warn!(
                        error = &err as &dyn std::error::Error,
                        "show the placement of a create in flight"
                    );
                }
                call.await
            }
        };
        match created {
            Ok(c) => known.returned(self.ctx, &node, c),
            Err(e) if refuses_spec(&e) => {
                known.fresh = Some(Vm {
                    state: crate::plan::VmState::Failed,
                    ip: None,
                    vmm: None,
                    started_unix_nanos: 0,
                    reason: None,
                    message: e.agent_message(),
                    egress: agent::to_egress(self.network),
                    host_ports: Vec::new(),
                });
            }
            Err(source) => {
                return Err(Error::Agent {
                    action: "create",
                    uid: w.uid.clone(),
                    source,
                });
            }
        }
        known.phase = Some(CapsulePhase::Creating);
        Ok(Next::Again)
    }

    /// Pause, resume or suspend on the node.
    #[tracing::instrument(name = "capsule.transition", skip_all)]
    pub(super) async fn transition(
        &self,
        w: &Writer<'_>,
        known: &mut Known,
    ) -> Result<Next, Error> {
        let Some(Placed { node, client }) = known.placed_agent(self.ctx)? else {
            return Ok(Next::Requeue(Requeue::Settled));
        };
        let uid = w.uid.clone();
        let (action, call) = match self.plan.action {
            NodeAction::Pause => ("pause", client.pause_capsule(uid)),
            NodeAction::Resume => ("resume", client.resume_capsule(uid)),
            _ => ("suspend", client.suspend_capsule(uid)),
        };
        let c = call.await.map_err(|source| Error::Agent {
            action,
            uid: w.uid.clone(),
            source,
        })?;
        known.returned(self.ctx, &node, c);
        Ok(Next::Again)
    }

    /// Makes the node enforce `spec.network`. The status shows the VM as
    /// it is, with the previous observedGeneration, until the node answers.
    #[tracing::instrument(name = "capsule.update_network", skip_all)]
    pub(super) async fn update_network(
        &self,
        w: &mut Writer<'_>,
        known: &mut Known,
    ) -> Result<Next, Error> {
        let Some(Placed { node, client }) = known.placed_agent(self.ctx)? else {
            return Ok(Next::Requeue(Requeue::Settled));
        };
        if let Some(draft) = &self.plan.status {
            w.write(self.ctx, draft, None).await?;
        }
        let c = client
            .update_network(pb::UpdateNetworkRequest {
                uid: w.uid.clone(),
                network: Some(self.network.clone()),
            })
            .await
            .map_err(|source| Error::Agent {
                action: "update network of",
                uid: w.uid.clone(),
                source,
            })?;
        known.returned(self.ctx, &node, c);
        Ok(Next::Again)
    }

    /// Lifecycle expired with `onExpiry: Delete`: show Expired, then delete
    /// the object (its finalizer deletes the VM).
    #[tracing::instrument(name = "capsule.delete_object", skip_all)]
    pub(super) async fn delete_object(&self, w: &mut Writer<'_>) -> Result<Next, Error> {
        if let Some(draft) = &self.plan.status {
            w.write(self.ctx, draft, None).await?;
        }
        let name = w.cap.name_any();
        w.api
            .delete(&name, &DeleteParams::default())
            .await
            .map_err(|source| Error::DeleteExpired { name, source })?;
        Ok(Next::Return(Action::await_change()))
    }
}

/// The node refuses this spec (a retry cannot help).
fn refuses_spec(e: &agent::Error) -> bool {
    matches!(
        e.code(),
        Some(
            tonic::Code::InvalidArgument
                | tonic::Code::AlreadyExists
                | tonic::Code::FailedPrecondition
                | tonic::Code::ResourceExhausted
        )
    )
}
