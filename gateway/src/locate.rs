//! Where a capsule runs: its `Capsule` object (phase, `status.nodeName`,
//! UID) and the node agent Pod on that node, found the way the operator
//! finds agents (the DaemonSet's label, the Pod IP, the agent port). The
//! gRPC channel to each agent is opened through the operator's
//! [`GrpcConnector`] with the gateway's own client certificate, and kept.
//!
//! Capsules are followed by a watch, so a request to a Running capsule
//! costs no API call of its own (it was most of the gateway's share of an
//! exec). Only a Running capsule is taken from the cache: one absent or
//! not Running there is read from the API server, so every refusal a user
//! sees is fresh. A cache a moment behind a pause sends the call to the
//! agent, which refuses it with the capsule's state.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tonic::transport::Channel;
use wrenn_crds::Capsule;
use wrenn_crds::capsule::{CapsulePhase, Protocol};
use wrenn_operator::agent::GrpcConnector;

use crate::route::{Reason, Refusal};

/// A running capsule's agent-side identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Capsule UID (the agent's key).
    pub uid: String,
    /// Node it runs on.
    pub node: String,
    /// Its TCP ports declared in `spec.network.ports`: the only ones
    /// `portforward` and `proxy` reach.
    pub ports: Vec<DeclaredPort>,
}

/// A TCP port a capsule declares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeclaredPort {
    /// Its name, if any.
    pub name: Option<String>,
    /// The guest port.
    pub port: u16,
}

impl Target {
    /// The declared port `asked` names (a number or a port's name), or
    /// why it may not be reached (pure).
    pub fn declared(&self, capsule: &str, asked: &str) -> Result<u16, Refusal> {
        let found = self
            .ports
            .iter()
            .find(|p| p.port.to_string() == asked || p.name.as_deref() == Some(asked));
        match found {
            Some(p) => Ok(p.port),
            None => {
                let declared: Vec<String> = self.ports.iter().map(|p| p.port.to_string()).collect();
                let declared = if declared.is_empty() {
                    "none".to_string()
                } else {
                    declared.join(", ")
                };
                Err(Refusal::capsule(
                    Reason::Forbidden,
                    capsule,
                    format!(
                        "port {asked} is not declared in spec.network.ports of capsule \"{capsule}\" (declared TCP ports: {declared}); only declared ports can be forwarded or proxied"
                    ),
                ))
            }
        }
    }
}

/// Whether `capsule` (as read, `None` when absent) can be reached (pure):
/// 404 naming it when absent, 409 with the phase when not Running.
pub fn plan_target(
    namespace: &str,
    name: &str,
    capsule: Option<&Capsule>,
) -> Result<Target, Refusal> {
    let Some(c) = capsule else {
        return Err(Refusal::capsule(
            Reason::NotFound,
            name,
            format!("capsules.wrenn.dev \"{name}\" not found in namespace \"{namespace}\""),
        ));
    };
    let status = c.status.as_ref();
    let phase = status.and_then(|s| s.phase);
    if phase != Some(CapsulePhase::Running) {
        let shown = phase.map_or_else(|| "Pending".to_string(), |p| format!("{p:?}"));
        let hint = match phase {
            Some(CapsulePhase::Paused | CapsulePhase::Suspended) => {
                "set spec.operatingMode: Running to resume it"
            }
            Some(CapsulePhase::Failed | CapsulePhase::Expired | CapsulePhase::Terminating) => {
                "it has no running VM"
            }
            _ => "wait until it is Running",
        };
        return Err(Refusal::capsule(
            Reason::Conflict,
            name,
            format!("capsule \"{name}\" is {shown}, not Running: {hint}"),
        ));
    }
    let node = status.and_then(|s| s.node_name.clone()).ok_or_else(|| {
        Refusal::capsule(
            Reason::Conflict,
            name,
            format!("capsule \"{name}\" is Running but names no node yet; try again"),
        )
    })?;
    let uid = c
        .metadata
        .uid
        .clone()
        .ok_or_else(|| Refusal::capsule(Reason::InternalError, name, "capsule has no UID"))?;
    let ports = c
        .spec
        .network
        .as_ref()
        .map(|n| {
            n.ports
                .iter()
                .filter(|p| p.protocol == Protocol::TCP)
                .map(|p| DeclaredPort {
                    name: p.name.clone(),
                    port: p.port,
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Target { uid, node, ports })
}

/// The agent address on `node` among the agent Pods (pure): a Pod bound to
/// the node, not being deleted, with a Pod IP.
pub fn plan_agent_addr<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
    node: &str,
    port: u16,
) -> Option<SocketAddr> {
    pods.into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
        .find_map(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|ip| ip.parse::<IpAddr>().ok())
        })
        .map(|ip| SocketAddr::new(ip, port))
}

/// What the cache keeps of a Capsule: the fields [`plan_target`] reads
/// (a Capsule's managed fields and annotations can outweigh the rest).
fn slim(c: &mut Capsule) {
    c.managed_fields_mut().clear();
    c.annotations_mut().clear();
}

/// Finds capsules and their agents.
#[derive(Clone)]
pub struct Locator {
    client: kube::Client,
    pods: Store<Pod>,
    capsules: Store<Capsule>,
    listed: Arc<AtomicBool>,
    port: u16,
    connector: GrpcConnector,
    channels: Arc<Mutex<HashMap<SocketAddr, Channel>>>,
}

impl std::fmt::Debug for Locator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Locator")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl Locator {
    /// Starts following the agent Pods (`selector` in `namespace`); the
    /// returned future drives the watch and never ends.
    pub fn new(
        client: kube::Client,
        namespace: &str,
        selector: &str,
        port: u16,
        connector: GrpcConnector,
    ) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let (store, writer) = reflector::store();
        let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
        let stream = reflector::reflector(
            writer,
            watcher(api, watcher::Config::default().labels(selector)),
        )
        .default_backoff()
        .for_each(|ev| async move {
            if let Err(err) = ev {
                tracing::warn!(error = &err as &dyn std::error::Error, "watch agent pods");
            }
        });
        let (capsules, writer) = reflector::store();
        let capsule_stream = reflector::reflector(
            writer,
            watcher(
                Api::<Capsule>::all(client.clone()),
                watcher::Config::default(),
            )
            .modify(slim),
        )
        .default_backoff()
        .for_each(|ev| async move {
            if let Err(err) = ev {
                tracing::warn!(error = &err as &dyn std::error::Error, "watch capsules");
            }
        });
        let listed = Arc::new(AtomicBool::new(false));
        let (flag, first_list) = (listed.clone(), store.clone());
        let drive = async move {
            let mark = async move {
                if first_list.wait_until_ready().await.is_ok() {
                    flag.store(true, Ordering::Relaxed);
                }
            };
            tokio::join!(stream, capsule_stream, mark);
        };
        (
            Self {
                client,
                pods: store,
                capsules,
                listed,
                port,
                connector,
                channels: Arc::default(),
            },
            drive,
        )
    }

    /// Whether the agent Pods were listed once.
    pub fn ready(&self) -> bool {
        self.listed.load(Ordering::Relaxed)
    }

    /// The running capsule `namespace/name`, or the refusal the user reads.
    pub async fn target(&self, namespace: &str, name: &str) -> Result<Target, Refusal> {
        let cached = self
            .capsules
            .get(&ObjectRef::new(name).within(namespace))
            .and_then(|c| plan_target(namespace, name, Some(&c)).ok());
        if let Some(t) = cached {
            return Ok(t);
        }
        let api: Api<Capsule> = Api::namespaced(self.client.clone(), namespace);
        let capsule = api.get_opt(name).await.map_err(|err| {
            tracing::warn!(error = &err as &dyn std::error::Error, %namespace, %name, "read capsule");
            Refusal::capsule(
                Reason::ServiceUnavailable,
                name,
                format!("could not read capsule \"{name}\"; try again"),
            )
        })?;
        plan_target(namespace, name, capsule.as_ref())
    }

    /// A channel to the agent of `node`.
    pub fn channel(&self, node: &str) -> Result<Channel, Refusal> {
        let pods = self.pods.state();
        let addr =
            plan_agent_addr(pods.iter().map(|p| p.as_ref()), node, self.port).ok_or_else(|| {
                Refusal::new(
                    Reason::ServiceUnavailable,
                    format!("no node agent is running on node \"{node}\""),
                )
            })?;
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = channels.get(&addr) {
            return Ok(c.clone());
        }
        let channel = self.connector.channel(node, addr).map_err(|err| {
            tracing::warn!(error = &err as &dyn std::error::Error, %node, "agent channel");
            Refusal::new(
                Reason::ServiceUnavailable,
                format!("cannot reach the node agent of node \"{node}\""),
            )
        })?;
        channels.insert(addr, channel.clone());
        Ok(channel)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use serde_json::json;

    use super::*;

    fn capsule(phase: Option<&str>, node: Option<&str>) -> Capsule {
        serde_json::from_value(json!({
            "apiVersion": "wrenn.dev/v1alpha1", "kind": "Capsule",
            "metadata": { "name": "web", "namespace": "a", "uid": "u-1" },
            "spec": { "source": { "templateRef": { "name": "base" } } },
            "status": { "phase": phase, "nodeName": node },
        }))
        .unwrap()
    }

    #[test]
    fn a_running_capsule_names_its_uid_and_node() {
        let t = plan_target("a", "web", Some(&capsule(Some("Running"), Some("n1")))).unwrap();
        assert_eq!(
            t,
            Target {
                uid: "u-1".into(),
                node: "n1".into(),
                ports: vec![],
            }
        );
    }

    #[test]
    fn only_declared_tcp_ports_are_reached() {
        let mut c = capsule(Some("Running"), Some("n1"));
        c.spec.network = serde_json::from_value(json!({ "ports": [
            { "port": 8080, "name": "web" }, { "port": 53, "protocol": "UDP" }
        ] }))
        .unwrap();
        let t = plan_target("a", "web", Some(&c)).unwrap();
        assert_eq!(t.declared("web", "8080").unwrap(), 8080);
        assert_eq!(t.declared("web", "web").unwrap(), 8080);
        for undeclared in ["53", "22", "x"] {
            let e = t.declared("web", undeclared).unwrap_err();
            assert_eq!(e.reason, Reason::Forbidden);
            assert!(e.message.contains("not declared"), "{}", e.message);
            assert!(e.message.contains("8080"), "{}", e.message);
        }
    }

    #[test]
    fn absent_is_404_naming_it_and_not_running_is_409_with_the_phase() {
        let e = plan_target("a", "web", None).unwrap_err();
        assert_eq!(e.reason, Reason::NotFound);
        assert!(e.message.contains("\"web\""), "{}", e.message);
        let e = plan_target("a", "web", Some(&capsule(Some("Paused"), Some("n1")))).unwrap_err();
        assert_eq!(e.reason, Reason::Conflict);
        assert!(e.message.contains("Paused"), "{}", e.message);
        let e = plan_target("a", "web", Some(&capsule(None, None))).unwrap_err();
        assert!(e.message.contains("Pending"), "{}", e.message);
    }

    #[test]
    fn the_agent_is_the_live_pod_on_the_node() {
        let pod = |name: &str, node: &str, ip: Option<&str>, deleting: bool| -> Pod {
            let mut p: Pod = serde_json::from_value(json!({
                "metadata": { "name": name },
                "spec": { "nodeName": node, "containers": [] },
                "status": { "podIP": ip },
            }))
            .unwrap();
            if deleting {
                p.metadata.deletion_timestamp = Some(
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff_now()),
                );
            }
            p
        };
        let pods = [
            pod("old", "n1", Some("10.0.0.1"), true),
            pod("other", "n2", Some("10.0.0.2"), false),
            pod("new", "n1", Some("10.0.0.3"), false),
        ];
        assert_eq!(
            plan_agent_addr(&pods, "n1", 7443),
            Some("10.0.0.3:7443".parse().unwrap())
        );
        assert_eq!(plan_agent_addr(&pods, "n3", 7443), None);
    }

    fn jiff_now() -> k8s_openapi::jiff::Timestamp {
        k8s_openapi::jiff::Timestamp::UNIX_EPOCH
    }
}
