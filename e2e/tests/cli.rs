//! Tier 2: the built `kubectl-wrenn` binary run as a user holding only a
//! kubeconfig, against the real parts of [`gateway_bed`]: a kube-apiserver
//! with the front proxy, the chart's RBAC, the real gateway, a real node
//! agent and a real guest agent. alice holds the edit role in `team-a`
//! (her context names the namespace), bob the view role.
//!
//! No operator runs here, so the test writes the status the operator would
//! write (its field manager, `observedGeneration`) while a verb waits, and
//! checks that the verb ends when, and only when, that status arrives.
#![allow(clippy::unwrap_used)]

mod gateway_bed;
mod plugin;

use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use wrenn_crds::capsule::OperatingMode;
use wrenn_crds::{Capsule, CapsuleSnapshot};

use gateway_bed::{BedOptions, NODE, NS, eventually, operator_status};
use plugin::{finish, plugin_bed, run, start};

async fn mode(admin: &kube::Client, name: &str) -> OperatingMode {
    let api: Api<Capsule> = Api::namespaced(admin.clone(), NS);
    api.get(name).await.unwrap().spec.operating_mode
}

/// Waits until the plugin's change of `name`'s mode reached the API.
async fn mode_becomes(admin: &kube::Client, name: &str, want: OperatingMode) {
    eventually(Duration::from_secs(30), "the mode change", || async move {
        let m = mode(admin, name).await;
        (m == want).then_some(()).ok_or(format!("{m:?}"))
    })
    .await;
}

/// Waits until the plugin created snapshot `name`, then marks it Ready as
/// the operator would; returns it.
async fn snapshot_taken(admin: &kube::Client, name: &str) -> CapsuleSnapshot {
    let api: Api<CapsuleSnapshot> = Api::namespaced(admin.clone(), NS);
    let snap = eventually(Duration::from_secs(30), "the snapshot is created", || {
        let api = api.clone();
        async move { api.get(name).await.map_err(|e| e.to_string()) }
    })
    .await;
    api.patch_status(
        name,
        &PatchParams::apply(wrenn_crds::names::FIELD_MANAGER).force(),
        &Patch::Apply(json!({
            "apiVersion": "wrenn.dev/v1alpha1", "kind": "CapsuleSnapshot",
            "status": { "phase": "Ready", "readyToUse": true, "nodeName": NODE },
        })),
    )
    .await
    .unwrap();
    snap
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_plugin_execs_and_drives_capsules_with_the_users_own_rights() {
    let Some((_c, bin, bed)) = plugin_bed(
        "cli::the_plugin_execs_and_drives_capsules_with_the_users_own_rights",
        BedOptions::default(),
    )
    .await
    else {
        return;
    };
    let (alice, bob, admin) = (&bed.alice_kubeconfig, &bed.bob_kubeconfig, &bed.admin);

    // exec: stdout and stderr apart, the remote exit code as ours; the
    // namespace comes from alice's context.
    let ran = run(
        &bin,
        alice,
        &[
            "exec",
            "box",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 3",
        ],
    )
    .await;
    assert_eq!(ran.code, Some(3), "{ran:?}");
    assert_eq!(ran.stdout, "out\n", "{ran:?}");
    assert_eq!(ran.stderr, "err\n", "{ran:?}");
    // The end of our stdin ends the command's: `cat` returns.
    let ran = finish(
        start(&bin, alice, &["exec", "-i", "box", "--", "cat"]),
        b"piped through",
    )
    .await;
    assert_eq!(
        (ran.code, ran.stdout.as_str()),
        (Some(0), "piped through"),
        "{ran:?}"
    );
    // -t without a terminal: said so, and run without one.
    let ran = run(&bin, alice, &["exec", "-t", "box", "--", "echo", "hi"]).await;
    assert_eq!(
        (ran.code, ran.stdout.as_str()),
        (Some(0), "hi\n"),
        "{ran:?}"
    );
    assert!(ran.stderr.contains("input is not a terminal"), "{ran:?}");
    // $KUBECONFIG when there is no --kubeconfig, as kubectl.
    let out = tokio::process::Command::new(&bin)
        .args(["exec", "box", "--", "true"])
        .env("KUBECONFIG", alice)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    // Clear refusals, exit code 1.
    let ran = run(&bin, alice, &["exec", "nosuch", "--", "true"]).await;
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(
        ran.stderr
            .contains("capsule \"nosuch\" not found in namespace \"team-a\""),
        "{ran:?}"
    );
    let ran = run(&bin, alice, &["exec", "nap", "--", "true"]).await;
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(ran.stderr.contains("Paused"), "{ran:?}");
    let ran = run(&bin, bob, &["-n", NS, "exec", "box", "--", "true"]).await;
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(ran.stderr.contains("forbidden"), "{ran:?}");

    // pause --no-wait: the spec changes under the plugin's field manager.
    let ran = run(&bin, alice, &["pause", "box", "--no-wait"]).await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert_eq!(ran.stdout, "capsule/box: operatingMode set to Paused\n");
    let api: Api<Capsule> = Api::namespaced(admin.clone(), NS);
    let cap = api.get("box").await.unwrap();
    assert_eq!(cap.spec.operating_mode, OperatingMode::Paused);
    let managers: Vec<_> = cap
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(
        managers.iter().any(|m| m == "kubectl-wrenn"),
        "{managers:?}"
    );

    // bob may look but not touch: the API server's sentence, exit 1, no change.
    let ran = run(&bin, bob, &["-n", NS, "resume", "box"]).await;
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(ran.stderr.contains("User \"bob\" cannot patch"), "{ran:?}");
    assert_eq!(mode(admin, "box").await, OperatingMode::Paused);
    let ran = run(&bin, bob, &["-n", NS, "status", "box"]).await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(ran.stdout.contains("Mode:       Paused"), "{ran:?}");

    // resume waits for the operator: the status it finds (Running, for an
    // older generation) does not end the wait; Running for the new one does.
    let child = start(&bin, alice, &["resume", "box"]);
    mode_becomes(admin, "box", OperatingMode::Running).await;
    operator_status(
        admin,
        "box",
        json!({ "phase": "Running", "nodeName": NODE }),
    )
    .await;
    let ran = finish(child, b"").await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert_eq!(ran.stdout, "capsule/box: phase=Running\n", "{ran:?}");

    // Without the operator, suspend gives up at its timeout and says where
    // the capsule stands.
    let ran = run(&bin, alice, &["suspend", "box", "--timeout=2s"]).await;
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(
        ran.stderr.contains("is not phase=Suspended after 2s"),
        "{ran:?}"
    );
    assert!(ran.stderr.contains("phase Running"), "{ran:?}");
    assert_eq!(mode(admin, "box").await, OperatingMode::Suspended);
    // wait ends when the phase is written.
    let child = start(
        &bin,
        alice,
        &["wait", "box", "--for=phase=Suspended", "--timeout=60s"],
    );
    operator_status(
        admin,
        "box",
        json!({ "phase": "Suspended", "nodeName": NODE }),
    )
    .await;
    let ran = finish(child, b"").await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let ran = run(&bin, alice, &["wait", "nosuch"]).await;
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(
        ran.stderr
            .contains("capsule \"nosuch\" not found in namespace \"team-a\""),
        "{ran:?}"
    );
    let ran = run(&bin, alice, &["pause", "nosuch"]).await;
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(
        ran.stderr
            .contains("capsule \"nosuch\" not found in namespace \"team-a\""),
        "{ran:?}"
    );

    // snapshot: a CapsuleSnapshot of box, awaited until Ready.
    let child = start(&bin, alice, &["snapshot", "box", "snap1"]);
    let snap = snapshot_taken(admin, "snap1").await;
    assert_eq!(
        (snap.spec.capsule_name.as_str(), snap.spec.memory),
        ("box", true)
    );
    let ran = finish(child, b"").await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert_eq!(
        ran.stdout, "capsulesnapshot/snap1 of capsule/box: Ready\n",
        "{ran:?}"
    );
    let ran = run(&bin, alice, &["snapshot", "nosuch", "snap2"]).await;
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(
        ran.stderr.contains("capsule \"nosuch\" not found"),
        "{ran:?}"
    );

    // fork: a snapshot, then a capsule from it, awaited until Running.
    let child = start(&bin, alice, &["fork", "box", "copy"]);
    let snap = snapshot_taken(admin, "copy").await;
    assert_eq!(snap.spec.capsule_name, "box");
    let copy = eventually(Duration::from_secs(30), "the copy is created", || {
        let api = api.clone();
        async move { api.get("copy").await.map_err(|e| e.to_string()) }
    })
    .await;
    let from = copy
        .spec
        .source
        .snapshot_ref
        .as_ref()
        .map(|r| r.name.as_str());
    assert_eq!(from, Some("copy"), "{:?}", copy.spec);
    operator_status(
        admin,
        "copy",
        json!({ "phase": "Running", "nodeName": NODE }),
    )
    .await;
    let ran = finish(child, b"").await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    // A second fork onto a taken name takes no snapshot.
    let ran = run(&bin, alice, &["fork", "box", "copy"]).await;
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(ran.stderr.contains("already exists"), "{ran:?}");
    drop(bed);
}
