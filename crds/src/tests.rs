//! Pure tests of the API types: defaults, serde round trips, generated CRD
//! shape, and that the committed YAML is what the code generates.

use kube::CustomResourceExt;
use serde_json::{Value, json};

use crate::capsule::{Egress, OnExpiry, OperatingMode, Protocol};
use crate::snapshot::DeletionPolicy;
use crate::{Capsule, CapsuleSnapshot, CapsuleTemplate};

fn parse<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).unwrap()
}

fn meta() -> Value {
    json!({"name": "x"})
}

#[test]
fn missing_fields_take_the_documented_defaults() {
    let cap: Capsule = parse(
        json!({"apiVersion": "wrenn.dev/v1alpha1", "kind": "Capsule", "metadata": meta(),
        "spec": {"source": {"templateRef": {"name": "t"}}, "lifecycle": {}, "network": {"ports": [{"port": 80}]}}}),
    );
    assert_eq!(cap.spec.operating_mode, OperatingMode::Running);
    assert_eq!(cap.spec.lifecycle.unwrap().on_expiry, OnExpiry::Delete);
    let net = cap.spec.network.unwrap();
    assert_eq!(net.egress, Egress::Allow);
    assert_eq!(net.ports[0].protocol, Protocol::TCP);
    assert!(
        cap.spec.resources.is_none(),
        "resources default to the template's, not to zero"
    );

    let snap: CapsuleSnapshot = parse(
        json!({"apiVersion": "wrenn.dev/v1alpha1", "kind": "CapsuleSnapshot",
        "metadata": meta(), "spec": {"capsuleName": "c"}}),
    );
    assert!(snap.spec.memory);
    assert_eq!(snap.spec.deletion_policy, DeletionPolicy::Delete);

    let tpl: CapsuleTemplate = parse(
        json!({"apiVersion": "wrenn.dev/v1alpha1", "kind": "CapsuleTemplate",
        "metadata": meta(), "spec": {"source": {"image": {"reference": "debian:12"}}}}),
    );
    assert_eq!(tpl.spec.defaults.vcpus, 1);
    assert_eq!(tpl.spec.defaults.memory.0, "512Mi");
    assert_eq!(tpl.spec.defaults.disk.0, "2Gi");
}

#[test]
fn schema_defaults_match_serde_defaults() {
    // The API server defaults from the schema, our code from serde; they must agree.
    let crd = serde_json::to_value(Capsule::crd()).unwrap();
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    assert_eq!(spec["operatingMode"]["default"], "Running");
    assert_eq!(
        spec["lifecycle"]["properties"]["onExpiry"]["default"],
        "Delete"
    );
    let tpl = serde_json::to_value(CapsuleTemplate::crd()).unwrap();
    let defaults = &tpl["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["defaults"];
    assert_eq!(
        defaults["default"],
        json!({"vcpus": 1, "memory": "512Mi", "disk": "2Gi"})
    );
    let snap = serde_json::to_value(CapsuleSnapshot::crd()).unwrap();
    let sspec = &snap["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    assert_eq!(sspec["memory"]["default"], true);
    assert_eq!(sspec["deletionPolicy"]["default"], "Delete");
}

/// This crate's directory in the clone under test (one target directory
/// serves several clones; the compiled-in path can be another clone's).
fn crate_dir() -> std::path::PathBuf {
    wrenn_testkit::workspace_root().join("crds")
}

/// Every example parses into the typed API and serialises back to the same
/// document, so examples and types cannot drift apart.
#[test]
fn examples_round_trip_through_the_types() {
    let dir = crate_dir().join("../examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let doc: Value = serde_saphyr::from_str(&text).unwrap();
        let back = match doc["kind"].as_str().unwrap() {
            "Capsule" => {
                serde_json::to_value(serde_json::from_value::<Capsule>(doc.clone()).unwrap())
            }
            "CapsuleSnapshot" => serde_json::to_value(
                serde_json::from_value::<CapsuleSnapshot>(doc.clone()).unwrap(),
            ),
            "CapsuleTemplate" => serde_json::to_value(
                serde_json::from_value::<CapsuleTemplate>(doc.clone()).unwrap(),
            ),
            other => panic!("{}: unknown kind {other}", path.display()),
        }
        .unwrap();
        assert_eq!(strip_defaults(back), doc, "{}", path.display());
        seen += 1;
    }
    assert!(seen >= 3);
}

/// Serialisation writes defaulted enum fields the example may leave out;
/// the examples spell out everything except these.
fn strip_defaults(mut v: Value) -> Value {
    if let Some(spec) = v.get_mut("spec").and_then(Value::as_object_mut) {
        if spec.get("operatingMode") == Some(&json!("Running")) {
            spec.remove("operatingMode");
        }
        if spec.get("defaults") == Some(&json!({"vcpus": 1, "memory": "512Mi", "disk": "2Gi"})) {
            spec.remove("defaults");
        }
        if let Some(ports) = spec
            .get_mut("network")
            .and_then(|n| n.get_mut("ports"))
            .and_then(Value::as_array_mut)
        {
            for p in ports {
                if let Some(p) = p.as_object_mut()
                    && p.get("protocol") == Some(&json!("TCP"))
                {
                    p.remove("protocol");
                }
            }
        }
    }
    v.as_object_mut().map(|o| o.remove("status"));
    v
}

#[test]
fn crds_carry_names_categories_status_and_columns() {
    for (short, crd, columns) in [
        (
            "cap",
            Capsule::crd(),
            vec!["Phase", "Node", "IP", "VCPUs", "Memory", "Age"],
        ),
        (
            "csnap",
            CapsuleSnapshot::crd(),
            vec!["Capsule", "Phase", "Ready", "Node", "Size", "Age"],
        ),
        (
            "ctpl",
            CapsuleTemplate::crd(),
            vec!["Phase", "VCPUs", "Memory", "Disk", "Age"],
        ),
    ] {
        assert_eq!(crd.spec.names.short_names, Some(vec![short.to_string()]));
        assert_eq!(crd.spec.names.categories, Some(vec!["wrenn".to_string()]));
        assert_eq!(crd.spec.scope, "Namespaced");
        let v = &crd.spec.versions[0];
        assert!(
            v.subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "{short} has a status subresource"
        );
        let names: Vec<_> = v
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(names, columns);
    }
}

#[test]
fn committed_yaml_is_what_the_code_generates() {
    let dir = crate_dir();
    for (name, crd) in crate::crds() {
        let committed = std::fs::read_to_string(dir.join(name)).unwrap();
        assert!(
            committed == crate::to_yaml(&crd).unwrap(),
            "crds/{name} is stale: run `cargo run -p wrenn-crds --bin crdgen`"
        );
        assert!(
            !committed.contains("format: uint"),
            "{name} carries formats the API server warns about"
        );
    }
}

#[test]
fn capsule_status_round_trips_with_conditions() {
    let status = json!({"observedGeneration": 3, "phase": "Paused", "nodeName": "n1", "ip": "10.0.0.2",
        "startedAt": "2026-11-28T10:00:00Z", "vmm": {"name": "qemu", "version": "8.2", "note": "TCG: slow"},
        "usage": {"cpu": "250m", "memory": "300Mi", "disk": "1Gi", "sampledAt": "2026-11-28T10:00:30Z"},
        "conditions": [{"type": "Paused", "status": "True", "reason": "PausedByUser", "message": "",
                        "lastTransitionTime": "2026-11-28T10:00:00Z", "observedGeneration": 3}]});
    let typed: crate::CapsuleStatus = parse(status.clone());
    assert_eq!(serde_json::to_value(&typed).unwrap(), status);
}
