//! Events for names a capsule's resolver refused. The node agent reports
//! them on its event stream, already throttled per name and per capsule;
//! each becomes a Warning Event on the Capsule, so `kubectl describe` says
//! why a lookup in the guest failed instead of leaving a user to guess.

use std::sync::Arc;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Resource as _;
use kube::runtime::events::EventType;
use tokio::sync::mpsc;
use wrenn_crds::Capsule;
use wrenn_crds::reason::Reason;
use wrenn_proto::agent::v1 as pb;

use crate::controller::Context;

/// The Event for one report: its reason and note; `None` for a reason this
/// operator does not know (a newer agent).
pub fn refusal_note(r: &pb::NameRefused) -> Option<(Reason, String)> {
    let reason: Reason = r.reason.parse().ok()?;
    let times = match r.queries {
        0 | 1 => String::new(),
        n => format!(" ({n} lookups since the last report)"),
    };
    let note = match reason {
        Reason::NameNotAllowed => format!(
            "the guest looked up {:?}{times}: spec.network.allowHosts does not list it, so its \
             resolver answered NXDOMAIN and connections to its addresses are refused",
            r.name
        ),
        Reason::NameUnresolved => format!(
            "no nameserver answered the guest's lookup of {:?}{times}, so its resolver answered \
             SERVFAIL: check spec.network.dns.nameservers, or the node's cluster DNS when none are set",
            r.name
        ),
        _ => return None,
    };
    Some((reason, note))
}

/// The Capsule an agent's view names.
pub fn regarding(c: &pb::Capsule) -> Option<ObjectReference> {
    let spec = c.spec.as_ref()?;
    if spec.name.is_empty() || c.uid.is_empty() {
        return None;
    }
    Some(ObjectReference {
        api_version: Some(Capsule::api_version(&()).into_owned()),
        kind: Some(Capsule::kind(&()).into_owned()),
        namespace: Some(spec.namespace.clone()),
        name: Some(spec.name.clone()),
        uid: Some(c.uid.clone()),
        ..Default::default()
    })
}

/// Publishes an Event per report until the pool's stream ends.
pub async fn report_refusals(ctx: Arc<Context>, mut reports: mpsc::Receiver<pb::Event>) {
    while let Some(ev) = reports.recv().await {
        let (Some(c), Some(r)) = (ev.capsule.as_ref(), ev.name_refused.as_ref()) else {
            continue;
        };
        let (Some(reference), Some((reason, note))) = (regarding(c), refusal_note(r)) else {
            tracing::debug!(reason = %r.reason, "name refusal not shown");
            continue;
        };
        ctx.event(&reference, EventType::Warning, reason, note)
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(reason: &str, queries: u32) -> pb::NameRefused {
        pb::NameRefused {
            name: "evil.example".into(),
            reason: reason.into(),
            queries,
        }
    }

    #[test]
    fn each_reason_says_what_happened_and_what_to_change() {
        let (reason, note) = refusal_note(&report("NameNotAllowed", 1)).unwrap();
        assert_eq!(reason, Reason::NameNotAllowed);
        assert!(note.contains("\"evil.example\""), "{note}");
        assert!(note.contains("allowHosts"), "{note}");
        assert!(!note.contains("lookups"), "{note}");
        let (reason, note) = refusal_note(&report("NameUnresolved", 7)).unwrap();
        assert_eq!(reason, Reason::NameUnresolved);
        assert!(note.contains("(7 lookups since the last report)"), "{note}");
        assert!(note.contains("nameservers"), "{note}");
        // A reason from a newer agent, or one that is not about names.
        assert_eq!(refusal_note(&report("NameFromTheFuture", 1)), None);
        assert_eq!(refusal_note(&report("Running", 1)), None);
    }

    /// From the agent's event stream to a Warning Event regarding the
    /// Capsule, without touching the pool's view of it.
    #[tokio::test]
    async fn an_agents_report_becomes_a_warning_event_on_the_capsule() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::time::Duration;

        use crate::fixtures::{ApiServer, Reply, agent, context, pool};

        let node = agent("node-a", 4);
        node.insert("u1", "ns", "c1", pb::CapsuleState::Running);
        let (pool, streams) = pool(std::slice::from_ref(&node)).await;
        wrenn_testkit::eventually(Duration::from_secs(5), "capsule never listed", || {
            pool.reported("node-a", "u1").is_some()
        })
        .await;
        let server = ApiServer::default();
        let posted = Arc::new(AtomicBool::new(false));
        let seen = posted.clone();
        server.expect(
            http::Method::POST,
            "/apis/events.k8s.io/v1/namespaces/ns/events",
            move |body| {
                assert_eq!(body["type"], "Warning", "{body:#}");
                assert_eq!(body["reason"], "NameNotAllowed", "{body:#}");
                assert_eq!(body["regarding"]["kind"], "Capsule", "{body:#}");
                assert_eq!(body["regarding"]["name"], "c1", "{body:#}");
                assert_eq!(body["regarding"]["uid"], "u1", "{body:#}");
                let note = body["note"].as_str().unwrap();
                assert!(note.contains("\"pypi.evil.example\" (3 lookups"), "{note}");
                seen.store(true, Ordering::SeqCst);
            },
            Reply::Echo,
        );
        let ctx = context(&server, pool.clone());
        let before = pool.reported("node-a", "u1");
        let task = tokio::spawn(report_refusals(ctx, streams.refusals));
        node.refuse_name("u1", "pypi.evil.example", Reason::NameNotAllowed, 3);
        wrenn_testkit::eventually(Duration::from_secs(5), "no Event posted", || {
            posted.load(Ordering::SeqCst)
        })
        .await;
        server.done();
        assert_eq!(pool.reported("node-a", "u1"), before);
        task.abort();
        pool.shutdown();
    }

    #[test]
    fn a_view_without_its_object_names_nothing() {
        let mut c = pb::Capsule {
            uid: "u1".into(),
            spec: Some(pb::CapsuleSpec {
                namespace: "ns".into(),
                name: "c1".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let r = regarding(&c).unwrap();
        assert_eq!(
            (r.kind.as_deref(), r.name.as_deref(), r.uid.as_deref()),
            (Some("Capsule"), Some("c1"), Some("u1"))
        );
        c.spec = None;
        assert_eq!(regarding(&c), None);
    }
}
