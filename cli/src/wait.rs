//! Waiting for the operator: what "done" means for a capsule or a snapshot
//! (pure verdicts), and one watch of one object until its verdict is in or
//! the deadline passes. A watch, not a polling loop: every status write
//! the operator makes arrives as an event.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use futures::StreamExt as _;
use kube::Api;
use kube::runtime::watcher::{self, watcher};
use wrenn_crds::capsule::CapsulePhase;
use wrenn_crds::reason::{ConditionStatus, ConditionType, find_condition};
use wrenn_crds::snapshot::SnapshotPhase;
use wrenn_crds::{Capsule, CapsuleSnapshot};

use crate::cluster::{self, Target};

/// What `wait --for` waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitFor {
    /// `phase=Running`: `status.phase` is this.
    Phase(CapsulePhase),
    /// `condition=Ready[=True]`: the condition has this status.
    Condition(ConditionType, ConditionStatus),
}

impl FromStr for WaitFor {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let usage = "write phase=PHASE or condition=TYPE[=True|False]";
        match s.split_once('=') {
            Some(("phase", phase)) => parse_phase(phase).map(WaitFor::Phase),
            Some(("condition", cond)) => {
                let (ty, status) = cond
                    .split_once('=')
                    .unwrap_or((cond, ConditionStatus::True.as_str()));
                let ty = ConditionType::ALL
                    .iter()
                    .copied()
                    .find(|t| t.as_str().eq_ignore_ascii_case(ty))
                    .ok_or_else(|| {
                        format!(
                            "no condition {ty:?}: capsules have {}",
                            names(ConditionType::ALL.iter().map(|t| t.as_str()))
                        )
                    })?;
                let status = ConditionStatus::ALL
                    .iter()
                    .copied()
                    .find(|v| v.as_str().eq_ignore_ascii_case(status))
                    .ok_or_else(|| {
                        format!("condition status {status:?} is not True, False or Unknown")
                    })?;
                Ok(WaitFor::Condition(ty, status))
            }
            _ => Err(format!("{s:?}: {usage}")),
        }
    }
}

impl fmt::Display for WaitFor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaitFor::Phase(p) => write!(f, "phase={}", phase_name(*p)),
            WaitFor::Condition(t, s) => write!(f, "condition={t}={s}"),
        }
    }
}

/// Every phase, for parsing and for the error that lists them.
const PHASES: [CapsulePhase; 12] = [
    CapsulePhase::Pending,
    CapsulePhase::Scheduled,
    CapsulePhase::Creating,
    CapsulePhase::Running,
    CapsulePhase::Pausing,
    CapsulePhase::Paused,
    CapsulePhase::Suspending,
    CapsulePhase::Suspended,
    CapsulePhase::Resuming,
    CapsulePhase::Terminating,
    CapsulePhase::Failed,
    CapsulePhase::Expired,
];

/// The phase as the API writes it (its serde name).
pub fn phase_name<P: serde::Serialize + fmt::Debug>(p: P) -> String {
    serde_json::to_value(&p)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{p:?}"))
}

fn parse_phase(text: &str) -> Result<CapsulePhase, String> {
    PHASES
        .into_iter()
        .find(|p| phase_name(*p).eq_ignore_ascii_case(text))
        .ok_or_else(|| {
            format!(
                "no phase {text:?}: capsules are {}",
                names(PHASES.into_iter().map(phase_name))
            )
        })
}

fn names<S: AsRef<str>>(all: impl Iterator<Item = S>) -> String {
    all.map(|s| s.as_ref().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Where an object stands against what is awaited.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Reached.
    Met,
    /// Not yet; how it stands now, for a timeout message.
    Pending(String),
    /// Can no longer be reached; why.
    Failed(String),
}

/// How a capsule stands, for messages: its phase and, when not Ready,
/// what the Ready condition says.
fn describe_capsule(c: &Capsule) -> String {
    let status = c.status.as_ref();
    let phase = status.and_then(|s| s.phase).map_or_else(
        || "no phase yet".to_string(),
        |p| format!("phase {}", phase_name(p)),
    );
    match status.and_then(|s| find_condition(&s.conditions, ConditionType::Ready)) {
        Some(r) if r.status != ConditionStatus::True && !r.message.is_empty() => {
            format!("{phase}; {}: {}", r.reason, r.message)
        }
        _ => phase,
    }
}

/// Whether `c` is as `want` asks (pure). With `min_generation`, a status
/// the operator wrote before it saw that generation of the spec does not
/// count: right after `pause`, the old `Running` must not end a wait for
/// `Running` after a `resume`. `Failed` and `Expired` end every wait that
/// does not ask for them.
pub fn plan_capsule(c: &Capsule, want: WaitFor, min_generation: Option<i64>) -> Verdict {
    let status = c.status.as_ref();
    let phase = status.and_then(|s| s.phase);
    let observed = status.and_then(|s| s.observed_generation).unwrap_or(0);
    if let Some(min) = min_generation
        && observed < min
    {
        return Verdict::Pending(format!(
            "{}; the operator has not acted on generation {min} yet",
            describe_capsule(c)
        ));
    }
    let met = match want {
        WaitFor::Phase(p) => phase == Some(p),
        WaitFor::Condition(ty, st) => status
            .and_then(|s| find_condition(&s.conditions, ty))
            .is_some_and(|c| c.status == st),
    };
    if met {
        return Verdict::Met;
    }
    match phase {
        Some(p @ (CapsulePhase::Failed | CapsulePhase::Expired)) if want != WaitFor::Phase(p) => {
            Verdict::Failed(describe_capsule(c))
        }
        _ => Verdict::Pending(describe_capsule(c)),
    }
}

/// Whether a snapshot is ready for capsules to start from (pure).
pub fn plan_snapshot(s: &CapsuleSnapshot) -> Verdict {
    let status = s.status.as_ref();
    let ready = status.and_then(|s| find_condition(&s.conditions, ConditionType::Ready));
    let why = ready
        .filter(|r| !r.message.is_empty())
        .map(|r| format!("; {}: {}", r.reason, r.message))
        .unwrap_or_default();
    match status.and_then(|s| s.phase) {
        Some(SnapshotPhase::Ready) => Verdict::Met,
        Some(SnapshotPhase::Failed) => Verdict::Failed(format!("phase Failed{why}")),
        Some(p) => Verdict::Pending(format!("phase {p:?}{why}")),
        None => Verdict::Pending("no phase yet".into()),
    }
}

/// Why a wait ended without its verdict.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The deadline passed.
    #[error("{kind} {name:?} is not {want} after {}s (now: {now})", after.as_secs())]
    Timeout {
        /// Object kind.
        kind: &'static str,
        /// Its name.
        name: String,
        /// What was awaited.
        want: String,
        /// The timeout.
        after: Duration,
        /// How it stood last.
        now: String,
    },
    /// It can no longer get there.
    #[error("{kind} {name:?} failed: {why}")]
    Failed {
        /// Object kind.
        kind: &'static str,
        /// Its name.
        name: String,
        /// How it stands.
        why: String,
    },
    /// The watch stream ended (the watcher reconnects by itself; this is
    /// not expected).
    #[error("the watch of {kind} {name:?} ended")]
    Ended {
        /// Object kind.
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// It was deleted while we waited.
    #[error("{kind} {name:?} was deleted")]
    Deleted {
        /// Object kind.
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// Watching was refused or broke.
    #[error("watch {kind} {name:?}")]
    Watch {
        /// Object kind.
        kind: &'static str,
        /// Its name.
        name: String,
        /// Why.
        #[source]
        source: cluster::Error,
    },
    /// The object does not exist.
    #[error(transparent)]
    NotFound(cluster::Error),
}

/// A watch failure that retrying cannot fix (RBAC, a bad request), as
/// opposed to a dropped connection the watcher reconnects after.
fn fatal(err: watcher::Error) -> Option<kube::Error> {
    let e = match err {
        watcher::Error::InitialListFailed(e)
        | watcher::Error::WatchStartFailed(e)
        | watcher::Error::WatchFailed(e) => e,
        watcher::Error::WatchError(s) => kube::Error::Api(s),
        watcher::Error::NoResourceVersion => return None,
    };
    match &e {
        kube::Error::Api(s) if (400..500).contains(&s.code) && ![410, 429].contains(&s.code) => {
            Some(e)
        }
        _ => None,
    }
}

/// Watches `kind` `name` until `plan` says [`Verdict::Met`] (returning
/// the object), [`Verdict::Failed`], or `timeout` passes.
pub async fn until<K>(
    target: &Target,
    kind: &'static str,
    name: &str,
    want: &str,
    timeout: Duration,
    plan: impl Fn(&K) -> Verdict,
) -> Result<K, Error>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + 'static,
{
    let api: Api<K> = Api::namespaced(target.client.clone(), &target.namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher(api, config).boxed();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut now = "not seen yet".to_string();
    // Whether the object was in the current (re)list.
    let mut listed = false;
    loop {
        let event = match tokio::time::timeout_at(deadline, events.next()).await {
            Err(_elapsed) => {
                return Err(Error::Timeout {
                    kind,
                    name: name.into(),
                    want: want.into(),
                    after: timeout,
                    now,
                });
            }
            Ok(None) => {
                return Err(Error::Ended {
                    kind,
                    name: name.into(),
                });
            }
            Ok(Some(Err(err))) => match fatal(err) {
                Some(e) => {
                    return Err(Error::Watch {
                        kind,
                        name: name.into(),
                        source: target.refusal(e, kind, name),
                    });
                }
                // The watcher relists and goes on.
                None => continue,
            },
            Ok(Some(Ok(event))) => event,
        };
        let object = match event {
            watcher::Event::Init => {
                listed = false;
                continue;
            }
            watcher::Event::InitDone if listed => continue,
            watcher::Event::InitDone => {
                return Err(Error::NotFound(cluster::Error::NotFound {
                    kind,
                    name: name.into(),
                    namespace: target.namespace.clone(),
                }));
            }
            watcher::Event::Delete(_) => {
                return Err(Error::Deleted {
                    kind,
                    name: name.into(),
                });
            }
            watcher::Event::InitApply(o) => {
                listed = true;
                o
            }
            watcher::Event::Apply(o) => o,
        };
        match plan(&object) {
            Verdict::Met => return Ok(object),
            Verdict::Failed(why) => {
                return Err(Error::Failed {
                    kind,
                    name: name.into(),
                    why,
                });
            }
            Verdict::Pending(how) => now = how,
        }
    }
}

/// Watches capsule `name` until it is as `want` asks for a spec of at
/// least `min_generation` (see [`plan_capsule`]).
pub async fn capsule(
    target: &Target,
    name: &str,
    want: WaitFor,
    min_generation: Option<i64>,
    timeout: Duration,
) -> Result<Capsule, Error> {
    let plan = |c: &Capsule| plan_capsule(c, want, min_generation);
    until(target, "capsule", name, &want.to_string(), timeout, plan).await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn capsule(generation: i64, status: serde_json::Value) -> Capsule {
        serde_json::from_value(json!({
            "apiVersion": "wrenn.dev/v1alpha1", "kind": "Capsule",
            "metadata": { "name": "box", "generation": generation },
            "spec": { "source": { "templateRef": { "name": "base" } } },
            "status": status,
        }))
        .unwrap()
    }

    fn ready(status: &str, reason: &str, message: &str) -> serde_json::Value {
        json!({ "type": "Ready", "status": status, "reason": reason, "message": message,
                "lastTransitionTime": "2026-01-01T00:00:00Z" })
    }

    #[test]
    fn for_reads_phases_and_conditions_in_any_case() {
        assert_eq!(
            "phase=suspended".parse::<WaitFor>().unwrap(),
            WaitFor::Phase(CapsulePhase::Suspended)
        );
        assert_eq!(
            "condition=Ready".parse::<WaitFor>().unwrap(),
            WaitFor::Condition(ConditionType::Ready, ConditionStatus::True)
        );
        assert_eq!(
            "condition=paused=false".parse::<WaitFor>().unwrap(),
            WaitFor::Condition(ConditionType::Paused, ConditionStatus::False)
        );
        let err = "phase=Sleeping".parse::<WaitFor>().unwrap_err();
        assert!(
            err.contains("Running") && err.contains("Suspended"),
            "{err}"
        );
        let err = "condition=Happy".parse::<WaitFor>().unwrap_err();
        assert!(err.contains("Ready"), "{err}");
        assert!("Running".parse::<WaitFor>().is_err());
        assert_eq!(
            WaitFor::Condition(ConditionType::Ready, ConditionStatus::True).to_string(),
            "condition=Ready=True"
        );
    }

    #[test]
    fn a_phase_is_met_only_once_the_operator_saw_the_change() {
        let want = WaitFor::Phase(CapsulePhase::Running);
        // Still Running from before a pause that was then undone: the
        // operator has not observed generation 3 yet.
        let stale = capsule(3, json!({ "phase": "Running", "observedGeneration": 2 }));
        assert!(
            matches!(plan_capsule(&stale, want, Some(3)), Verdict::Pending(m) if m.contains("generation 3"))
        );
        let fresh = capsule(3, json!({ "phase": "Running", "observedGeneration": 3 }));
        assert_eq!(plan_capsule(&fresh, want, Some(3)), Verdict::Met);
        // `wait` itself takes the status as it is, like kubectl wait.
        assert_eq!(plan_capsule(&stale, want, None), Verdict::Met);
    }

    #[test]
    fn failure_ends_the_wait_with_the_ready_message() {
        let failed = capsule(
            1,
            json!({ "phase": "Failed", "observedGeneration": 1,
                    "conditions": [ready("False", "VmCrashed", "the VMM exited")] }),
        );
        let v = plan_capsule(&failed, WaitFor::Phase(CapsulePhase::Running), Some(1));
        assert_eq!(
            v,
            Verdict::Failed("phase Failed; VmCrashed: the VMM exited".into())
        );
        // Unless failure is what was asked for.
        assert_eq!(
            plan_capsule(&failed, WaitFor::Phase(CapsulePhase::Failed), None),
            Verdict::Met
        );
    }

    #[test]
    fn conditions_are_matched_by_type_and_status() {
        let c = capsule(
            1,
            json!({ "phase": "Pending", "conditions": [ready("False", "Unschedulable", "no node has 64 vCPUs")] }),
        );
        let want_ready = WaitFor::Condition(ConditionType::Ready, ConditionStatus::True);
        assert_eq!(
            plan_capsule(&c, want_ready, None),
            Verdict::Pending("phase Pending; Unschedulable: no node has 64 vCPUs".into())
        );
        let want_not_ready = WaitFor::Condition(ConditionType::Ready, ConditionStatus::False);
        assert_eq!(plan_capsule(&c, want_not_ready, None), Verdict::Met);
        let bare = capsule(1, json!(null));
        assert_eq!(
            plan_capsule(&bare, want_ready, None),
            Verdict::Pending("no phase yet".into())
        );
    }

    fn snapshot(status: serde_json::Value) -> CapsuleSnapshot {
        serde_json::from_value(json!({
            "apiVersion": "wrenn.dev/v1alpha1", "kind": "CapsuleSnapshot",
            "metadata": { "name": "s" },
            "spec": { "capsuleName": "box" },
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn a_snapshot_is_done_when_ready_and_fails_with_its_reason() {
        assert_eq!(
            plan_snapshot(&snapshot(json!({ "phase": "Ready", "readyToUse": true }))),
            Verdict::Met
        );
        assert_eq!(
            plan_snapshot(&snapshot(json!({ "phase": "InProgress" }))),
            Verdict::Pending("phase InProgress".into())
        );
        assert_eq!(
            plan_snapshot(&snapshot(json!({
                "phase": "Failed",
                "conditions": [ready("False", "NodeError", "disk full")],
            }))),
            Verdict::Failed("phase Failed; NodeError: disk full".into())
        );
    }
}
