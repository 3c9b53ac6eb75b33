//! Tier 2: the gateway step of `e2e/scripts/up.sh`, without its VM. The
//! local run boots a QEMU guest (vm tier); what it adds around the gateway
//! is tested here on a control plane started as up.sh starts it (front
//! proxy), with the same code (`wrenn_e2e::local::LocalGateway`): the
//! node PKI's gateway certificates, the APIService, discovery through the
//! API server, and `kubectl wrenn` found by kubectl on PATH as up.sh links
//! it, reaching the gateway (a missing capsule answers 404 with its name).
#![allow(clippy::unwrap_used)]

use std::net::Ipv4Addr;

use wrenn_e2e::agent::Pki;
use wrenn_e2e::build::cargo_build;
use wrenn_e2e::local::{LocalGateway, ensure_namespace};
use wrenn_e2e::{ControlPlane, Options};
use wrenn_testkit::{Tier, case, need_program, need_root};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_sh_gateway_serves_kubectl_wrenn_through_the_api_server() {
    let c = case(
        Tier::Cluster,
        "local_gateway::up_sh_gateway_serves_kubectl_wrenn_through_the_api_server",
    );
    if let Err(why) = need_root()
        .and_then(|()| need_program("ip"))
        .and_then(|_| need_program("openssl"))
    {
        return c.skip(why);
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let plugin = tokio::task::spawn_blocking(|| cargo_build("kubectl-wrenn", "kubectl-wrenn"))
        .await
        .unwrap()
        .unwrap();
    let opts = Options {
        front_proxy: true,
        tokens: Vec::new(),
    };
    let cp = match tokio::task::spawn_blocking(move || ControlPlane::start_own(&opts))
        .await
        .unwrap()
    {
        Ok(cp) => cp,
        Err(e) => return c.skip(format!("control plane did not start: {e:#}")),
    };
    let client = cp.client().await.unwrap();
    ensure_namespace(&client, "wrenn-system").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::create(&dir.path().join("pki"), Ipv4Addr::new(10, 251, 249, 2)).unwrap();
    let pid = std::process::id();
    let link = format!("wgl{}", pid % 100_000);
    let ip = Ipv4Addr::new(10, 252, (pid % 200) as u8 + 20, 1);
    let gw = LocalGateway::start(
        &client,
        &cp.kubeconfig,
        &pki,
        "wrenn-system",
        (&link, ip),
        &dir.path().join("gateway.log"),
    )
    .await
    .unwrap();

    // kubectl reads the group's discovery through the API server.
    let resources = cp
        .kubectl_ok(
            &["get", "--raw", "/apis/subresources.wrenn.dev/v1alpha1"],
            None,
        )
        .unwrap();
    assert!(resources.contains("capsules/exec"), "{resources}");

    // The plugin from PATH, as up.sh links it beside kubectl.
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(&cp.kubectl, bin.join("kubectl")).unwrap();
    std::os::unix::fs::symlink(&plugin, bin.join("kubectl-wrenn")).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = tokio::process::Command::new(bin.join("kubectl"))
        .args(["wrenn", "exec", "hello", "--", "uname", "-a"])
        .env("PATH", &path)
        .env("KUBECONFIG", &cp.kubeconfig)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("capsule \"hello\" not found in namespace \"default\""),
        "the gateway's answer, not an unserved path: {stderr}\n{}",
        gw.process.log_tail()
    );
}
