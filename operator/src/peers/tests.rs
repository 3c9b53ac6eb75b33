#![allow(clippy::unwrap_used)]

use serde_json::json;

use super::*;

fn pod(ns: &str, name: &str, labels: serde_json::Value, ip: Option<&str>) -> Arc<Pod> {
    let mut p = json!({
        "metadata": { "namespace": ns, "name": name, "labels": labels },
        "spec": { "containers": [] },
        "status": { "phase": "Running" },
    });
    if let Some(ip) = ip {
        p["status"]["podIP"] = json!(ip);
        p["status"]["podIPs"] = json!([{ "ip": ip }, { "ip": "fd00::1" }]);
    }
    Arc::new(serde_json::from_value(p).unwrap())
}

fn namespace(name: &str, labels: serde_json::Value) -> Arc<Namespace> {
    Arc::new(
        serde_json::from_value(json!({ "metadata": { "name": name, "labels": labels } })).unwrap(),
    )
}

fn peer(v: serde_json::Value) -> PortPeer {
    serde_json::from_value(v).unwrap()
}

fn world() -> (Vec<Arc<Pod>>, Vec<Arc<Namespace>>) {
    let mut host = (*pod("team", "host", json!({ "app": "web" }), Some("192.0.2.9"))).clone();
    host.spec.as_mut().unwrap().host_network = Some(true);
    let mut done = (*pod("team", "done", json!({ "app": "web" }), Some("10.0.0.9"))).clone();
    done.status.as_mut().unwrap().phase = Some("Succeeded".into());
    let pods = vec![
        pod("team", "web-1", json!({ "app": "web" }), Some("10.0.0.2")),
        pod("team", "web-2", json!({ "app": "web" }), Some("10.0.0.1")),
        pod("team", "db", json!({ "app": "db" }), Some("10.0.0.3")),
        pod("team", "pending", json!({ "app": "web" }), None),
        pod("other", "web", json!({ "app": "web" }), Some("10.0.1.1")),
        pod(
            "ops",
            "prom",
            json!({ "app": "prometheus" }),
            Some("10.0.2.1"),
        ),
        Arc::new(host),
        Arc::new(done),
    ];
    let namespaces = vec![
        namespace("team", json!({})),
        namespace("other", json!({})),
        namespace("ops", json!({ "purpose": "monitoring" })),
    ];
    (pods, namespaces)
}

fn resolved(from: &[PortPeer]) -> Vec<String> {
    let (pods, namespaces) = world();
    resolve(
        "team",
        from,
        Cluster {
            pods: &pods,
            namespaces: &namespaces,
        },
    )
}

#[test]
fn a_pod_selector_chooses_running_pods_of_the_capsules_namespace() {
    assert_eq!(
        resolved(&[peer(
            json!({ "podSelector": { "matchLabels": { "app": "web" } } })
        )]),
        // Sorted; no pod without an address, host-network or finished;
        // nothing from another namespace; IPv6 left out.
        vec!["10.0.0.1/32", "10.0.0.2/32"]
    );
}

#[test]
fn a_namespace_selector_alone_chooses_every_pod_there() {
    assert_eq!(
        resolved(&[peer(
            json!({ "namespaceSelector": { "matchLabels": { "purpose": "monitoring" } } })
        )]),
        vec!["10.0.2.1/32"]
    );
    // Both: the chosen Pods in the chosen namespaces; `{}` is every namespace.
    assert_eq!(
        resolved(&[peer(json!({
            "namespaceSelector": {},
            "podSelector": { "matchExpressions": [{ "key": "app", "operator": "In", "values": ["web"] }] },
        }))]),
        vec!["10.0.0.1/32", "10.0.0.2/32", "10.0.1.1/32"]
    );
}

#[test]
fn cidrs_stay_as_written_and_come_first() {
    assert_eq!(
        resolved(&[
            peer(json!({ "podSelector": { "matchLabels": { "app": "db" } } })),
            peer(json!({ "cidr": "192.0.2.0/24" })),
            peer(json!({ "cidr": "192.0.2.0/24" })),
        ]),
        vec!["192.0.2.0/24", "10.0.0.3/32"]
    );
}

#[test]
fn a_selector_that_does_not_parse_chooses_nothing() {
    assert!(
        resolved(&[peer(json!({ "podSelector": { "matchExpressions": [
            { "key": "app", "operator": "Resembles", "values": ["web"] }
        ] } }))])
        .is_empty()
    );
}

#[test]
fn past_the_nodes_limit_the_lowest_addresses_are_kept() {
    let pods: Vec<Arc<Pod>> = (0..MAX_SOURCES + 5)
        .map(|i| {
            let ip = Ipv4Addr::from(0x0a00_0000_u32 + i as u32).to_string();
            pod("team", &format!("p{i}"), json!({ "app": "web" }), Some(&ip))
        })
        .collect();
    let namespaces = vec![namespace("team", json!({}))];
    let out = resolve(
        "team",
        &[
            peer(json!({ "cidr": "192.0.2.0/24" })),
            peer(json!({ "podSelector": {} })),
        ],
        Cluster {
            pods: &pods,
            namespaces: &namespaces,
        },
    );
    assert_eq!(out.len(), MAX_SOURCES);
    assert_eq!(out[0], "192.0.2.0/24");
    assert_eq!(out[1], "10.0.0.0/32");
}

#[test]
fn which_pod_changes_can_matter() {
    let by_pods = [peer(json!({ "podSelector": {} }))];
    let by_ns = [peer(json!({ "namespaceSelector": {} }))];
    let by_cidr = [peer(json!({ "cidr": "10.0.0.0/8" }))];
    assert!(may_choose("team", &by_pods, "team"));
    assert!(!may_choose("team", &by_pods, "other"));
    assert!(may_choose("team", &by_ns, "other"));
    assert!(!may_choose("team", &by_cidr, "team"));
    assert!(selects_pods(&by_ns) && !selects_pods(&by_cidr));
}
