//! The Helm chart (charts/wrenn) against helm and a real kube-apiserver, both
//! built from the Go module proxy: strict lint, the schema refusing bad
//! values, the rendered workloads honouring the operator and node-agent
//! contracts, a server-side dry run, an install that waits for a real
//! rollout onto kwok fake nodes (tier C) followed by an upgrade that changes
//! a CRD, and the operator's RBAC proven sufficient and minimal by acting
//! as its ServiceAccount through a capsule's lifecycle.
//!
//! Why this file is long: nine scenarios of the one chart (lint, schema,
//! rendered contracts, dry run, install and upgrade, RBAC) over shared render
//! helpers.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns unwrap too

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use wrenn_e2e::helm::{
    self, Helm, KUBE_VERSION_FLAG, chart_dir, copy_chart, documents, find_of, find_one as find,
    helm_or_skip,
};
use wrenn_e2e::workloads::{FakeNodes, Workloads};
use wrenn_e2e::{ControlPlane, refused_merge_patch};
use wrenn_testkit::{Case, Tier, case, unique_name};

/// Helm and the control plane, or a recorded skip.
fn cluster_or_skip(name: &str) -> Option<(Case, Helm, &'static ControlPlane)> {
    helm::cluster_or_skip(case(Tier::Cluster, name))
}

fn chart() -> String {
    chart_dir().display().to_string()
}

fn render(helm: &Helm, ns: &str, extra: &[&str]) -> Vec<Value> {
    helm.template("wrenn", ns, extra).unwrap()
}

/// The operator's Deployment (the gateway has one too).
fn operator_deployment(docs: &[Value]) -> &Value {
    find_of(docs, "Deployment", "operator")
}

fn env_of(container: &Value) -> BTreeMap<String, Value> {
    helm::env_of(container).into_iter().collect()
}

fn mounts_of(pod_spec: &Value) -> BTreeMap<String, (String, Value)> {
    let volumes: BTreeMap<String, Value> = pod_spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap().to_string(), v.clone()))
        .collect();
    pod_spec["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let name = m["name"].as_str().unwrap();
            (
                m["mountPath"].as_str().unwrap().to_string(),
                (name.to_string(), volumes[name].clone()),
            )
        })
        .collect()
}

#[test]
fn chart_crd_copy_matches_crdgen_output() {
    let _c = case(Tier::Unit, "chart::chart_crd_copy_matches_crdgen_output");
    let root = wrenn_e2e::workspace_root();
    let names = |dir: PathBuf| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".yaml"))
            .collect();
        v.sort();
        v
    };
    let src = names(root.join("crds"));
    assert_eq!(
        src,
        names(root.join("charts/wrenn/files/crds")),
        "run charts/wrenn/sync-crds.sh"
    );
    for n in src {
        let a = std::fs::read(root.join("crds").join(&n)).unwrap();
        let b = std::fs::read(root.join("charts/wrenn/files/crds").join(&n)).unwrap();
        assert!(
            a == b,
            "charts/wrenn/files/crds/{n} differs from crds/{n}: run charts/wrenn/sync-crds.sh"
        );
    }
}

#[test]
fn lint_is_strict_clean_for_every_values_file() {
    let Some((_c, helm)) = helm_or_skip(case(
        Tier::Cluster,
        "chart::lint_is_strict_clean_for_every_values_file",
    )) else {
        return;
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(chart_dir().join("ci"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(
        files.len() >= 3,
        "ci/ should hold the default, cert-manager and qemu scenarios"
    );
    for f in files {
        let out = helm
            .run(&[
                "lint",
                "--strict",
                &chart(),
                "-f",
                &f.display().to_string(),
                KUBE_VERSION_FLAG,
            ])
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "helm lint --strict with {}:\n{text}{}",
            f.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !text.contains("[WARNING]"),
            "lint warnings with {}:\n{text}",
            f.display()
        );
    }
}

/// (case, --set/--set-string arguments, what the refusal must say)
fn bad_values() -> Vec<(&'static str, Vec<&'static str>, Vec<&'static str>)> {
    vec![
        (
            "unknown VMM",
            vec!["--set", "nodeAgent.vmm=firecracker"],
            vec!["/nodeAgent/vmm", "'cloud-hypervisor', 'qemu'"],
        ),
        (
            "unknown storage backend",
            vec!["--set", "nodeAgent.storage=zfs"],
            vec!["/nodeAgent/storage", "'auto', 'dm-snapshot', 'qcow2'"],
        ),
        (
            "agent port 0",
            vec!["--set", "nodeAgent.port=0"],
            vec!["/nodeAgent/port", "minimum"],
        ),
        (
            "agent port above 65535",
            vec!["--set", "nodeAgent.port=70000"],
            vec!["/nodeAgent/port", "maximum"],
        ),
        (
            "admin port as text",
            vec!["--set-string", "nodeAgent.adminPort=metrics"],
            vec!["/nodeAgent/adminPort", "want integer"],
        ),
        (
            "operator admin port 0",
            vec!["--set", "operator.adminPort=0"],
            vec!["/operator/adminPort", "minimum"],
        ),
        (
            "agent gRPC and admin on one port",
            vec!["--set", "nodeAgent.adminPort=7443"],
            vec!["nodeAgent.port and nodeAgent.adminPort must differ"],
        ),
        (
            "three operator replicas",
            vec!["--set", "operator.replicas=3"],
            vec!["/operator/replicas", "maximum"],
        ),
        (
            "zero operator replicas",
            vec!["--set", "operator.replicas=0"],
            vec!["/operator/replicas", "minimum"],
        ),
        (
            "two replicas without leader election",
            vec!["--set", "operator.replicas=2,operator.leaderElection=false"],
            vec!["/operator/leaderElection"],
        ),
        (
            "empty operator repository",
            vec!["--set", "operator.image.repository="],
            vec!["/operator/image/repository"],
        ),
        (
            "tag inside the repository",
            vec![
                "--set",
                "nodeAgent.image.repository=wrenn-node-agent:latest",
            ],
            vec!["/nodeAgent/image/repository"],
        ),
        (
            "digest that is not sha256",
            vec!["--set", "operator.image.digest=md5:abc"],
            vec!["/operator/image/digest"],
        ),
        (
            "uplink that is no interface name",
            vec!["--set", "nodeAgent.uplink=eth0/1"],
            vec!["/nodeAgent/uplink"],
        ),
        (
            "relative state directory",
            vec!["--set", "nodeAgent.stateDir=var/lib/wrenn"],
            vec!["/nodeAgent/stateDir"],
        ),
        (
            "state directory on /tmp",
            vec!["--set", "nodeAgent.stateDir=/tmp"],
            vec!["/nodeAgent/stateDir"],
        ),
        (
            "relative kernel path",
            vec!["--set", "nodeAgent.kernel=vmlinux"],
            vec!["/nodeAgent/kernel"],
        ),
        (
            "unknown TLS mode",
            vec!["--set", "tls.mode=vault"],
            vec!["/tls/mode", "'helm', 'cert-manager'"],
        ),
        (
            "zero-day certificates",
            vec!["--set", "tls.validityDays=0"],
            vec!["/tls/validityDays", "minimum"],
        ),
        (
            "Recreate update strategy",
            vec!["--set", "nodeAgent.updateStrategy.type=Recreate"],
            vec![
                "/nodeAgent/updateStrategy/type",
                "'RollingUpdate', 'OnDelete'",
            ],
        ),
        (
            "zero maxUnavailable",
            vec!["--set", "nodeAgent.updateStrategy.maxUnavailable=0"],
            vec!["/nodeAgent/updateStrategy/maxUnavailable"],
        ),
        (
            "surge on the DaemonSet",
            vec!["--set", "nodeAgent.updateStrategy.maxSurge=1"],
            vec!["/nodeAgent/updateStrategy", "'maxSurge' not allowed"],
        ),
        (
            "misspelt key",
            vec!["--set", "nodeAgent.kvmPath=/dev/kvm"],
            vec!["/nodeAgent", "'kvmPath' not allowed"],
        ),
        (
            "unknown log format",
            vec!["--set", "log.format=xml"],
            vec!["/log/format", "'plain', 'json'"],
        ),
        (
            "unknown pull policy",
            vec!["--set", "image.pullPolicy=Sometimes"],
            vec!["/image/pullPolicy"],
        ),
        (
            "node selector value not a string",
            vec!["--set", "nodeAgent.nodeSelector.wrenn\\.dev/kvm=true"],
            vec!["/nodeAgent/nodeSelector/wrenn.dev~1kvm", "want string"],
        ),
        (
            "image dir relative",
            vec!["--set", "nodeAgent.imageDirs={images}"],
            vec!["/nodeAgent/imageDirs/0", "does not match pattern"],
        ),
        (
            "image dir holding every node file",
            vec!["--set", "nodeAgent.imageDirs={/dev}"],
            vec!["/nodeAgent/imageDirs/0"],
        ),
        (
            "CRDs not a boolean",
            vec!["--set-string", "crds.install=yes"],
            vec!["/crds/install", "want boolean"],
        ),
        (
            "admin port on every address",
            vec!["--set", "nodeAgent.adminBind=0.0.0.0"],
            vec!["/nodeAgent/adminBind", "'podIP', 'loopback'"],
        ),
        (
            "admin on loopback with a PodMonitor",
            vec![
                "--set",
                "nodeAgent.adminBind=loopback,metrics.serviceMonitor.enabled=true",
            ],
            vec!["nodeAgent.adminBind=loopback leaves nothing for the PodMonitor"],
        ),
        (
            "no gRPC connections allowed",
            vec!["--set", "nodeAgent.grpc.maxConnections=0"],
            vec!["/nodeAgent/grpc/maxConnections", "minimum"],
        ),
        (
            "TLS handshake without a deadline",
            vec!["--set", "nodeAgent.grpc.handshakeTimeoutSeconds=0"],
            vec!["/nodeAgent/grpc/handshakeTimeoutSeconds", "minimum"],
        ),
        (
            "wildcard client name",
            vec!["--set", "tls.extraClientNames={*.example}"],
            vec!["/tls/extraClientNames/0"],
        ),
        (
            "CA certificate without its key",
            vec![
                "--set-string",
                "tls.agentCA.cert=-----BEGIN CERTIFICATE-----x",
            ],
            vec!["tls.agentCA needs both cert and key"],
        ),
        (
            "CA key that is no PEM key",
            vec!["--set-string", "tls.clientCA.key=secret"],
            vec!["/tls/clientCA/key"],
        ),
    ]
}

#[test]
fn bad_values_are_refused_by_the_schema() {
    let Some((_c, helm)) = helm_or_skip(case(
        Tier::Cluster,
        "chart::bad_values_are_refused_by_the_schema",
    )) else {
        return;
    };
    let cases = bad_values();
    assert!(cases.len() >= 20);
    let mut failures = Vec::new();
    for (what, set, expected) in cases {
        let chart = chart();
        let mut args = vec!["template", "wrenn", chart.as_str(), KUBE_VERSION_FLAG];
        args.extend(set.iter().copied());
        let out = helm.run(&args).unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            failures.push(format!("{what}: accepted {set:?}"));
        } else if let Some(missing) = expected.iter().find(|e| !err.contains(*e)) {
            failures.push(format!("{what}: refusal lacks {missing:?}:\n{err}"));
        }
    }
    // The same values with the fields fixed render: the refusals are specific.
    let fixed = "nodeAgent.vmm=qemu,nodeAgent.storage=qcow2,operator.replicas=2,\
                 nodeAgent.updateStrategy.maxUnavailable=10%";
    let chart = chart();
    helm.ok(&[
        "template",
        "wrenn",
        &chart,
        KUBE_VERSION_FLAG,
        "--set",
        fixed,
    ])
    .unwrap();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn rendered_workloads_match_the_contracts() {
    let Some((_c, helm)) = helm_or_skip(case(
        Tier::Cluster,
        "chart::rendered_workloads_match_the_contracts",
    )) else {
        return;
    };
    let docs = render(&helm, "wrenn-system", &[]);

    // Node agent: privileged on the host's network and PID namespace, with the
    // devices and host directories VMs need, only on KVM nodes, no API token.
    let ds = find(&docs, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(
        ds["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"],
        "wrenn-node-agent"
    );
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["hostPID"], true);
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(pod["nodeSelector"], json!({"wrenn.dev/kvm": "true"}));
    assert!(
        pod["tolerations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["key"] == "wrenn.dev/capsules")
    );
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["privileged"], true);
    let mounts = mounts_of(pod);
    for (path, host, kind) in [
        ("/dev/kvm", "/dev/kvm", "CharDevice"),
        ("/dev/net/tun", "/dev/net/tun", "CharDevice"),
        ("/dev/mapper", "/dev/mapper", "DirectoryOrCreate"),
        ("/var/lib/wrenn", "/var/lib/wrenn", "DirectoryOrCreate"),
        ("/sys/fs/cgroup", "/sys/fs/cgroup", "Directory"),
        ("/run/netns", "/run/netns", "DirectoryOrCreate"),
    ] {
        let (_, vol) = mounts
            .get(path)
            .unwrap_or_else(|| panic!("no mount at {path}"));
        assert_eq!(vol["hostPath"]["path"], host, "{path}");
        assert_eq!(vol["hostPath"]["type"], kind, "{path}");
    }
    // Capsules must survive an agent rollout: never two agents on a node, one node at a time.
    assert_eq!(
        ds["spec"]["updateStrategy"],
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}})
    );
    let env = env_of(c);
    assert_eq!(
        env["NODE_NAME"],
        json!({"fieldRef": {"fieldPath": "spec.nodeName"}})
    );
    for (k, v) in [
        ("WRENN_LISTEN", "0.0.0.0:7443"),
        // The unauthenticated admin port binds the pod (node) IP only.
        ("WRENN_ADMIN_LISTEN", "pod-ip:9090"),
        ("WRENN_METRICS_CAPSULE_LABELS", "false"),
        // Only the operator's certificate name is served.
        ("WRENN_CLIENT_NAMES", "wrenn-operator,wrenn-gateway"),
        ("WRENN_MAX_CONNECTIONS", "128"),
        ("WRENN_TLS_HANDSHAKE_TIMEOUT_SECONDS", "10"),
        ("WRENN_TLS_RELOAD_SECONDS", "10"),
        ("WRENN_STATE_DIR", "/var/lib/wrenn"),
        ("WRENN_IMAGE_DIRS", "/var/lib/wrenn/node-images"),
        ("WRENN_VMM", "cloud-hypervisor"),
        ("WRENN_STORAGE", "auto"),
        ("WRENN_TLS_CERT", "/etc/wrenn/tls/tls.crt"),
        ("WRENN_TLS_KEY", "/etc/wrenn/tls/tls.key"),
        ("WRENN_CLIENT_CA", "/etc/wrenn/tls/client-ca.crt"),
    ] {
        assert_eq!(env[k], v, "{k}");
    }
    for k in [
        "WRENN_CH_BINARY",
        "WRENN_KERNEL",
        "WRENN_LOG_LEVEL",
        "WRENN_LOG_FORMAT",
    ] {
        assert!(env.contains_key(k), "agent env lacks {k}");
    }
    assert_eq!(
        env["POD_IP"],
        json!({"fieldRef": {"fieldPath": "status.podIP"}})
    );
    assert_eq!(
        c["readinessProbe"]["httpGet"],
        json!({"path": "/readyz", "port": "admin"})
    );
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    // Image directories outside the state dir are mounted read-only; the
    // one inside it comes with the state mount.
    let with_dirs = render(
        &helm,
        "wrenn-system",
        &[
            "--set",
            "nodeAgent.imageDirs={/srv/wrenn-images,/var/lib/wrenn/node-images}",
        ],
    );
    let pod = &find(&with_dirs, "DaemonSet")["spec"]["template"]["spec"];
    assert_eq!(
        env_of(&pod["containers"][0])["WRENN_IMAGE_DIRS"],
        "/srv/wrenn-images,/var/lib/wrenn/node-images"
    );
    let mounts = mounts_of(pod);
    let (name, vol) = &mounts["/srv/wrenn-images"];
    assert_eq!(
        vol["hostPath"],
        json!({"path": "/srv/wrenn-images", "type": "Directory"})
    );
    let mount = pod["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == name.as_str())
        .unwrap();
    assert_eq!(mount["readOnly"], true);
    assert!(!mounts.contains_key("/var/lib/wrenn/node-images"));

    // Admin on loopback: the probes follow it; a gateway's name is served too.
    let lo = render(
        &helm,
        "wrenn-system",
        &[
            "--set",
            "nodeAgent.adminBind=loopback,tls.extraClientNames={wrenn-gateway}",
        ],
    );
    let c = &find(&lo, "DaemonSet")["spec"]["template"]["spec"]["containers"][0];
    let env = env_of(c);
    assert_eq!(env["WRENN_ADMIN_LISTEN"], "127.0.0.1:9090");
    assert!(!env.contains_key("POD_IP"));
    assert_eq!(env["WRENN_CLIENT_NAMES"], "wrenn-operator,wrenn-gateway");
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(c[probe]["httpGet"]["host"], "127.0.0.1", "{probe}");
    }

    // Gateway: stateless replicas with HTTPS probes on its port, its agent
    // identity from the client CA, and an APIService trusting exactly its
    // serving certificate's CA.
    let gw = docs
        .iter()
        .find(|d| {
            d["kind"] == "Deployment"
                && d["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway"
        })
        .expect("a gateway Deployment");
    assert_eq!(gw["spec"]["replicas"], 2);
    let gc = &gw["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(gc["readinessProbe"]["httpGet"]["scheme"], "HTTPS");
    assert_eq!(gc["securityContext"]["readOnlyRootFilesystem"], true);
    let apisvc = find(&docs, "APIService");
    assert_eq!(
        apisvc["metadata"]["name"],
        "v1alpha1.subresources.wrenn.dev"
    );
    assert_eq!(apisvc["spec"]["service"]["name"], "wrenn-gateway");
    let serving = docs
        .iter()
        .find(|d| d["kind"] == "Secret" && d["metadata"]["name"] == "wrenn-gateway-serving")
        .expect("the gateway's serving Secret");
    assert_eq!(apisvc["spec"]["caBundle"], serving["data"]["ca.crt"]);
    let gw_cert = docs
        .iter()
        .find(|d| d["kind"] == "Secret" && d["metadata"]["name"] == "wrenn-gateway-tls")
        .expect("the gateway's client Secret");
    let gw_pem =
        String::from_utf8(decode_b64(gw_cert["data"]["tls.crt"].as_str().unwrap())).unwrap();
    assert!(gw_pem.contains("BEGIN CERTIFICATE"));
    // Aggregated roles: edit may exec, view may only read.
    let role = |suffix: &str| {
        docs.iter()
            .find(|d| {
                d["kind"] == "ClusterRole" && d["metadata"]["name"] == format!("wrenn-{suffix}")
            })
            .unwrap_or_else(|| panic!("no ClusterRole wrenn-{suffix}"))
    };
    let edit = role("edit");
    assert_eq!(
        edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"],
        "true"
    );
    assert!(edit["rules"].to_string().contains("capsules/exec"));
    let view = role("view");
    assert_eq!(
        view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"],
        "true"
    );
    assert!(!view["rules"].to_string().contains("exec"));

    // Operator: non-root, read-only, no capabilities, probes on the admin port.
    let dep = operator_deployment(&docs);
    let pod = &dep["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_ne!(pod["securityContext"]["runAsUser"], 0);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    assert!(c["args"].is_null(), "every setting is an env var");
    assert_eq!(
        c["readinessProbe"]["httpGet"],
        json!({"path": "/readyz", "port": "admin"})
    );
    assert_eq!(c["ports"][0]["containerPort"], 8080);
    let env = env_of(c);
    assert_eq!(env["WRENN_LEADER_ELECTION"], "true");
    assert_eq!(env["WRENN_AGENT_PORT"], "7443");
    assert_eq!(env["WRENN_ADMIN_LISTEN"], "0.0.0.0:8080");
    assert_eq!(env["WRENN_AGENT_NAMESPACE"], "$(POD_NAMESPACE)");
    assert_eq!(
        env["POD_NAMESPACE"],
        json!({"fieldRef": {"fieldPath": "metadata.namespace"}})
    );
    assert!(
        env["WRENN_AGENT_SELECTOR"]
            .as_str()
            .unwrap()
            .starts_with("app.kubernetes.io/name=wrenn-node-agent")
    );
    assert_eq!(env["WRENN_AGENT_CA"], "/etc/wrenn/tls/agent-ca.crt");
    // The certificate checksum is the same on both pods: one set of certificates.
    let sum = |d: &Value| d["spec"]["template"]["metadata"]["annotations"]["checksum/tls"].clone();
    assert!(sum(ds).is_string());
    assert_eq!(sum(ds), sum(dep));

    // CRDs are templates kept on uninstall, and labelled for the release.
    let crds: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "CustomResourceDefinition")
        .collect();
    assert_eq!(crds.len(), 3);
    for crd in crds {
        assert_eq!(
            crd["metadata"]["annotations"]["helm.sh/resource-policy"],
            "keep"
        );
    }

    // QEMU on nodes without KVM: no /dev/kvm check, no dm mount with qcow2, OnDelete.
    let qemu = render(
        &helm,
        "wrenn-system",
        &[
            "-f",
            &chart_dir()
                .join("ci/qemu-values.yaml")
                .display()
                .to_string(),
        ],
    );
    let ds = find(&qemu, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    let mounts = mounts_of(pod);
    assert!(!mounts.contains_key("/dev/kvm") && !mounts.contains_key("/dev/mapper"));
    assert!(pod["nodeSelector"].is_null());
    assert_eq!(ds["spec"]["updateStrategy"], json!({"type": "OnDelete"}));
    assert_eq!(
        pod["containers"][0]["image"],
        "registry.example.com/wrenn/wrenn-node-agent:0.1.0"
    );
    assert!(
        qemu.iter()
            .filter(|d| d["kind"] == "CustomResourceDefinition")
            .all(|d| d["metadata"]["annotations"].is_null())
    );

    // cert-manager: no generated Secrets; each side trusts the other side's CA.
    let cm = render(
        &helm,
        "wrenn-system",
        &[
            "-f",
            &chart_dir()
                .join("ci/cert-manager-values.yaml")
                .display()
                .to_string(),
        ],
    );
    assert!(cm.iter().all(|d| d["kind"] != "Secret"));
    let certs: BTreeMap<String, &Value> = cm
        .iter()
        .filter(|d| d["kind"] == "Certificate")
        .map(|d| (d["metadata"]["name"].as_str().unwrap().to_string(), d))
        .collect();
    // Two CAs, the agent's, the operator's and the gateway's two.
    assert_eq!(certs.len(), 6);
    // CAs and leaves are renewed before they expire; a CA keeps its key, so
    // what it signed before a renewal stays valid.
    for (name, duration, renew, rotation) in [
        ("wrenn-agent-ca", "87600h", "720h", "Never"),
        ("wrenn-client-ca", "87600h", "720h", "Never"),
        ("wrenn-node-agent-tls", "2160h", "360h", "Always"),
        ("wrenn-operator-tls", "2160h", "360h", "Always"),
        ("wrenn-gateway-tls", "2160h", "360h", "Always"),
        ("wrenn-gateway-serving", "2160h", "360h", "Always"),
    ] {
        let spec = &certs[name]["spec"];
        assert_eq!(spec["duration"], duration, "{name}");
        assert_eq!(spec["renewBefore"], renew, "{name}");
        assert_eq!(spec["privateKey"]["rotationPolicy"], rotation, "{name}");
    }
    // The operator's certificate carries the name agents serve.
    assert_eq!(
        certs["wrenn-operator-tls"]["spec"]["dnsNames"],
        json!(["wrenn-operator"])
    );
    let trust = |d: &Value| {
        d["spec"]["template"]["spec"]["volumes"][0]["projected"]["sources"][1]["secret"]["name"]
            .clone()
    };
    assert_eq!(trust(find(&cm, "DaemonSet")), "wrenn-client-ca");
    assert_eq!(trust(operator_deployment(&cm)), "wrenn-agent-ca");
    assert_eq!(operator_deployment(&cm)["spec"]["replicas"], 2);
    // The gateway's agent identity comes from the client CA; cert-manager
    // injects its serving certificate into the APIService.
    assert_eq!(
        certs["wrenn-gateway-tls"]["spec"]["dnsNames"],
        json!(["wrenn-gateway"])
    );
    assert_eq!(
        find(&cm, "APIService")["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        "wrenn-system/wrenn-gateway-serving"
    );
    assert!(find(&cm, "APIService")["spec"]["caBundle"].is_null());
}

#[test]
fn rendered_chart_passes_server_side_dry_run() {
    let Some((_c, helm, cp)) = cluster_or_skip("chart::rendered_chart_passes_server_side_dry_run")
    else {
        return;
    };
    let ns = unique_name("dry");
    cp.kubectl_ok(&["create", "namespace", &ns], None).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (label, values) in [
        ("default", "ci/default-values.yaml"),
        ("qemu", "ci/qemu-values.yaml"),
    ] {
        let chart = chart();
        let values = chart_dir().join(values).display().to_string();
        // A release name of its own: object names never meet the install
        // test's, which it may be deleting meanwhile.
        let release = unique_name("dry");
        let rendered = helm
            .ok(&[
                "template",
                &release,
                &chart,
                "-n",
                &ns,
                KUBE_VERSION_FLAG,
                "-f",
                &values,
            ])
            .unwrap();
        let count = documents(&rendered).unwrap().len();
        println!("rendered manifests ({label}): {count}");
        let file = dir.path().join(format!("{label}.yaml"));
        std::fs::write(&file, &rendered).unwrap();
        // No `-n`: every namespaced object names its namespace (the
        // gateway's reader binding lives in kube-system).
        let out = cp
            .kubectl_ok(&["apply", "--dry-run=server", "-f"], Some(&file))
            .unwrap();
        let applied = out
            .lines()
            .filter(|l| l.contains("(server dry run)"))
            .count();
        assert_eq!(
            applied, count,
            "every rendered object passes admission:\n{out}"
        );
    }
}

/// Marks the CRDs and policy the harness applied as owned by `release`, as
/// README's "CRDs applied by hand" migration does.
fn adopt_api_objects(cp: &ControlPlane, release: &str, ns: &str) {
    let mut objects: Vec<String> = [
        "crd/capsules.wrenn.dev",
        "crd/capsulesnapshots.wrenn.dev",
        "crd/capsuletemplates.wrenn.dev",
    ]
    .map(String::from)
    .into();
    // Every admission policy and binding `crds/policy.yaml` holds.
    for doc in wrenn_crds::policy::documents().unwrap() {
        objects.push(format!(
            "{}/{}",
            doc["kind"].as_str().unwrap().to_lowercase(),
            doc["metadata"]["name"].as_str().unwrap()
        ));
    }
    for o in &objects {
        cp.kubectl_ok(
            &[
                "label",
                "--overwrite",
                o,
                "app.kubernetes.io/managed-by=Helm",
            ],
            None,
        )
        .unwrap();
        cp.kubectl_ok(
            &[
                "annotate",
                "--overwrite",
                o,
                &format!("meta.helm.sh/release-name={release}"),
                &format!("meta.helm.sh/release-namespace={ns}"),
            ],
            None,
        )
        .unwrap();
    }
}

fn json_of(cp: &ControlPlane, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    serde_json::from_str(&cp.kubectl_ok(&a, None).unwrap()).unwrap()
}

fn apply_json(cp: &ControlPlane, dir: &Path, ns: &str, obj: Value) {
    let file = dir.join(format!("{}.json", unique_name("obj")));
    std::fs::write(&file, obj.to_string()).unwrap();
    cp.kubectl_ok(&["apply", "-n", ns, "-f"], Some(&file))
        .unwrap();
}

const CRD_SPEC_HEADER: &str = "          spec:\n            description: Desired state of a capsule.\n            properties:\n";
const CRD_NEW_FIELD: &str = "              wrennUpgradeProbe:\n                description: Added by the chart upgrade test.\n                type: string\n";

#[test]
fn install_rolls_out_and_upgrade_changes_the_crd_keeping_objects() {
    let Some((_c, helm, cp)) =
        cluster_or_skip("chart::install_rolls_out_and_upgrade_changes_the_crd_keeping_objects")
    else {
        return;
    };
    let wl = match Workloads::shared(cp) {
        Ok(w) => w,
        Err(e) => {
            panic!("tier C (kube-controller-manager, kube-scheduler, kwok) did not start: {e}")
        }
    };
    let ns = unique_name("rel");
    let release = "wrenn";
    cp.kubectl_ok(&["create", "namespace", &ns], None).unwrap();
    let kvm_a = unique_name("kvm");
    let kvm_b = unique_name("kvm");
    let plain = unique_name("plain");
    let kvm: &[(&str, &str)] = &[("wrenn.dev/kvm", "true")];
    let _nodes = FakeNodes::add(wl, cp, &[(&kvm_a, kvm), (&kvm_b, kvm), (&plain, &[])]).unwrap();
    // Only capsule nodes carry the taint; the agent tolerates it.
    cp.kubectl_ok(
        &[
            "taint",
            "node",
            &kvm_b,
            "wrenn.dev/capsules=only:NoSchedule",
        ],
        None,
    )
    .unwrap();
    adopt_api_objects(cp, release, &ns);

    let t0 = Instant::now();
    let notes = helm
        .ok_on(
            cp,
            &[
                "install",
                release,
                &chart(),
                "-n",
                &ns,
                "--wait",
                "--timeout=180s",
            ],
        )
        .unwrap();
    let install_ms = t0.elapsed().as_millis();
    // NOTES.txt tells the user what to do next, with this release's names.
    for next in [
        format!("kubectl -n {ns} get deploy,ds -l app.kubernetes.io/instance={release}"),
        "kubectl label node NODE wrenn.dev/kvm=true".to_string(),
        "kubectl get capsule hello -w".to_string(),
        format!("kubectl -n {ns} delete secret wrenn-node-agent-tls wrenn-operator-tls"),
    ] {
        assert!(notes.contains(&next), "NOTES lack {next:?}:\n{notes}");
    }
    println!(
        "helm install --wait (CRDs, operator rollout, agent DaemonSet on 2 nodes): {install_ms} ms"
    );

    let ds = json_of(cp, &["get", "ds", "-n", &ns, "wrenn-node-agent"]);
    assert_eq!(
        ds["status"]["desiredNumberScheduled"], 2,
        "agents go to KVM nodes only: {}",
        ds["status"]
    );
    assert_eq!(ds["status"]["numberReady"], 2);
    let pods = json_of(
        cp,
        &[
            "get",
            "pods",
            "-n",
            &ns,
            "-l",
            "app.kubernetes.io/name=wrenn-node-agent",
        ],
    );
    let mut on: Vec<String> = pods["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["spec"]["nodeName"].as_str().unwrap().to_string())
        .collect();
    on.sort();
    let mut want = vec![kvm_a.clone(), kvm_b.clone()];
    want.sort();
    assert_eq!(on, want, "one agent on each KVM node, none on {plain}");
    let dep = json_of(cp, &["get", "deploy", "-n", &ns, "wrenn-operator"]);
    assert_eq!(dep["status"]["availableReplicas"], 1);

    // A user's objects before the upgrade.
    let dir = tempfile::tempdir().unwrap();
    apply_json(
        cp,
        dir.path(),
        &ns,
        json!({"apiVersion": "wrenn.dev/v1alpha1", "kind": "CapsuleTemplate", "metadata": {"name": "base"}, "spec": {"source": {"image": {"reference": "docker.io/library/busybox:1"}}}}),
    );
    apply_json(
        cp,
        dir.path(),
        &ns,
        json!({"apiVersion": "wrenn.dev/v1alpha1", "kind": "Capsule", "metadata": {"name": "kept"}, "spec": {"source": {"templateRef": {"name": "base"}}}}),
    );
    let uid = json_of(cp, &["get", "capsule", "-n", &ns, "kept"])["metadata"]["uid"].clone();
    let secret_before =
        json_of(cp, &["get", "secret", "-n", &ns, "wrenn-node-agent-tls"])["data"].clone();
    let ds_generation = ds["metadata"]["generation"].clone();

    // The next chart version adds a field to the Capsule CRD.
    let next = dir.path().join("wrenn-next");
    copy_chart(&next).unwrap();
    let crd_file = next.join("files/crds/capsule.yaml");
    let crd = std::fs::read_to_string(&crd_file).unwrap();
    assert_eq!(
        crd.matches(CRD_SPEC_HEADER).count(),
        1,
        "capsule.yaml layout changed; update the test"
    );
    std::fs::write(
        &crd_file,
        crd.replace(
            CRD_SPEC_HEADER,
            &format!("{CRD_SPEC_HEADER}{CRD_NEW_FIELD}"),
        ),
    )
    .unwrap();
    let t0 = Instant::now();
    helm.ok_on(
        cp,
        &[
            "upgrade",
            release,
            &next.display().to_string(),
            "-n",
            &ns,
            "--wait",
            "--timeout=180s",
        ],
    )
    .unwrap();
    println!(
        "helm upgrade --wait (changed CRD): {} ms",
        t0.elapsed().as_millis()
    );

    let crd = json_of(cp, &["get", "crd", "capsules.wrenn.dev"]);
    let props = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    assert_eq!(
        props["wrennUpgradeProbe"]["type"], "string",
        "the upgrade changed the stored CRD"
    );
    assert_eq!(
        json_of(cp, &["get", "capsule", "-n", &ns, "kept"])["metadata"]["uid"],
        uid,
        "existing capsule kept"
    );
    // The new field is served: it survives a write instead of being pruned.
    apply_json(
        cp,
        dir.path(),
        &ns,
        json!({"apiVersion": "wrenn.dev/v1alpha1", "kind": "Capsule", "metadata": {"name": "probe"}, "spec": {"source": {"templateRef": {"name": "base"}}, "wrennUpgradeProbe": "seen"}}),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let c = json_of(cp, &["get", "capsule", "-n", &ns, "probe"]);
        if c["spec"]["wrennUpgradeProbe"] == "seen" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "new CRD field pruned: {}",
            c["spec"]
        );
        // No operator runs here to release the finalizer the chart's
        // policy put on: do not wait for it, take it off.
        cp.kubectl_ok(
            &["delete", "capsule", "-n", &ns, "probe", "--wait=false"],
            None,
        )
        .unwrap();
        // (Gone already when the policy was not compiled yet.)
        let _ = cp.kubectl(
            &[
                "patch",
                "capsule",
                "-n",
                &ns,
                "probe",
                "--type=merge",
                "-p",
                r#"{"metadata":{"finalizers":null}}"#,
            ],
            None,
        );
        std::thread::sleep(Duration::from_millis(300));
        apply_json(
            cp,
            dir.path(),
            &ns,
            json!({"apiVersion": "wrenn.dev/v1alpha1", "kind": "Capsule", "metadata": {"name": "probe"}, "spec": {"source": {"templateRef": {"name": "base"}}, "wrennUpgradeProbe": "seen"}}),
        );
    }
    // Certificates are stable across upgrades, so agents were not restarted.
    assert_eq!(
        json_of(cp, &["get", "secret", "-n", &ns, "wrenn-node-agent-tls"])["data"],
        secret_before
    );
    assert_eq!(
        json_of(cp, &["get", "ds", "-n", &ns, "wrenn-node-agent"])["metadata"]["generation"],
        ds_generation
    );

    // Uninstall keeps the CRDs and so the user's capsules.
    helm.ok_on(
        cp,
        &["uninstall", release, "-n", &ns, "--wait", "--timeout=120s"],
    )
    .unwrap();
    cp.kubectl_ok(&["get", "crd", "capsules.wrenn.dev"], None)
        .unwrap();
    cp.kubectl_ok(
        &[
            "get",
            "validatingadmissionpolicy",
            "capsule-disk-at-least-template.wrenn.dev",
        ],
        None,
    )
    .unwrap();
    assert_eq!(
        json_of(cp, &["get", "capsule", "-n", &ns, "kept"])["metadata"]["uid"],
        uid
    );
    let gone = cp
        .kubectl(&["get", "ds", "-n", &ns, "wrenn-node-agent"], None)
        .unwrap();
    assert!(
        !gone.status.success(),
        "the DaemonSet is removed with the release"
    );
}

/// `resource` is `kind`, `kind/name`, or `kind:subresource`.
fn can_i(cp: &ControlPlane, sa: &str, verb: &str, resource: &str, ns: Option<&str>) -> bool {
    let (resource, sub) = match resource.split_once(':') {
        Some((r, s)) => (r, Some(s)),
        None => (resource, None),
    };
    let mut args = vec!["auth", "can-i", verb, resource, "--as", sa];
    if let Some(s) = sub {
        args.extend(["--subresource", s]);
    }
    match ns {
        Some(n) => args.extend(["-n", n]),
        None => args.push("--all-namespaces"),
    }
    let out = cp.kubectl(&args, None).unwrap();
    String::from_utf8_lossy(&out.stdout).trim() == "yes"
}

async fn client_as(cp: &ControlPlane, user: &str) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(&cp.kubeconfig).unwrap();
    let mut config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .unwrap();
    config.auth_info.impersonate = Some(user.to_string());
    kube::Client::try_from(config).unwrap()
}

fn status_code(e: &kube::Error) -> u16 {
    match e {
        kube::Error::Api(s) => s.code,
        other => panic!("not an API refusal: {other}"),
    }
}

#[tokio::test]
async fn operator_rbac_is_sufficient_and_minimal() {
    let Some((_c, helm, cp)) = tokio::task::spawn_blocking(|| {
        cluster_or_skip("chart::operator_rbac_is_sufficient_and_minimal")
    })
    .await
    .unwrap() else {
        return;
    };
    let ns = unique_name("rbac");
    let user_ns = unique_name("users");
    let release = unique_name("r");
    for n in [&ns, &user_ns] {
        cp.kubectl_ok(&["create", "namespace", n], None).unwrap();
    }
    // CRDs belong to the install test's release; this one brings RBAC and policies.
    helm.ok_on(
        cp,
        &[
            "install",
            &release,
            &chart(),
            "-n",
            &ns,
            "--set",
            "crds.install=false",
            // The APIService is cluster-wide and the install test's release
            // owns it.
            "--set",
            "gateway.enabled=false",
            // Its agents go nowhere: on tier C they would take the host
            // ports of the install test's agents.
            "--set-string",
            "nodeAgent.nodeSelector.wrenn\\.dev/kvm=not-in-this-test",
        ],
    )
    .unwrap();
    let sa_name = format!("{release}-wrenn-operator");
    let op = format!("system:serviceaccount:{ns}:{sa_name}");
    let agent = format!("system:serviceaccount:{ns}:{release}-wrenn-node-agent");

    // Sufficient: every call the operator makes.
    let allowed: &[(&str, &str, Option<&str>)] = &[
        ("list", "capsules.wrenn.dev", None),
        ("watch", "capsules.wrenn.dev", None),
        ("get", "capsulesnapshots.wrenn.dev", Some(&user_ns)),
        ("watch", "capsuletemplates.wrenn.dev", None),
        ("patch", "capsules.wrenn.dev", Some(&user_ns)),
        ("patch", "capsules.wrenn.dev:status", Some(&user_ns)),
        ("patch", "capsulesnapshots.wrenn.dev:status", Some(&user_ns)),
        ("patch", "capsuletemplates.wrenn.dev:status", Some(&user_ns)),
        ("update", "capsules.wrenn.dev:finalizers", Some(&user_ns)),
        ("delete", "capsules.wrenn.dev", Some(&user_ns)),
        ("create", "events.events.k8s.io", Some(&user_ns)),
        ("list", "pods", Some(&ns)),
        ("watch", "pods", Some(&ns)),
        // Node labels, for nodeSelector.
        ("watch", "nodes", None),
        // `from` selectors: the chosen Pods' addresses, namespaces' labels.
        ("list", "pods", Some(&user_ns)),
        ("watch", "pods", None),
        ("watch", "namespaces", None),
        // Published ports: a Service and an EndpointSlice per capsule.
        ("get", "services", Some(&user_ns)),
        ("patch", "services", Some(&user_ns)),
        ("delete", "services", Some(&user_ns)),
        ("get", "endpointslices.discovery.k8s.io", Some(&user_ns)),
        ("patch", "endpointslices.discovery.k8s.io", Some(&user_ns)),
        ("delete", "endpointslices.discovery.k8s.io", Some(&user_ns)),
        ("create", "leases.coordination.k8s.io", Some(&ns)),
        (
            "update",
            "leases.coordination.k8s.io/wrenn-operator",
            Some(&ns),
        ),
    ];
    // Minimal: what it must never do.
    let denied: &[(&str, &str, Option<&str>)] = &[
        ("list", "secrets", None),
        ("get", "secrets", Some(&ns)),
        ("create", "pods:exec", Some(&ns)),
        ("create", "pods", Some(&ns)),
        ("delete", "pods", Some(&user_ns)),
        ("get", "pods:log", Some(&user_ns)),
        ("patch", "namespaces", None),
        ("create", "capsules.wrenn.dev", Some(&user_ns)),
        ("update", "capsules.wrenn.dev", Some(&user_ns)),
        ("delete", "capsuletemplates.wrenn.dev", Some(&user_ns)),
        ("delete", "capsulesnapshots.wrenn.dev", Some(&user_ns)),
        ("update", "capsules.wrenn.dev:status", Some(&user_ns)),
        (
            "patch",
            "customresourcedefinitions.apiextensions.k8s.io",
            None,
        ),
        ("patch", "nodes", None),
        ("create", "leases.coordination.k8s.io", Some(&user_ns)),
        (
            "update",
            "leases.coordination.k8s.io/kube-controller-manager",
            Some(&ns),
        ),
        ("patch", "daemonsets.apps", Some(&ns)),
        // Services and EndpointSlices are read by name, never listed.
        ("list", "services", None),
        ("list", "endpointslices.discovery.k8s.io", None),
        ("impersonate", "serviceaccounts", None),
        ("escalate", "clusterroles.rbac.authorization.k8s.io", None),
    ];
    let mut wrong = Vec::new();
    for (verb, res, n) in allowed {
        if !can_i(cp, &op, verb, res, *n) {
            wrong.push(format!("operator cannot {verb} {res} in {n:?}"));
        }
    }
    for (verb, res, n) in denied {
        if can_i(cp, &op, verb, res, *n) {
            wrong.push(format!("operator CAN {verb} {res} in {n:?}"));
        }
    }
    // The agent needs no API access at all.
    for (verb, res) in [
        ("get", "pods"),
        ("list", "capsules.wrenn.dev"),
        ("get", "secrets"),
        ("get", "leases.coordination.k8s.io"),
        ("create", "events.events.k8s.io"),
    ] {
        if can_i(cp, &agent, verb, res, Some(&ns)) {
            wrong.push(format!("node agent CAN {verb} {res}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));

    // A capsule's lifecycle, acting as the operator.
    let admin = cp.client().await.unwrap();
    let ar = |kind: &str, plural: &str| kube::api::ApiResource {
        group: "wrenn.dev".into(),
        version: "v1alpha1".into(),
        api_version: "wrenn.dev/v1alpha1".into(),
        kind: kind.into(),
        plural: plural.into(),
    };
    let caps = ar("Capsule", "capsules");
    let mk = |v: Value| -> kube::api::DynamicObject { serde_json::from_value(v).unwrap() };
    Api::<kube::api::DynamicObject>::namespaced_with(admin.clone(), &user_ns, &ar("CapsuleTemplate", "capsuletemplates"))
        .create(&PostParams::default(), &mk(json!({"apiVersion": "wrenn.dev/v1alpha1", "kind": "CapsuleTemplate", "metadata": {"name": "base"}, "spec": {"source": {"image": {"reference": "docker.io/library/busybox:1"}}}})))
        .await
        .unwrap();
    let capsule = json!({"apiVersion": "wrenn.dev/v1alpha1", "kind": "Capsule", "metadata": {"name": "c1"}, "spec": {"source": {"templateRef": {"name": "base"}}}});
    Api::<kube::api::DynamicObject>::namespaced_with(admin.clone(), &user_ns, &caps)
        .create(&PostParams::default(), &mk(capsule.clone()))
        .await
        .unwrap();

    let opc = client_as(cp, &op).await;
    let all: Api<kube::api::DynamicObject> = Api::all_with(opc.clone(), &caps);
    let listed = all.list(&ListParams::default()).await.unwrap();
    assert!(
        listed
            .items
            .iter()
            .any(|c| c.metadata.name.as_deref() == Some("c1"))
    );
    let mine: Api<kube::api::DynamicObject> = Api::namespaced_with(opc.clone(), &user_ns, &caps);
    // The finalizer: the chart's mutating policy puts it on at creation
    // (once the API server compiled it; crds_api proves it), and the
    // operator may write it itself, as it does where that policy did not
    // run and on templates and snapshots.
    for patch in [
        json!([{"op": "add", "path": "/metadata/finalizers", "value": []}]),
        json!([
            {"op": "add", "path": "/metadata/finalizers", "value": ["wrenn.dev/node-cleanup"]},
        ]),
    ] {
        mine.patch(
            "c1",
            &PatchParams::default(),
            &Patch::<Value>::Json(serde_json::from_value(patch).unwrap()),
        )
        .await
        .unwrap();
    }
    // Status by server-side apply under the operator's field manager.
    let status = json!({"apiVersion": "wrenn.dev/v1alpha1", "kind": "Capsule", "status": {"phase": "Pending"}});
    mine.patch_status(
        "c1",
        &PatchParams::apply("wrenn-operator").force(),
        &Patch::Apply(status),
    )
    .await
    .unwrap();
    let seen = Api::<kube::api::DynamicObject>::namespaced_with(admin.clone(), &user_ns, &caps)
        .get("c1")
        .await
        .unwrap();
    assert_eq!(seen.data["status"]["phase"], "Pending");
    // Never the spec: RBAC allows the patch verb, the chart's admission policy refuses it.
    let err = refused_merge_patch(
        &mine,
        "c1",
        &PatchParams::default(),
        json!({"spec": {"operatingMode": "Paused"}}),
    )
    .await;
    assert!(
        err.to_string()
            .contains("the operator may not change a spec"),
        "{err}"
    );
    let err = refused_merge_patch(
        &mine,
        "c1",
        &PatchParams::default(),
        json!({"metadata": {"annotations": {"wrenn.dev/x": "y"}}}),
    )
    .await;
    assert!(
        err.to_string()
            .contains("may not change labels or annotations"),
        "{err}"
    );
    let err = mine.create(&PostParams::default(), &mk(json!({"apiVersion": "wrenn.dev/v1alpha1", "kind": "Capsule", "metadata": {"name": "c2"}, "spec": {"source": {"templateRef": {"name": "base"}}}}))).await.unwrap_err();
    assert_eq!(status_code(&err), 403);
    // Events about the capsule.
    let events: Api<Event> = Api::namespaced(opc.clone(), &user_ns);
    let ev: Event = serde_json::from_value(json!({
        "metadata": {"generateName": "c1-"},
        "eventTime": "2026-01-01T00:00:00.000000Z",
        "reportingController": "wrenn.dev/operator", "reportingInstance": "wrenn-operator-0",
        "action": "Schedule", "reason": "Placed", "type": "Normal", "note": "placed on node-a",
        "regarding": {"apiVersion": "wrenn.dev/v1alpha1", "kind": "Capsule", "name": "c1", "namespace": user_ns, "uid": seen.metadata.uid},
    })).unwrap();
    events.create(&PostParams::default(), &ev).await.unwrap();
    // Agents by their pods in its own namespace; every Pod's labels and
    // addresses for `from` selectors (listed, never read one by one); the
    // leader Lease in its own namespace only.
    Api::<Pod>::namespaced(opc.clone(), &ns)
        .list(&ListParams::default().labels("app.kubernetes.io/name=wrenn-node-agent"))
        .await
        .unwrap();
    Api::<Pod>::all(opc.clone())
        .list(&ListParams::default())
        .await
        .unwrap();
    let err = Api::<Pod>::namespaced(opc.clone(), &user_ns)
        .get("any")
        .await
        .unwrap_err();
    assert_eq!(status_code(&err), 403);
    let leases: Api<Lease> = Api::namespaced(opc.clone(), &ns);
    let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "wrenn-operator"}, "spec": {"holderIdentity": "op-0", "leaseDurationSeconds": 15}});
    leases
        .patch(
            "wrenn-operator",
            &PatchParams::apply("wrenn-operator"),
            &Patch::Apply(lease),
        )
        .await
        .unwrap();
    leases
        .patch(
            "wrenn-operator",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"holderIdentity": "op-1"}})),
        )
        .await
        .unwrap();
    assert_eq!(
        leases
            .get("wrenn-operator")
            .await
            .unwrap()
            .spec
            .unwrap()
            .holder_identity
            .as_deref(),
        Some("op-1")
    );
    // Expiry with onExpiry: Delete, then cleanup releases the finalizer.
    mine.delete("c1", &DeleteParams::default()).await.unwrap();
    mine.patch(
        "c1",
        &PatchParams::default(),
        &Patch::<Value>::Json(
            serde_json::from_value(json!([
                {"op": "test", "path": "/metadata/finalizers/0", "value": "wrenn.dev/node-cleanup"},
                {"op": "remove", "path": "/metadata/finalizers/0"},
            ]))
            .unwrap(),
        ),
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while mine.get_opt("c1").await.unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "capsule not gone after its finalizer was removed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Certificates: each side's certificate chains to the CA the other trusts, and only to it.
    let secret = |name: String| {
        let s = json_of(cp, &["get", "secret", "-n", &ns, &name]);
        let d = |k: &str| -> String {
            String::from_utf8(decode_b64(s["data"][k].as_str().unwrap())).unwrap()
        };
        (d("tls.crt"), d("ca.crt"))
    };
    let (agent_crt, client_ca) = secret(format!("{release}-wrenn-node-agent-tls"));
    let (op_crt, agent_ca) = secret(format!("{release}-wrenn-operator-tls"));
    let dir = tempfile::tempdir().unwrap();
    let f = |n: &str, body: &str| {
        let p = dir.path().join(n);
        std::fs::write(&p, body).unwrap();
        p.display().to_string()
    };
    let (a, o, aca, cca) = (
        f("agent.crt", &agent_crt),
        f("op.crt", &op_crt),
        f("agent-ca.crt", &agent_ca),
        f("client-ca.crt", &client_ca),
    );
    let verify = |ca: &str, crt: &str| {
        std::process::Command::new("openssl")
            .args(["verify", "-CAfile", ca, crt])
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(
        verify(&aca, &a),
        "agent cert chains to the agent CA the operator trusts"
    );
    assert!(
        verify(&cca, &o),
        "operator cert chains to the client CA the agents trust"
    );
    assert!(
        !verify(&cca, &a),
        "an agent's key must not pass as the operator"
    );
    assert!(!verify(&aca, &o));
    let text = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in", &a])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&text.stdout).contains("DNS:wrenn-node-agent"));

    helm.ok_on(cp, &["uninstall", &release, "-n", &ns]).unwrap();
}

fn decode_b64(s: &str) -> Vec<u8> {
    let out = std::process::Command::new("base64")
        .arg("-d")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(s.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(out.status.success());
    out.stdout
}

/// A CA pair (cert, key) in PEM, as an admin would supply it.
fn ca_pem(name: &str) -> (String, String) {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// (data of the agent Secret, data of the operator Secret, checksum/tls),
/// decoded, from a render.
fn tls_of(docs: &[Value]) -> (BTreeMap<String, String>, BTreeMap<String, String>, Value) {
    let secret = |name: &str| -> BTreeMap<String, String> {
        let s = docs
            .iter()
            .find(|d| d["kind"] == "Secret" && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no Secret {name}"));
        s["data"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                let text = String::from_utf8(decode_b64(v.as_str().unwrap())).unwrap();
                (k.clone(), text)
            })
            .collect()
    };
    let sum =
        find(docs, "DaemonSet")["spec"]["template"]["metadata"]["annotations"]["checksum/tls"]
            .clone();
    (
        secret("wrenn-node-agent-tls"),
        secret("wrenn-operator-tls"),
        sum,
    )
}

/// Offline renders (`helm template`, GitOps: `lookup` finds nothing) with
/// both CAs from values keep the CAs and the pods' checksum, so re-rendering
/// restarts nothing; the leaves each render issues differ, yet an agent from
/// one render and an operator from another still speak mutual TLS (the real
/// agent server and operator client). Without CAs in values, each render
/// makes new CAs: why the README sends GitOps users to values or cert-manager.
#[tokio::test]
async fn cas_from_values_keep_offline_renders_compatible() {
    let Some((_c, helm)) = helm_or_skip(case(
        Tier::Cluster,
        "chart::cas_from_values_keep_offline_renders_compatible",
    )) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (agent_ca, agent_ca_key) = ca_pem("site agent CA");
    let (client_ca, client_ca_key) = ca_pem("site client CA");
    let file = |n: &str, body: &str| {
        let p = dir.path().join(n);
        std::fs::write(&p, body).unwrap();
        p.display().to_string()
    };
    let set_files = format!(
        "tls.agentCA.cert={},tls.agentCA.key={},tls.clientCA.cert={},tls.clientCA.key={}",
        file("a.crt", &agent_ca),
        file("a.key", &agent_ca_key),
        file("c.crt", &client_ca),
        file("c.key", &client_ca_key),
    );
    let first = tls_of(&render(&helm, "wrenn-system", &["--set-file", &set_files]));
    let second = tls_of(&render(&helm, "wrenn-system", &["--set-file", &set_files]));
    for (what, (agent, op, _)) in [("first", &first), ("second", &second)] {
        assert_eq!(
            agent["ca.crt"], client_ca,
            "{what}: agents trust the given client CA"
        );
        assert_eq!(
            op["ca.crt"], agent_ca,
            "{what}: the operator trusts the given agent CA"
        );
    }
    assert_eq!(
        first.2, second.2,
        "the pods' checksum changed between renders"
    );
    assert_ne!(
        first.0["tls.crt"], second.0["tls.crt"],
        "leaves are issued per render"
    );

    // Agent from the first render, operator from the second.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let files = wrenn_node_agent::tls::TlsFiles {
        cert: file("agent.crt", &first.0["tls.crt"]).into(),
        key: file("agent.key", &first.0["tls.key"]).into(),
        client_ca: file("client-ca.crt", &first.0["ca.crt"]).into(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    use wrenn_node_agent::capsule::{Host, Supervisor, SupervisorConfig};
    let sup = Supervisor::new(
        Host::fakes(),
        SupervisorConfig::new(
            &dir.path().join("state"),
            std::path::Path::new("/k/vmlinux"),
        ),
    );
    let service = wrenn_node_agent::server::AgentService::on_host("rendered", &sup, dir.path());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        wrenn_node_agent::server::serve(listener, &files, service, async {
            let _ = stopped.await;
        })
        .await
    });
    use wrenn_operator::agent::{ClientTls, Connector, GrpcConnector};
    let tls = ClientTls::from_pem(
        second.1["tls.crt"].clone().into_bytes(),
        second.1["tls.key"].clone().into_bytes(),
        second.1["ca.crt"].clone().into_bytes(),
        "wrenn-node-agent",
    )
    .unwrap();
    let agent = GrpcConnector {
        tls,
        timeout: Duration::from_secs(5),
    }
    .connect("rendered", addr)
    .unwrap();
    assert_eq!(agent.node_info().await.unwrap().node_name, "rendered");
    let _ = stop.send(());
    server.await.unwrap().unwrap();

    // Generated CAs: every offline render has new ones.
    let a = tls_of(&render(&helm, "wrenn-system", &[]));
    let b = tls_of(&render(&helm, "wrenn-system", &[]));
    assert_ne!(a.0["ca.crt"], b.0["ca.crt"]);
    assert_ne!(a.2, b.2);
}
