//! The one writer of a Capsule's status during a reconcile: a status equal
//! to the current one is not written, a placement is held back to ride on
//! the next write, a phase change is announced as an Event once the
//! reconcile's node work is done, and `status.usage` is refreshed from the
//! agent's metrics.

use k8s_openapi::jiff::Timestamp;
use kube::Resource;
use kube::api::Api;
use kube::runtime::events::EventType;
use tracing::Instrument;
use wrenn_crds::Capsule;
use wrenn_crds::capsule::{CapsulePhase, CapsuleStatus, Usage};
use wrenn_crds::reason::{ConditionType, Reason};
use wrenn_proto::agent::v1 as pb;

use super::{Error, age};
use crate::controller::Context;
use crate::metrics::KindLabels;
use crate::plan::{ConditionDraft, StatusDraft};
use crate::resources::Resources;
use crate::status::{self, build_capsule_status};

/// The one writer of a Capsule's status during a reconcile: skips a
/// status equal to the current one, announces phase changes as Events.
pub(super) struct Writer<'a> {
    pub(super) cap: &'a Capsule,
    pub(super) api: Api<Capsule>,
    pub(super) uid: String,
    pub(super) current: Option<CapsuleStatus>,
    /// Events of the phases written, published by [`Writer::flush`].
    pub(super) announced: Vec<(EventType, Reason, String)>,
    /// A placement not written yet (see [`Writer::hold`]).
    pub(super) held: Option<(StatusDraft, Option<Resources>)>,
}

impl Writer<'_> {
    /// Writes `status` unless equal to the current one; publishes an Event
    /// on a phase change worth telling.
    pub(super) async fn write(
        &mut self,
        ctx: &Context,
        draft: &StatusDraft,
        resources: Option<Resources>,
    ) -> Result<(), Error> {
        let before = self.current.as_ref().and_then(|s| s.phase);
        if self.write_quietly(ctx, draft, resources).await? && before != Some(draft.phase) {
            self.announce(ctx, before, draft);
        }
        Ok(())
    }

    /// [`Writer::write`] without the Event; true when it wrote.
    async fn write_quietly(
        &mut self,
        ctx: &Context,
        draft: &StatusDraft,
        resources: Option<Resources>,
    ) -> Result<bool, Error> {
        let mut next = build_capsule_status(
            draft,
            self.current.as_ref(),
            self.cap.meta().generation,
            resources,
            Timestamp::now(),
        );
        if self.current.as_ref() == Some(&next) {
            return Ok(false);
        }
        if draft.phase != CapsulePhase::Running {
            next.usage = None;
        }
        self.put(ctx, next)
            .instrument(tracing::info_span!("capsule.write_status"))
            .await?;
        Ok(true)
    }

    /// Holds a placement back instead of writing it: a create the agent
    /// answers at once ends in a status carrying the node anyway, so
    /// writing `Scheduled` first would cost every capsule a write and one
    /// API round trip on its way to Running. Its Event is queued now. A
    /// create that takes longer, and a reconcile that fails before its next
    /// write, write the placement with [`Writer::write_held`], so a capsule
    /// shows the node it is created on or waits for and is retried there;
    /// the operator's own reservation pins it meanwhile, and after an
    /// operator restart the agents' lists do.
    pub(super) fn hold(&mut self, ctx: &Context, draft: StatusDraft, resources: Option<Resources>) {
        let before = self.current.as_ref().and_then(|s| s.phase);
        self.announce(ctx, before, &draft);
        self.held = Some((draft, resources));
    }

    /// Writes the held placement, if no status was written since it was
    /// held (kept held when the write fails). Its Event was queued by
    /// [`Writer::hold`].
    pub(super) async fn write_held(&mut self, ctx: &Context) -> Result<(), Error> {
        let Some((draft, resources)) = self.held.clone() else {
            return Ok(());
        };
        self.write_quietly(ctx, &draft, resources).await?;
        self.held = None;
        Ok(())
    }

    /// Queues the Events of the phases written, once the reconcile's node
    /// work is done, failed or not: publishing `Scheduled` before the
    /// create would still compete with it for the API server.
    pub(super) fn flush(&mut self, ctx: &Context) {
        for (type_, reason, note) in std::mem::take(&mut self.announced) {
            ctx.events
                .push(self.cap.object_ref(&()), type_, reason, note);
        }
    }

    /// Writes `next` as the status and remembers it as the current one,
    /// here and in the context (the freshest status of the capsule).
    async fn put(&mut self, ctx: &Context, next: CapsuleStatus) -> Result<(), Error> {
        let writing = ctx.events.writing();
        status::apply_status(&self.api, self.cap, &next)
            .await
            .map_err(Error::Status)?;
        drop(writing);
        ctx.wrote_status(&self.uid, &next);
        self.held = None;
        ctx.metrics
            .status_writes
            .get_or_create(&KindLabels { kind: "Capsule" })
            .inc();
        self.current = Some(next);
        Ok(())
    }

    /// Queues the Event of a phase change (see [`Writer::flush`]).
    fn announce(&mut self, ctx: &Context, before: Option<CapsulePhase>, draft: &StatusDraft) {
        use ConditionType as T;
        let cond = |t: ConditionType| -> Option<&ConditionDraft> {
            draft.conditions.iter().find(|c| c.type_ == t)
        };
        let msg = |t: ConditionType| cond(t).map(|c| c.message.clone()).unwrap_or_default();
        let (type_, reason, note) = match draft.phase {
            CapsulePhase::Scheduled => (EventType::Normal, Reason::Scheduled, msg(T::Scheduled)),
            CapsulePhase::Running => {
                if before == Some(CapsulePhase::Creating)
                    && let Some(created) = age(self.cap.meta().creation_timestamp.as_ref())
                {
                    ctx.metrics.create_to_running.observe(created.as_secs_f64());
                }
                let ip = draft.ip.clone().unwrap_or_default();
                (
                    EventType::Normal,
                    Reason::Running,
                    format!(
                        "running on node {} at {ip}",
                        draft.node.clone().unwrap_or_default()
                    ),
                )
            }
            CapsulePhase::Paused => (
                EventType::Normal,
                Reason::Paused,
                "vCPUs stopped".to_string(),
            ),
            CapsulePhase::Suspended => (EventType::Normal, Reason::Suspended, msg(T::Suspended)),
            CapsulePhase::Failed => (EventType::Warning, Reason::Failed, msg(T::Ready)),
            CapsulePhase::Expired => (EventType::Normal, Reason::Expired, msg(T::Ready)),
            CapsulePhase::Pending
                if cond(T::Scheduled).is_some_and(|c| c.reason == Reason::Unschedulable) =>
            {
                (
                    EventType::Warning,
                    Reason::FailedScheduling,
                    msg(T::Scheduled),
                )
            }
            _ => return,
        };
        self.announced.push((type_, reason, note));
    }
}

/// Refreshes `status.usage` from the agent's metrics when older than the interval.
pub(super) async fn refresh_usage(
    w: &mut Writer<'_>,
    ctx: &Context,
    node: Option<&str>,
) -> Result<(), Error> {
    let Some(node) = node else { return Ok(()) };
    let Some(cur) = w.current.clone() else {
        return Ok(());
    };
    let interval = ctx.settings.usage_interval;
    let since = cur
        .usage
        .as_ref()
        .and_then(|u| age(u.sampled_at.as_ref()))
        .or_else(|| age(cur.started_at.as_ref()));
    if since.is_none_or(|s| s < interval) {
        return Ok(());
    }
    let Some(client) = ctx.pool.client(node) else {
        return Ok(());
    };
    let now = Timestamp::now();
    let to = now.as_nanosecond() as i64;
    let from = to - interval.as_nanos() as i64;
    let Ok(m) = client
        .get_metrics(pb::GetMetricsRequest {
            uid: w.uid.clone(),
            from_unix_nanos: from,
            to_unix_nanos: to,
        })
        .await
    else {
        return Ok(());
    };
    let Some(last) = m.samples.last() else {
        return Ok(());
    };
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    let mut next = cur.clone();
    next.usage = Some(Usage {
        cpu: Some(Quantity(format!("{}m", last.cpu_millicores))),
        memory: Some(Quantity(crate::resources::format_bytes(
            last.guest_memory_used_bytes,
        ))),
        disk: Some(Quantity(crate::resources::format_bytes(
            last.disk_allocated_bytes,
        ))),
        sampled_at: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now)),
    });
    w.put(ctx, next)
        .instrument(tracing::info_span!("capsule.write_usage"))
        .await
}
