//! Published ports as cluster objects: for a capsule whose spec has TCP
//! ports with `from`, a selector-less ClusterIP `Service` named like the
//! capsule (service port = guest port) and one `EndpointSlice` whose
//! endpoint is the capsule node's InternalIP with the host ports the node
//! agent reported. Both are owned by the Capsule, so they go with it.
//! Pure: builds the objects and their comparable shape; the controller
//! (`controller/capsule/publish.rs`) reads, compares and applies them.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use wrenn_crds::Capsule;
use wrenn_crds::capsule::Protocol;
use wrenn_crds::names::label;

/// `kubernetes.io/service-name`: ties an EndpointSlice to its Service.
const SERVICE_NAME: &str = "kubernetes.io/service-name";
/// `endpointslice.kubernetes.io/managed-by`.
const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";

/// What the objects are built from.
#[derive(Clone, Debug)]
pub struct PublishFacts<'a> {
    /// The capsule.
    pub cap: &'a Capsule,
    /// Its node's InternalIP (IPv4), when known.
    pub node_ip: Option<&'a str>,
    /// Its node's name.
    pub node: Option<&'a str>,
    /// The VM runs (Running): only then is the endpoint ready.
    pub running: bool,
    /// Host ports the node reported: (guest port, node port).
    pub host_ports: &'a [(u16, u16)],
}

/// The objects a capsule should have.
#[derive(Clone, Debug, PartialEq)]
pub struct Published {
    /// The Service.
    pub service: Service,
    /// Its one EndpointSlice.
    pub slice: EndpointSlice,
}

/// A published port: (name, guest port).
fn published_ports(cap: &Capsule) -> Vec<(String, u16)> {
    let mut out: Vec<(String, u16)> = cap
        .spec
        .network
        .iter()
        .flat_map(|n| &n.ports)
        .filter(|p| p.protocol == Protocol::TCP && !p.from.is_empty())
        .map(|p| {
            let name = p.name.clone().unwrap_or_else(|| format!("tcp-{}", p.port));
            (name, p.port)
        })
        .collect();
    out.sort_by_key(|(_, p)| *p);
    out
}

/// The name of a capsule's EndpointSlice (its Service has the capsule's).
pub fn slice_name(capsule: &str) -> String {
    format!("{capsule}-wrenn")
}

/// A node's InternalIP, IPv4.
pub fn internal_ip(node: &Node) -> Option<String> {
    node.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .find(|a| a.type_ == "InternalIP" && a.address.parse::<std::net::Ipv4Addr>().is_ok())
        .map(|a| a.address.clone())
}

fn meta(cap: &Capsule, name: String, extra: &[(&str, &str)]) -> Option<ObjectMeta> {
    let owner = cap.controller_owner_ref(&())?;
    let mut labels = BTreeMap::from([(label::CAPSULE.to_string(), cap.meta().name.clone()?)]);
    for (k, v) in extra {
        labels.insert((*k).to_string(), (*v).to_string());
    }
    Some(ObjectMeta {
        name: Some(name),
        namespace: cap.meta().namespace.clone(),
        labels: Some(labels),
        owner_references: Some(vec![OwnerReference {
            block_owner_deletion: Some(true),
            ..owner
        }]),
        ..ObjectMeta::default()
    })
}

/// Builds the objects; `None` when the capsule publishes no port (or has
/// no name or UID yet).
pub fn build_published(f: &PublishFacts<'_>) -> Option<Published> {
    let ports = published_ports(f.cap);
    if ports.is_empty() {
        return None;
    }
    let name = f.cap.meta().name.clone()?;
    let service = Service {
        metadata: meta(f.cap, name.clone(), &[])?,
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            ports: Some(
                ports
                    .iter()
                    .map(|(n, p)| ServicePort {
                        name: Some(n.clone()),
                        port: (*p).into(),
                        target_port: Some(IntOrString::Int((*p).into())),
                        protocol: Some("TCP".into()),
                        ..ServicePort::default()
                    })
                    .collect(),
            ),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };
    let slice_ports: Vec<EndpointPort> = ports
        .iter()
        .filter_map(|(n, p)| {
            let (_, host) = f.host_ports.iter().find(|(g, _)| g == p)?;
            Some(EndpointPort {
                name: Some(n.clone()),
                port: Some((*host).into()),
                protocol: Some("TCP".into()),
                app_protocol: None,
            })
        })
        .collect();
    let endpoints = match f.node_ip {
        Some(ip) if !slice_ports.is_empty() => vec![Endpoint {
            addresses: vec![ip.to_string()],
            conditions: Some(EndpointConditions {
                ready: Some(f.running),
                serving: Some(f.running),
                terminating: Some(false),
            }),
            node_name: f.node.map(str::to_string),
            ..Endpoint::default()
        }],
        _ => Vec::new(),
    };
    let slice = EndpointSlice {
        metadata: meta(
            f.cap,
            slice_name(&name),
            &[(SERVICE_NAME, &name), (MANAGED_BY, label::SLICE_MANAGER)],
        )?,
        address_type: "IPv4".into(),
        endpoints: Some(endpoints),
        ports: Some(slice_ports),
    };
    Some(Published { service, slice })
}

/// What of a Service the operator decides, to compare a desired one with
/// one read back (which carries server-set fields).
pub fn service_shape(s: &Service) -> impl PartialEq + std::fmt::Debug {
    let ports: Vec<_> = s
        .spec
        .iter()
        .flat_map(|sp| sp.ports.iter().flatten())
        .map(|p| {
            (
                p.name.clone(),
                p.port,
                p.target_port.clone(),
                p.protocol.clone(),
            )
        })
        .collect();
    (
        shared_meta(&s.metadata),
        s.spec.as_ref().and_then(|sp| sp.type_.clone()),
        s.spec.as_ref().and_then(|sp| sp.selector.clone()),
        ports,
    )
}

/// What of an EndpointSlice the operator decides.
pub fn slice_shape(s: &EndpointSlice) -> impl PartialEq + std::fmt::Debug {
    let endpoints: Vec<_> = s
        .endpoints
        .iter()
        .flatten()
        .map(|e| {
            (
                e.addresses.clone(),
                e.conditions
                    .as_ref()
                    .map(|c| (c.ready, c.serving, c.terminating)),
                e.node_name.clone(),
            )
        })
        .collect();
    let ports: Vec<_> = s
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.clone(), p.port, p.protocol.clone()))
        .collect();
    (
        shared_meta(&s.metadata),
        s.address_type.clone(),
        endpoints,
        ports,
    )
}

/// Labels we set (only ours: others may add theirs) and owners.
fn shared_meta(m: &ObjectMeta) -> (BTreeMap<String, String>, Vec<(String, String)>) {
    let labels = m
        .labels
        .iter()
        .flatten()
        .filter(|(k, _)| [label::CAPSULE, SERVICE_NAME, MANAGED_BY].contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let owners = m
        .owner_references
        .iter()
        .flatten()
        .map(|o| (o.kind.clone(), o.uid.clone()))
        .collect();
    (labels, owners)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use wrenn_crds::capsule::{CapsuleSpec, NetworkSpec, PortPeer, PortSpec};

    fn cap(ports: Vec<PortSpec>) -> Capsule {
        let mut c = Capsule::new(
            "jupyter",
            CapsuleSpec {
                network: Some(NetworkSpec {
                    ports,
                    ..NetworkSpec::default()
                }),
                ..CapsuleSpec::default()
            },
        );
        c.metadata.namespace = Some("team-a".into());
        c.metadata.uid = Some("u-1".into());
        c
    }

    fn port(name: Option<&str>, port: u16, from: &[&str]) -> PortSpec {
        PortSpec {
            name: name.map(str::to_string),
            port,
            from: from
                .iter()
                .map(|c| PortPeer {
                    cidr: Some((*c).to_string()),
                    ..PortPeer::default()
                })
                .collect(),
            ..PortSpec::default()
        }
    }

    fn facts<'a>(cap: &'a Capsule, hp: &'a [(u16, u16)], running: bool) -> PublishFacts<'a> {
        PublishFacts {
            cap,
            node_ip: Some("192.0.2.10"),
            node: Some("n1"),
            running,
            host_ports: hp,
        }
    }

    #[test]
    fn a_port_without_from_publishes_nothing() {
        let c = cap(vec![port(None, 8888, &[])]);
        assert!(build_published(&facts(&c, &[(8888, 29000)], true)).is_none());
    }

    #[test]
    fn service_ports_are_the_declared_ports_and_the_slice_points_at_node_host_ports() {
        let c = cap(vec![
            port(Some("http"), 8888, &["10.244.0.0/16"]),
            port(None, 22, &["10.244.0.0/16"]),
            port(None, 9000, &[]),
        ]);
        let p = build_published(&facts(&c, &[(22, 29001), (8888, 29000)], true)).unwrap();
        let svc_ports: Vec<_> = p
            .service
            .spec
            .as_ref()
            .unwrap()
            .ports
            .iter()
            .flatten()
            .map(|p| (p.name.clone().unwrap(), p.port))
            .collect();
        assert_eq!(
            svc_ports,
            vec![("tcp-22".into(), 22), ("http".into(), 8888)]
        );
        assert!(p.service.spec.as_ref().unwrap().selector.is_none());
        assert_eq!(p.service.metadata.name.as_deref(), Some("jupyter"));
        let owner = &p.service.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("Capsule", "u-1")
        );
        assert_eq!(owner.controller, Some(true));

        let s = &p.slice;
        assert_eq!(s.metadata.name.as_deref(), Some("jupyter-wrenn"));
        assert_eq!(
            s.metadata
                .labels
                .as_ref()
                .unwrap()
                .get(SERVICE_NAME)
                .map(String::as_str),
            Some("jupyter")
        );
        assert_eq!(s.address_type, "IPv4");
        assert_eq!(
            s.endpoints.as_ref().unwrap()[0].addresses,
            vec!["192.0.2.10".to_string()]
        );
        assert_eq!(
            s.endpoints.as_ref().unwrap()[0]
                .conditions
                .as_ref()
                .unwrap()
                .ready,
            Some(true)
        );
        let sp: Vec<_> = s
            .ports
            .iter()
            .flatten()
            .map(|p| (p.name.clone().unwrap(), p.port.unwrap()))
            .collect();
        assert_eq!(sp, vec![("tcp-22".into(), 29001), ("http".into(), 29000)]);
    }

    #[test]
    fn until_the_node_publishes_or_while_not_running_no_endpoint_is_ready() {
        let c = cap(vec![port(None, 80, &["10.0.0.0/8"])]);
        let p = build_published(&facts(&c, &[], true)).unwrap();
        assert!(p.slice.endpoints.as_ref().unwrap().is_empty());
        let p = build_published(&facts(&c, &[(80, 29000)], false)).unwrap();
        assert_eq!(
            p.slice.endpoints.as_ref().unwrap()[0]
                .conditions
                .as_ref()
                .unwrap()
                .ready,
            Some(false)
        );
    }

    #[test]
    fn shapes_ignore_server_set_fields_and_foreign_labels() {
        let c = cap(vec![port(None, 80, &["10.0.0.0/8"])]);
        let p = build_published(&facts(&c, &[(80, 29000)], true)).unwrap();
        let mut read = p.service.clone();
        let spec = read.spec.as_mut().unwrap();
        spec.cluster_ip = Some("10.96.0.12".into());
        spec.session_affinity = Some("None".into());
        read.metadata.resource_version = Some("7".into());
        read.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("team".into(), "a".into());
        assert_eq!(service_shape(&read), service_shape(&p.service));
        let mut moved = p.slice.clone();
        moved.ports.as_mut().unwrap()[0].port = Some(29001);
        assert_ne!(slice_shape(&moved), slice_shape(&p.slice));
    }
}
