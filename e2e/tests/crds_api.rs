//! Tier 2: the CRDs, their CEL rules and the admission policy, enforced by a
//! real kube-apiserver (built from Go modules by e2e/scripts).
//!
//! Why this file is long: the table of invalid objects the API server must
//! refuse, with eight tests over it.

mod common;

use std::time::{Duration, Instant};

use common::{Env, api, create, create_in, object, setup};
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::{Value, json};

fn template_ref(name: &str) -> Value {
    json!({ "templateRef": { "name": name } })
}

fn capsule(extra: Value) -> Value {
    let mut spec = json!({ "source": template_ref("base") });
    if let (Value::Object(s), Value::Object(e)) = (&mut spec, extra) {
        s.extend(e);
    }
    spec
}

/// (case, kind, spec, part of the API server's message)
fn invalid_cases() -> Vec<(&'static str, &'static str, Value, &'static str)> {
    let long_name_marker = "capsule names are at most 63 characters";
    vec![
        (
            "capsule without source",
            "Capsule",
            json!({}),
            "spec.source: Required value",
        ),
        (
            "empty source",
            "Capsule",
            json!({"source": {}}),
            "source needs exactly one of templateRef or snapshotRef",
        ),
        (
            "two sources",
            "Capsule",
            json!({"source": {"templateRef": {"name": "a"}, "snapshotRef": {"name": "b"}}}),
            "source needs exactly one of templateRef or snapshotRef",
        ),
        (
            "zero vcpus",
            "Capsule",
            capsule(json!({"resources": {"vcpus": 0}})),
            "should be greater than or equal to 1",
        ),
        (
            "65 vcpus",
            "Capsule",
            capsule(json!({"resources": {"vcpus": 65}})),
            "should be less than or equal to 64",
        ),
        (
            "64Mi memory",
            "Capsule",
            capsule(json!({"resources": {"memory": "64Mi"}})),
            "memory must be at least 128Mi",
        ),
        (
            "memory not a quantity",
            "Capsule",
            capsule(json!({"resources": {"memory": "lots"}})),
            "memory must be a quantity such as 512Mi or 4Gi",
        ),
        (
            "memory as a bare integer",
            "Capsule",
            capsule(json!({"resources": {"memory": 1073741824}})),
            "must be of type string",
        ),
        (
            "1Mi disk",
            "Capsule",
            capsule(json!({"resources": {"disk": "1Mi"}})),
            "disk must be at least 128Mi",
        ),
        (
            "unknown operating mode",
            "Capsule",
            capsule(json!({"operatingMode": "Stopped"})),
            "Unsupported value: \"Stopped\"",
        ),
        (
            "unknown onExpiry",
            "Capsule",
            capsule(json!({"lifecycle": {"onExpiry": "Archive"}})),
            "Unsupported value: \"Archive\"",
        ),
        (
            "prose duration",
            "Capsule",
            capsule(json!({"lifecycle": {"shutdownAfter": "2 hours"}})),
            "shutdownAfter must be a duration such as 90s, 30m or 1h30m",
        ),
        (
            "negative duration",
            "Capsule",
            capsule(json!({"lifecycle": {"shutdownAfter": "-5m"}})),
            "shutdownAfter must be a duration such as 90s, 30m or 1h30m",
        ),
        (
            "zero idle timeout",
            "Capsule",
            capsule(json!({"lifecycle": {"idleTimeout": "0s"}})),
            "idleTimeout must be at least 1s",
        ),
        (
            "template name with a path",
            "Capsule",
            json!({"source": {"templateRef": {"name": "../../etc"}}}),
            "templateRef.name must be a Kubernetes object name",
        ),
        (
            "snapshot name with a slash",
            "Capsule",
            json!({"source": {"snapshotRef": {"name": "a/b"}}}),
            "snapshotRef.name must be a Kubernetes object name",
        ),
        (
            "empty template name",
            "Capsule",
            json!({"source": {"templateRef": {"name": ""}}}),
            "templateRef.name must be a Kubernetes object name",
        ),
        (
            "env name starting with a digit",
            "Capsule",
            capsule(json!({"env": [{"name": "1BAD", "value": "x"}]})),
            "env names are letters, digits and '_'",
        ),
        (
            "duplicate env names",
            "Capsule",
            capsule(json!({"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]})),
            "Duplicate value",
        ),
        (
            "malformed CIDR",
            "Capsule",
            capsule(json!({"network": {"egress": "Deny", "allowCidrs": ["10.0.0.300/8"]}})),
            "allowCidrs entries must be CIDRs",
        ),
        (
            "IPv6 CIDR",
            "Capsule",
            capsule(json!({"network": {"egress": "Deny", "allowCidrs": ["2001:db8::/32"]}})),
            "capsules have no IPv6, so IPv6 CIDRs are refused",
        ),
        (
            "CIDR with host bits",
            "Capsule",
            capsule(json!({"network": {"egress": "Deny", "allowCidrs": ["10.1.2.3/16"]}})),
            "allowCidrs entries must have no host bits set",
        ),
        (
            "allow list inside a range every node blocks",
            "Capsule",
            capsule(
                json!({"network": {"egress": "Deny", "allowCidrs": ["203.0.113.0/24", "10.20.0.0/16"]}}),
            ),
            "allowCidrs entries inside 10.0.0.0/8",
        ),
        (
            "allow list naming cloud metadata",
            "Capsule",
            capsule(json!({"network": {"egress": "Deny", "allowCidrs": ["169.254.169.254/32"]}})),
            "are never reachable from a capsule",
        ),
        (
            "allow list with egress Allow",
            "Capsule",
            capsule(json!({"network": {"egress": "Allow", "allowCidrs": ["10.0.0.0/8"]}})),
            "network.allowCidrs applies only with network.egress: Deny",
        ),
        (
            "allowHosts with egress Allow",
            "Capsule",
            capsule(json!({"network": {"egress": "Allow", "allowHosts": ["pypi.org"]}})),
            "network.allowHosts applies only with network.egress: Deny",
        ),
        (
            "allowHosts with DNS closed",
            "Capsule",
            capsule(
                json!({"network": {"egress": "Deny", "allowHosts": ["pypi.org"], "dns": {"blockUnderDeny": true}}}),
            ),
            "network.allowHosts needs name resolution",
        ),
        (
            "allowHosts wildcard in the middle",
            "Capsule",
            capsule(json!({"network": {"egress": "Deny", "allowHosts": ["a.*.example.org"]}})),
            "allowHosts",
        ),
        (
            "IPv6 nameserver",
            "Capsule",
            capsule(json!({"network": {"dns": {"nameservers": ["2001:db8::53"]}}})),
            "dns.nameservers entries must be IPv4 addresses",
        ),
        (
            "nameserver in a blocked range",
            "Capsule",
            capsule(json!({"network": {"dns": {"nameservers": ["10.96.0.10"]}}})),
            "dns.nameservers entries may not lie in a network every node blocks",
        ),
        (
            "too many nameservers",
            "Capsule",
            capsule(
                json!({"network": {"dns": {"nameservers": ["1.1.1.1", "1.0.0.1", "8.8.8.8", "8.8.4.4"]}}}),
            ),
            "nameservers",
        ),
        (
            "resolver option with a newline",
            "Capsule",
            capsule(json!({"network": {"dns": {"options": ["ndots:2\nnameserver 6.6.6.6"]}}})),
            "options",
        ),
        (
            "unknown egress",
            "Capsule",
            capsule(json!({"network": {"egress": "Block"}})),
            "Unsupported value: \"Block\"",
        ),
        (
            "from on a UDP port",
            "Capsule",
            capsule(
                json!({"network": {"ports": [{"port": 53, "protocol": "UDP", "from": [{"cidr": "10.244.0.0/16"}]}]}}),
            ),
            "only TCP ports are supported",
        ),
        (
            "a UDP port",
            "Capsule",
            capsule(json!({"network": {"ports": [{"port": 53, "protocol": "UDP"}]}})),
            "only TCP ports are supported",
        ),
        (
            "IPv6 source in from",
            "Capsule",
            capsule(json!({"network": {"ports": [{"port": 80, "from": [{"cidr": "fd00::/8"}]}]}})),
            "from entries must be IPv4 CIDRs",
        ),
        (
            "source with host bits in from",
            "Capsule",
            capsule(
                json!({"network": {"ports": [{"port": 80, "from": [{"cidr": "10.244.1.2/16"}]}]}}),
            ),
            "from entries must have no host bits set",
        ),
        (
            "port name with capitals",
            "Capsule",
            capsule(json!({"network": {"ports": [{"port": 80, "name": "Web"}]}})),
            "a port name is lowercase letters, digits and single '-' inside",
        ),
        (
            "port name of digits only",
            "Capsule",
            capsule(json!({"network": {"ports": [{"port": 80, "name": "8080"}]}})),
            "a port name is lowercase letters, digits and single '-' inside",
        ),
        (
            "port name with a double hyphen",
            "Capsule",
            capsule(json!({"network": {"ports": [{"port": 80, "name": "a--b"}]}})),
            "a port name is lowercase letters, digits and single '-' inside",
        ),
        (
            "port name tcp-N for another port",
            "Capsule",
            capsule(
                json!({"network": {"ports": [{"port": 81, "name": "tcp-80"}, {"port": 80, "from": [{"cidr": "10.244.0.0/16"}]}]}}),
            ),
            "a port name tcp-N is the name an unnamed published port N gets",
        ),
        (
            "a from entry with a cidr and a selector",
            "Capsule",
            capsule(
                json!({"network": {"ports": [{"port": 80, "from": [{"cidr": "10.0.0.0/8", "podSelector": {}}]}]}}),
            ),
            "a from entry is either a cidr or a podSelector and/or namespaceSelector",
        ),
        (
            "an empty from entry",
            "Capsule",
            capsule(json!({"network": {"ports": [{"port": 80, "from": [{}]}]}})),
            "a from entry is either a cidr or a podSelector and/or namespaceSelector",
        ),
        (
            "two ports with one name",
            "Capsule",
            capsule(
                json!({"network": {"ports": [{"port": 80, "name": "web"}, {"port": 81, "name": "web"}]}}),
            ),
            "port names must be unique",
        ),
        (
            "port 0",
            "Capsule",
            capsule(json!({"network": {"ports": [{"port": 0}]}})),
            "should be greater than or equal to 1",
        ),
        (
            "port 70000",
            "Capsule",
            capsule(json!({"network": {"ports": [{"port": 70000}]}})),
            "should be less than or equal to 65535",
        ),
        (
            "unknown protocol",
            "Capsule",
            capsule(json!({"network": {"ports": [{"port": 80, "protocol": "SCTP"}]}})),
            "Unsupported value: \"SCTP\"",
        ),
        (
            "64-character capsule name",
            "Capsule",
            capsule(json!({})),
            long_name_marker,
        ),
        (
            "snapshot without capsule",
            "CapsuleSnapshot",
            json!({}),
            "spec.capsuleName: Required value",
        ),
        (
            "snapshot of an unsafe name",
            "CapsuleSnapshot",
            json!({"capsuleName": "My_Capsule"}),
            "capsuleName must be a Kubernetes object name",
        ),
        (
            "unknown deletion policy",
            "CapsuleSnapshot",
            json!({"capsuleName": "a", "deletionPolicy": "Keep"}),
            "Unsupported value: \"Keep\"",
        ),
        (
            "template without source",
            "CapsuleTemplate",
            json!({"source": {}}),
            "source needs exactly one of image, rootfs or snapshotRef",
        ),
        (
            "template with two sources",
            "CapsuleTemplate",
            json!({"source": {"image": {"reference": "debian:12"}, "rootfs": {"path": "d.ext4"}}}),
            "source needs exactly one of image, rootfs or snapshotRef",
        ),
        (
            "image reference with spaces",
            "CapsuleTemplate",
            json!({"source": {"image": {"reference": "Not A Ref"}}}),
            "image.reference must be an OCI reference",
        ),
        (
            "rootfs with url and path",
            "CapsuleTemplate",
            json!({"source": {"rootfs": {"url": "https://example.com/d.ext4", "path": "d.ext4"}}}),
            "rootfs needs exactly one of url or path",
        ),
        (
            "rootfs over ftp",
            "CapsuleTemplate",
            json!({"source": {"rootfs": {"url": "ftp://example.com/d.ext4"}}}),
            "rootfs.url must be an http or https URL",
        ),
        // Issue 11: node files are names inside the node admin's image
        // directories, never node paths; the kernel command line is
        // allow-listed. Refused by the schema, whatever the namespace.
        (
            "rootfs as a block device path",
            "CapsuleTemplate",
            json!({"source": {"rootfs": {"path": "/dev/vda"}}}),
            "rootfs.path must be a name relative to a node image directory",
        ),
        (
            "rootfs path escaping with ..",
            "CapsuleTemplate",
            json!({"source": {"rootfs": {"path": "../capsules/victim/disk.img"}}}),
            "rootfs.path must be a name relative to a node image directory",
        ),
        (
            "rootfs hidden behind a dot segment",
            "CapsuleTemplate",
            json!({"source": {"rootfs": {"path": "images/./d.ext4"}}}),
            "rootfs.path must be a name relative to a node image directory",
        ),
        (
            "kernel by node path",
            "CapsuleTemplate",
            json!({"source": {"image": {"reference": "debian:12"}}, "kernel": {"path": "/boot/vmlinuz"}}),
            "kernel.path must be a name relative to a node image directory",
        ),
        (
            "kernel path escaping with ..",
            "CapsuleTemplate",
            json!({"source": {"image": {"reference": "debian:12"}}, "kernel": {"path": "kernels/../../vmlinux"}}),
            "kernel.path must be a name relative to a node image directory",
        ),
        (
            "kernel cmdline rdinit",
            "CapsuleTemplate",
            json!({"source": {"image": {"reference": "debian:12"}}, "kernel": {"path": "vmlinux", "cmdline": "quiet rdinit=/bin/sh"}}),
            "kernel.cmdline may only hold quiet, debug, loglevel=N, panic=N and console=ttyS0-3|hvc0-7[,baud], separated by spaces: init=, rdinit=",
        ),
        (
            "kernel cmdline init and root",
            "CapsuleTemplate",
            json!({"source": {"image": {"reference": "debian:12"}}, "kernel": {"path": "vmlinux", "cmdline": "init=/x root=/dev/vdb loglevel=3"}}),
            "kernel.cmdline may only hold",
        ),
        (
            "kernel cmdline init arguments",
            "CapsuleTemplate",
            json!({"source": {"image": {"reference": "debian:12"}}, "kernel": {"path": "vmlinux", "cmdline": "quiet -- x"}}),
            "kernel.cmdline may only hold",
        ),
        (
            "kernel cmdline tab-joined init",
            "CapsuleTemplate",
            json!({"source": {"image": {"reference": "debian:12"}}, "kernel": {"path": "vmlinux", "cmdline": "quiet\tinit=/bin/sh"}}),
            "kernel.cmdline may only hold",
        ),
        (
            "oci layout by node path",
            "CapsuleTemplate",
            json!({"source": {"image": {"reference": "oci:/var/lib/wrenn"}}}),
            "image.reference must be an OCI reference",
        ),
        (
            "docker archive escaping with ..",
            "CapsuleTemplate",
            json!({"source": {"image": {"reference": "docker-archive:../../etc/shadow"}}}),
            "image.reference must be an OCI reference",
        ),
        (
            "pull secret on a node image",
            "CapsuleTemplate",
            json!({"source": {"image": {"reference": "oci:base", "pullSecret": "regcred"}}}),
            "image.pullSecret applies to registry images only",
        ),
        (
            "pull secret that is no Secret name",
            "CapsuleTemplate",
            json!({"source": {"image": {"reference": "debian:12", "pullSecret": "Reg_Cred"}}}),
            "image.pullSecret must be a Secret name",
        ),
        (
            "template with 100 vcpus",
            "CapsuleTemplate",
            json!({"source": {"image": {"reference": "debian:12"}}, "defaults": {"vcpus": 100}}),
            "should be less than or equal to 64",
        ),
        (
            "template memory too small",
            "CapsuleTemplate",
            json!({"source": {"image": {"reference": "debian:12"}}, "defaults": {"memory": "100Mi"}}),
            "memory must be at least 128Mi",
        ),
        (
            "readiness with exec and port",
            "CapsuleTemplate",
            json!({"source": {"image": {"reference": "debian:12"}}, "warm": {"startCommand": ["app"], "readiness": {"exec": ["true"], "tcpPort": 80}}}),
            "readiness needs exactly one of exec or tcpPort",
        ),
        (
            "warm without command",
            "CapsuleTemplate",
            json!({"source": {"image": {"reference": "debian:12"}}, "warm": {"startCommand": [], "readiness": {"tcpPort": 80}}}),
            "should have at least 1 items",
        ),
        (
            "readiness timeout in prose",
            "CapsuleTemplate",
            json!({"source": {"image": {"reference": "debian:12"}}, "warm": {"startCommand": ["app"], "readiness": {"tcpPort": 80, "timeout": "soon"}}}),
            "readiness.timeout must be a duration",
        ),
    ]
}

#[tokio::test]
async fn invalid_manifests_are_refused_with_a_clear_message() {
    let Some(env) = setup("invalid_manifests_are_refused_with_a_clear_message").await else {
        return;
    };
    let cases = invalid_cases();
    assert!(cases.len() >= 25);
    let mut failures = Vec::new();
    for (i, (what, kind, spec, expected)) in cases.into_iter().enumerate() {
        let name = if what == "64-character capsule name" {
            "c".repeat(64)
        } else {
            format!("bad-{i}")
        };
        match create(&env, kind, &name, spec).await {
            Ok(_) => failures.push(format!("{what}: accepted")),
            Err(msg) if msg.contains(expected) => {}
            Err(msg) => failures.push(format!("{what}: message {msg:?} lacks {expected:?}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    drop(env.case);
}

#[tokio::test]
async fn every_example_is_accepted() {
    let Some(env) = setup("every_example_is_accepted").await else {
        return;
    };
    let dir = wrenn_e2e::workspace_root().join("examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 3,
        "examples/ holds at least one file per kind"
    );
    let mut kinds = std::collections::BTreeSet::new();
    // The warm example boots a disk from the nodes' image directories,
    // which only a namespace a cluster admin labelled may name.
    let ns = wrenn_e2e::node_images_namespace(&env.client, "examples")
        .await
        .unwrap();
    for file in &files {
        let out = env
            .cp
            .kubectl_ok(&["apply", "--server-side", "-n", &ns, "-f"], Some(file))
            .unwrap_or_else(|e| panic!("{} refused: {e:#}", file.display()));
        assert!(out.contains("serverside-applied"), "{out}");
        let text = std::fs::read_to_string(file).unwrap();
        if let Some(kind) = text.lines().find_map(|l| l.strip_prefix("kind: ")) {
            kinds.insert(kind.trim().to_string());
        }
    }
    assert_eq!(
        kinds.into_iter().collect::<Vec<_>>(),
        ["Capsule", "CapsuleSnapshot", "CapsuleTemplate"]
    );
    drop(env.case);
}

/// up.sh's check of `examples/` (`e2e/scripts/check-examples.sh`) passes
/// on a fresh cluster and again on one it already ran against: the warm
/// example names a node file, which the default namespace may not.
#[tokio::test]
async fn up_sh_checks_every_example_and_can_run_again() {
    let Some(env) = setup("up_sh_checks_every_example_and_can_run_again").await else {
        return;
    };
    let script = wrenn_e2e::workspace_root().join("e2e/scripts/check-examples.sh");
    for run in ["first", "second"] {
        let out = tokio::process::Command::new("bash")
            .arg(&script)
            .arg(&env.cp.kubectl)
            .arg(&env.cp.kubeconfig)
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{run} run: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("examples/ accepted"),
            "{out:?}"
        );
    }
    // The same files in the default namespace: the warm example is refused
    // there, which is why the check needs its own namespace.
    let out = env
        .cp
        .kubectl(
            &[
                "apply",
                "--server-side",
                "--dry-run=server",
                "-n",
                "default",
                "-f",
            ],
            Some(&wrenn_e2e::workspace_root().join("examples/02-template-warm.yaml")),
        )
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("wrenn.dev/node-images=allowed"),
        "{out:?}"
    );
    drop(env.case);
}

#[tokio::test]
async fn the_api_server_applies_defaults() {
    let Some(env) = setup("the_api_server_applies_defaults").await else {
        return;
    };
    let cap = create(
        &env,
        "Capsule",
        "minimal",
        capsule(
            json!({"lifecycle": {"idleTimeout": "10m"}, "network": {"ports": [
                {"port": 22},
                // Service port names a user may pick, tcp-N on its own port N
                // included.
                {"port": 80, "name": "tcp-80"},
                {"port": 8080, "name": "web-ui2"},
                {"port": 8081, "name": "x"},
                // Sources by CIDR, by Pod labels, by namespace labels, both.
                {"port": 9000, "from": [
                    {"cidr": "10.244.0.0/16"},
                    {"podSelector": {"matchLabels": {"app": "web"}}},
                    {"namespaceSelector": {"matchExpressions": [
                        {"key": "team", "operator": "In", "values": ["a"]}]}},
                    {"namespaceSelector": {}, "podSelector": {}},
                ]},
            ]}}),
        ),
    )
    .await
    .unwrap();
    let spec = &cap.data["spec"];
    assert_eq!(spec["operatingMode"], "Running");
    assert_eq!(spec["lifecycle"]["onExpiry"], "Delete");
    assert_eq!(spec["network"]["egress"], "Allow");
    assert_eq!(spec["network"]["ports"][0]["protocol"], "TCP");
    // Typed view of what the server stored.
    let typed: wrenn_crds::Capsule =
        serde_json::from_value(serde_json::to_value(&cap).unwrap()).unwrap();
    assert_eq!(
        typed.spec.operating_mode,
        wrenn_crds::capsule::OperatingMode::Running
    );

    let snap = create(
        &env,
        "CapsuleSnapshot",
        "snap",
        json!({"capsuleName": "minimal"}),
    )
    .await
    .unwrap();
    assert_eq!(snap.data["spec"]["memory"], true);
    assert_eq!(snap.data["spec"]["deletionPolicy"], "Delete");

    let tpl = create(
        &env,
        "CapsuleTemplate",
        "tpl",
        json!({"source": {"image": {"reference": "debian:12"}}}),
    )
    .await
    .unwrap();
    assert_eq!(
        tpl.data["spec"]["defaults"],
        json!({"vcpus": 1, "memory": "512Mi", "disk": "2Gi"})
    );
    drop(env.case);
}

/// The chart's mutating policy saves the operator a write per start: a
/// Capsule comes out of admission with the operator's finalizer, once,
/// beside any the user set; a template does not (its operator adds it).
#[tokio::test]
async fn capsules_are_created_with_the_operator_finalizer() {
    let Some(env) = setup("capsules_are_created_with_the_operator_finalizer").await else {
        return;
    };
    let ours = wrenn_crds::names::FINALIZER;
    let finalizers =
        |o: &kube::api::DynamicObject| o.metadata.finalizers.clone().unwrap_or_default();
    let plain = create(&env, "Capsule", "plain", capsule(json!({})))
        .await
        .unwrap();
    assert_eq!(finalizers(&plain), [ours]);
    for (name, given, expected) in [
        (
            "theirs",
            vec!["example.com/keep"],
            vec!["example.com/keep", ours],
        ),
        ("named", vec![ours], vec![ours]),
    ] {
        let mut body = object("Capsule", name, capsule(json!({})));
        body.metadata.finalizers = Some(given.iter().map(|f| f.to_string()).collect());
        let created = api(&env, "Capsule")
            .create(&PostParams::default(), &body)
            .await
            .unwrap();
        assert_eq!(finalizers(&created), expected, "{name}");
        // No operator runs here: let the namespace go.
        api(&env, "Capsule")
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"finalizers": null}})),
            )
            .await
            .unwrap();
    }
    let tpl = create(
        &env,
        "CapsuleTemplate",
        "tpl",
        json!({"source": {"image": {"reference": "debian:12"}}}),
    )
    .await
    .unwrap();
    assert!(finalizers(&tpl).is_empty(), "{:?}", finalizers(&tpl));
    drop(env.case);
}

async fn update(env: &Env, kind: &str, name: &str, spec_patch: Value) -> Result<(), String> {
    api(env, kind)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": spec_patch })),
        )
        .await
        .map(|_| ())
        .map_err(|e| match e {
            kube::Error::Api(resp) => resp.message,
            other => format!("not an API refusal: {other}"),
        })
}

fn assert_refused(result: Result<(), String>, expected: &str, what: &str) {
    match result {
        Ok(()) => panic!("{what}: update accepted"),
        Err(msg) => assert!(msg.contains(expected), "{what}: {msg:?} lacks {expected:?}"),
    }
}

#[tokio::test]
async fn immutable_fields_cannot_change() {
    let Some(env) = setup("immutable_fields_cannot_change").await else {
        return;
    };
    create(
        &env,
        "Capsule",
        "sized",
        capsule(json!({"resources": {"disk": "10Gi", "memory": "1Gi"}})),
    )
    .await
    .unwrap();
    create(&env, "Capsule", "unsized", capsule(json!({})))
        .await
        .unwrap();
    assert_refused(
        update(
            &env,
            "Capsule",
            "sized",
            json!({"source": {"templateRef": {"name": "other"}}}),
        )
        .await,
        "source is immutable",
        "capsule source",
    );
    assert_refused(
        update(
            &env,
            "Capsule",
            "sized",
            json!({"resources": {"disk": "20Gi"}}),
        )
        .await,
        "resources.disk is immutable",
        "growing disk",
    );
    assert_refused(
        update(
            &env,
            "Capsule",
            "sized",
            json!({"resources": {"disk": null}}),
        )
        .await,
        "resources.disk is immutable",
        "removing disk",
    );
    assert_refused(
        update(
            &env,
            "Capsule",
            "unsized",
            json!({"resources": {"disk": "20Gi"}}),
        )
        .await,
        "resources.disk is immutable",
        "adding disk",
    );
    // What may change does change.
    update(
        &env,
        "Capsule",
        "sized",
        json!({"operatingMode": "Suspended", "resources": {"memory": "2Gi"}}),
    )
    .await
    .expect("operatingMode and memory are mutable");

    create(
        &env,
        "CapsuleSnapshot",
        "snap",
        json!({"capsuleName": "sized"}),
    )
    .await
    .unwrap();
    assert_refused(
        update(
            &env,
            "CapsuleSnapshot",
            "snap",
            json!({"capsuleName": "unsized"}),
        )
        .await,
        "capsuleName is immutable",
        "snapshot capsuleName",
    );
    assert_refused(
        update(&env, "CapsuleSnapshot", "snap", json!({"memory": false})).await,
        "memory is immutable",
        "snapshot memory",
    );
    update(
        &env,
        "CapsuleSnapshot",
        "snap",
        json!({"deletionPolicy": "Retain"}),
    )
    .await
    .expect("deletionPolicy is mutable");

    create(
        &env,
        "CapsuleTemplate",
        "tpl",
        json!({"source": {"image": {"reference": "debian:12"}}}),
    )
    .await
    .unwrap();
    assert_refused(
        update(
            &env,
            "CapsuleTemplate",
            "tpl",
            json!({"source": {"image": {"reference": "debian:13"}}}),
        )
        .await,
        "source is immutable",
        "template source",
    );
    drop(env.case);
}

#[tokio::test]
async fn status_is_written_only_through_the_status_subresource() {
    let Some(env) = setup("status_is_written_only_through_the_status_subresource").await else {
        return;
    };
    let caps = api(&env, "Capsule");
    let mut obj = object("Capsule", "st", capsule(json!({})));
    obj.data["status"] = json!({"phase": "Running", "nodeName": "forged"});
    let created = caps.create(&PostParams::default(), &obj).await.unwrap();
    assert!(
        created.data.get("status").is_none(),
        "status on create was kept: {:?}",
        created.data
    );

    // A main-resource write cannot set status.
    let patched = caps
        .patch(
            "st",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Failed"}})),
        )
        .await
        .unwrap();
    assert!(
        patched.data.get("status").is_none(),
        "status via main resource: {:?}",
        patched.data
    );

    // The status subresource sets status, and only status.
    let ssa = PatchParams::apply(wrenn_crds::names::FIELD_MANAGER).force();
    let written = caps
        .patch_status(
            "st",
            &ssa,
            &Patch::Apply(json!({
                "apiVersion": "wrenn.dev/v1alpha1", "kind": "Capsule",
                "spec": {"operatingMode": "Paused"},
                "status": {"phase": "Running", "nodeName": "node-a", "observedGeneration": 1,
                           "conditions": [{"type": "Ready", "status": "True", "reason": "Running",
                                           "message": "ok", "lastTransitionTime": "2026-11-28T00:00:00Z"}]}
            })),
        )
        .await
        .unwrap();
    assert_eq!(written.data["status"]["phase"], "Running");
    assert_eq!(written.data["status"]["nodeName"], "node-a");
    assert_eq!(
        written.data["spec"]["operatingMode"], "Running",
        "spec changed through /status"
    );

    // An unknown phase is refused even on the status subresource.
    let bad = caps
        .patch_status("st", &ssa, &Patch::Apply(json!({
            "apiVersion": "wrenn.dev/v1alpha1", "kind": "Capsule", "status": {"phase": "Exploded"}})))
        .await;
    assert!(
        matches!(bad, Err(kube::Error::Api(ref r)) if r.message.contains("Unsupported value: \"Exploded\"")),
        "{bad:?}"
    );
    drop(env.case);
}

#[tokio::test]
async fn kubectl_get_shows_the_printer_columns() {
    let Some(env) = setup("kubectl_get_shows_the_printer_columns").await else {
        return;
    };
    create(
        &env,
        "Capsule",
        "shown",
        capsule(json!({"resources": {"vcpus": 3, "memory": "768Mi"}})),
    )
    .await
    .unwrap();
    api(&env, "Capsule")
        .patch_status(
            "shown",
            &PatchParams::apply(wrenn_crds::names::FIELD_MANAGER).force(),
            &Patch::Apply(
                json!({"apiVersion": "wrenn.dev/v1alpha1", "kind": "Capsule",
                "status": {"phase": "Running", "nodeName": "node-a", "ip": "10.200.0.7",
                           // The effective values, as the operator writes them.
                           "resources": {"vcpus": 3, "memory": "768Mi", "disk": "2Gi"}}}),
            ),
        )
        .await
        .unwrap();
    let out = env
        .cp
        .kubectl_ok(&["get", "cap", "-n", &env.ns], None)
        .unwrap();
    let mut lines = out.lines();
    let header: Vec<_> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "PHASE", "NODE", "IP", "VCPUS", "MEMORY", "AGE"],
        "{out}"
    );
    let row: Vec<_> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        &row[..6],
        ["shown", "Running", "node-a", "10.200.0.7", "3", "768Mi"],
        "{out}"
    );

    // Category and short names reach every kind.
    create(
        &env,
        "CapsuleTemplate",
        "tpl",
        json!({"source": {"image": {"reference": "debian:12"}}}),
    )
    .await
    .unwrap();
    let all = env
        .cp
        .kubectl_ok(&["get", "wrenn", "-n", &env.ns, "-o", "name"], None)
        .unwrap();
    assert!(
        all.contains("capsule.wrenn.dev/shown") && all.contains("capsuletemplate.wrenn.dev/tpl"),
        "{all}"
    );
    for short in ["cap", "csnap", "ctpl"] {
        env.cp
            .kubectl_ok(&["get", short, "-n", &env.ns], None)
            .unwrap();
    }
    drop(env.case);
}

#[tokio::test]
async fn capsule_disk_below_its_template_is_refused() {
    let Some(env) = setup("capsule_disk_below_its_template_is_refused").await else {
        return;
    };
    create(
        &env,
        "CapsuleTemplate",
        "big",
        json!({"source": {"image": {"reference": "debian:12"}}, "defaults": {"disk": "8Gi"}}),
    )
    .await
    .unwrap();
    // The policy sees templates through an informer: allow it to catch up.
    let deadline = Instant::now() + Duration::from_secs(30);
    // A new name per attempt: an admitted one keeps the operator's
    // finalizer (no operator here), so it stays until the namespace goes.
    let mut attempt = 0;
    let msg = loop {
        attempt += 1;
        let name = format!("small-{attempt}");
        match create(
            &env,
            "Capsule",
            &name,
            json!({"source": template_ref("big"), "resources": {"disk": "4Gi"}}),
        )
        .await
        {
            Err(msg) => break msg,
            Ok(_) => {
                api(&env, "Capsule")
                    .delete(&name, &Default::default())
                    .await
                    .unwrap();
                assert!(
                    Instant::now() < deadline,
                    "4Gi capsule on an 8Gi template kept being accepted"
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    };
    assert!(
        msg.contains("resources.disk 4Gi is smaller than the disk of template big (8Gi)"),
        "{msg}"
    );
    // Equal, larger and unset disks pass; other templates do not interfere.
    create(
        &env,
        "Capsule",
        "equal",
        json!({"source": template_ref("big"), "resources": {"disk": "8Gi"}}),
    )
    .await
    .unwrap();
    create(
        &env,
        "Capsule",
        "larger",
        json!({"source": template_ref("big"), "resources": {"disk": "16384Mi"}}),
    )
    .await
    .unwrap();
    create(
        &env,
        "Capsule",
        "unset",
        json!({"source": template_ref("big")}),
    )
    .await
    .unwrap();
    create(
        &env,
        "Capsule",
        "missing",
        json!({"source": template_ref("nope"), "resources": {"disk": "1Gi"}}),
    )
    .await
    .unwrap();
    drop(env.case);
}

/// Issue 11: a namespace user with CapsuleTemplate rights alone cannot make
/// the node agent open a node file; a cluster admin allows a namespace by
/// labelling it `wrenn.dev/node-images=allowed`, which the user cannot do.
#[tokio::test]
async fn only_namespaces_a_cluster_admin_allowed_may_name_node_files() {
    use wrenn_crds::names::label::NODE_IMAGES;
    let Some(env) = setup("only_namespaces_a_cluster_admin_allowed_may_name_node_files").await
    else {
        return;
    };
    let node_files = [
        (
            json!({"source": {"rootfs": {"path": "debian-12.ext4"}}}),
            "spec.source.rootfs.path names a file on the node",
        ),
        (
            json!({"source": {"image": {"reference": "debian:12"}}, "kernel": {"path": "kernels/vmlinux", "cmdline": "quiet"}}),
            "spec.kernel names a kernel file on the node",
        ),
        (
            json!({"source": {"image": {"reference": "oci:debian:12"}}}),
            "spec.source.image.reference names an image directory on the node",
        ),
        (
            json!({"source": {"image": {"reference": "docker-archive:debian.tar"}}}),
            "spec.source.image.reference names an image directory on the node",
        ),
    ];
    let allowed_by = "only namespaces a cluster admin labelled wrenn.dev/node-images=allowed";
    // A label with another value is no permission.
    let other = {
        use k8s_openapi::api::core::v1::Namespace;
        let ns: Namespace = serde_json::from_value(json!({"metadata": {
            "generateName": "yes-", "labels": { NODE_IMAGES: "yes" }
        }}))
        .unwrap();
        kube::Api::<Namespace>::all(env.client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap()
            .metadata
            .name
            .unwrap()
    };
    for ns in [env.ns.as_str(), other.as_str()] {
        for (i, (spec, expected)) in node_files.iter().enumerate() {
            // The policy is applied with the CRDs; allow it to take effect.
            let deadline = Instant::now() + Duration::from_secs(30);
            let msg = loop {
                match create_in(
                    &env.client,
                    ns,
                    "CapsuleTemplate",
                    &format!("t{i}"),
                    spec.clone(),
                )
                .await
                {
                    Err(msg) => break msg,
                    Ok(_) => {
                        api_in_delete(&env, ns, &format!("t{i}")).await;
                        assert!(Instant::now() < deadline, "{ns}: {expected}: accepted");
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                }
            };
            assert!(
                msg.contains(expected) && msg.contains(allowed_by),
                "{ns}: {msg}"
            );
        }
    }
    // A registry image needs no permission; adding a kernel to it later is
    // refused like naming one at creation.
    create(
        &env,
        "CapsuleTemplate",
        "registry",
        json!({"source": {"image": {"reference": "debian:12"}}}),
    )
    .await
    .unwrap();
    let msg = update(
        &env,
        "CapsuleTemplate",
        "registry",
        json!({"kernel": {"path": "kernels/vmlinux"}}),
    )
    .await
    .unwrap_err();
    assert!(
        msg.contains("spec.kernel names a kernel file on the node"),
        "{msg}"
    );
    // In a namespace the admin labelled, every one is accepted.
    let allowed = wrenn_e2e::node_images_namespace(&env.client, "allowed")
        .await
        .unwrap();
    for (i, (spec, _)) in node_files.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match create_in(
                &env.client,
                &allowed,
                "CapsuleTemplate",
                &format!("t{i}"),
                spec.clone(),
            )
            .await
            {
                Ok(_) => break,
                Err(msg) => {
                    assert!(Instant::now() < deadline, "allowed namespace: {msg}");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    }
    drop(env.case);
}

async fn api_in_delete(env: &Env, ns: &str, name: &str) {
    common::api_in(&env.client, ns, "CapsuleTemplate")
        .delete(name, &Default::default())
        .await
        .unwrap_or_else(|e| panic!("delete template {ns}/{name}: {e}"));
}
