//! Tier 2: who may exec into a capsule through the gateway. The API
//! server asks RBAC (the chart's roles aggregated into `edit` and `view`)
//! per user and namespace, anonymous gets nothing, and straight to the
//! gateway only the API server's front proxy may claim a user, after
//! which the gateway asks the API server itself. The parts are the real
//! ones of [`gateway_bed`].
#![allow(clippy::unwrap_used)]

mod gateway_bed;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use gateway_bed::{
    Bed, BedOptions, GATEWAY, NS, NS_B, RELEASE_NS, api_code, eventually, exec, exec_path,
};

/// A raw HTTPS GET straight to the gateway, presenting `client` (cert,
/// key) or no certificate, with `headers`; returns the status code, `None`
/// when the TLS handshake refused the client.
async fn direct_get(
    addr: SocketAddr,
    ca_pem: &str,
    client: Option<(&Path, &Path)>,
    path: &str,
    headers: &[(&str, &str)],
) -> Option<u16> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(cert)
                    .unwrap()
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_file(key).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from(format!("{GATEWAY}.{RELEASE_NS}.svc")).unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .ok()?;
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    tls.write_all(req.as_bytes()).await.ok()?;
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    let head = String::from_utf8_lossy(&out);
    head.split_whitespace().nth(1).and_then(|c| c.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exec_through_the_api_server_is_authorized_per_user_and_namespace() {
    let Some((_c, b)) = Bed::for_case(
        "gateway_auth::exec_through_the_api_server_is_authorized_per_user_and_namespace",
        BedOptions::tagged(1),
    )
    .await
    else {
        return;
    };
    let (cp, alice_c, bob_c) = (&b.cp, &b.alice, &b.bob);
    let (ns_a, ns_b) = (NS, NS_B);
    let (alice_kc, bob_kc) = (&b.alice_kubeconfig, &b.bob_kubeconfig);
    let (gw_addr, serving, dir, pki_dir) = (b.gw_addr, &b.serving_ca, b.certs(), b.pki_dir());
    // The aggregated roles reached edit and view.
    let can_i_on = |resource: &str, kubeconfig: &Path, ns: &str| {
        let out = std::process::Command::new(&cp.kubectl)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args([
                "auth",
                "can-i",
                "create",
                resource,
                "--subresource=exec",
                "-n",
                ns,
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    // kubectl maps `capsules` to wrenn.dev (a group of subresources only has
    // no top-level resource to map to); the roles grant both groups alike.
    let can_i = |kubeconfig: &Path, ns: &str| can_i_on("capsules", kubeconfig, ns);
    eventually(Duration::from_secs(60), "alice may exec in A", || {
        let a = can_i(alice_kc, ns_a);
        async move { (a == "yes").then_some(()).ok_or(a) }
    })
    .await;
    assert_eq!(can_i(bob_kc, ns_a), "no");
    assert_eq!(can_i(alice_kc, ns_b), "no");

    // bob may only view A; alice has nothing in B.
    let (code, msg) = api_code(exec(bob_c, ns_a, "box", &["true"], None).await);
    assert_eq!(code, 403, "{msg}");
    let (code, msg) = api_code(exec(alice_c, ns_b, "box", &["true"], None).await);
    assert_eq!(code, 403, "{msg}");

    // Without credentials the API server refuses (anonymous has no rights).
    let anon_kc = cp.kubeconfig_for("anonymous", "").unwrap();
    let anon = wrenn_e2e::client_from(&anon_kc).await.unwrap();
    let (code, msg) = api_code(exec(&anon, ns_a, "box", &["true"], None).await);
    assert!(code == 401 || code == 403, "{code} {msg}");

    // Straight to the gateway, without the front proxy's certificate, a
    // claimed user is refused; with it, the gateway asks the API server
    // itself and refuses bob in A.
    let path = exec_path(ns_a, "box", &["true"], false);
    let spoof = [
        ("X-Remote-User", "alice"),
        ("X-Remote-Group", "system:masters"),
    ];
    assert_eq!(
        direct_get(gw_addr, serving, None, &path, &spoof).await,
        Some(401)
    );
    let other_ca = (dir.join("gateway.crt"), dir.join("gateway.key"));
    assert_eq!(
        direct_get(
            gw_addr,
            serving,
            Some((&other_ca.0, &other_ca.1)),
            &path,
            &spoof
        )
        .await,
        None,
        "a client certificate from another CA passed as the front proxy"
    );
    let proxy = (
        pki_dir.join("front-proxy-client.crt"),
        pki_dir.join("front-proxy-client.key"),
    );
    let as_bob = [("X-Remote-User", "bob"), ("X-Remote-Group", "devs")];
    assert_eq!(
        direct_get(gw_addr, serving, Some((&proxy.0, &proxy.1)), &path, &as_bob).await,
        Some(403)
    );

    drop(b);
}
