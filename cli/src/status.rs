//! `status`: one capsule's mode, phase, node, address and conditions, read
//! with a single GET and laid out for people (pure rendering).

use std::fmt::Write as _;

use kube::Api;
use wrenn_crds::Capsule;

use crate::cluster::{self, Target};
use crate::wait::phase_name;

/// Why the capsule could not be shown.
#[derive(Debug, thiserror::Error)]
#[error("read capsule {capsule:?}")]
pub struct Error {
    capsule: String,
    #[source]
    source: cluster::Error,
}

/// Reads `capsule` and renders it.
pub async fn show(target: &Target, capsule: &str) -> Result<String, Error> {
    let c = Api::<Capsule>::namespaced(target.client.clone(), &target.namespace)
        .get(capsule)
        .await
        .map_err(|e| Error {
            capsule: capsule.into(),
            source: target.refusal(e, "capsule", capsule),
        })?;
    Ok(render(&c, &target.namespace))
}

/// The text `status` prints (pure).
pub fn render(c: &Capsule, namespace: &str) -> String {
    let st = c.status.clone().unwrap_or_default();
    let or_none = |v: Option<String>| v.unwrap_or_else(|| "<none>".into());
    let mut out = String::new();
    let name = c.metadata.name.as_deref().unwrap_or_default();
    let _ = writeln!(out, "Capsule:    {name} (namespace {namespace})");
    let _ = writeln!(out, "Mode:       {:?}", c.spec.operating_mode);
    let _ = writeln!(out, "Phase:      {}", or_none(st.phase.map(phase_name)));
    let _ = writeln!(out, "Node:       {}", or_none(st.node_name));
    let _ = writeln!(out, "IP:         {}", or_none(st.ip));
    if st.conditions.is_empty() {
        let _ = writeln!(out, "Conditions: <none>");
    } else {
        let _ = writeln!(out, "Conditions:");
        for cond in &st.conditions {
            let _ = write!(out, "  {}={} {}", cond.type_, cond.status, cond.reason);
            if !cond.message.is_empty() {
                let _ = write!(out, ": {}", cond.message);
            }
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn status_shows_intent_next_to_what_the_operator_reports() {
        let c: Capsule = serde_json::from_value(json!({
            "apiVersion": "wrenn.dev/v1alpha1", "kind": "Capsule",
            "metadata": { "name": "box" },
            "spec": { "source": { "templateRef": { "name": "base" } }, "operatingMode": "Paused" },
            "status": {
                "phase": "Pausing", "nodeName": "n1",
                "conditions": [
                    { "type": "Ready", "status": "False", "reason": "PausedByUser", "message": "",
                      "lastTransitionTime": "2026-01-01T00:00:00Z" },
                ],
            },
        }))
        .unwrap();
        assert_eq!(
            render(&c, "team-a"),
            "Capsule:    box (namespace team-a)\n\
             Mode:       Paused\n\
             Phase:      Pausing\n\
             Node:       n1\n\
             IP:         <none>\n\
             Conditions:\n  Ready=False PausedByUser\n"
        );
    }

    #[test]
    fn a_capsule_the_operator_has_not_seen_says_so() {
        let c: Capsule = serde_json::from_value(json!({
            "apiVersion": "wrenn.dev/v1alpha1", "kind": "Capsule",
            "metadata": { "name": "new" },
            "spec": { "source": { "templateRef": { "name": "base" } } },
        }))
        .unwrap();
        let text = render(&c, "default");
        assert!(text.contains("Phase:      <none>\n"), "{text}");
        assert!(text.contains("Conditions: <none>\n"), "{text}");
    }
}
