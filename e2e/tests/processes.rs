//! Tier 2: detached processes end to end, as a user holding only a
//! kubeconfig: the built `kubectl-wrenn` plugin (and raw requests where
//! the HTTP answer itself matters) through the real parts of
//! [`gateway_bed`]: a kube-apiserver with the front proxy, the chart's
//! RBAC, the real gateway (`capsules/processes`, `capsules/attach`), a
//! real node agent and the real guest agent, whose processes are real
//! host processes here. alice holds the edit role in `team-a`, bob view.
#![allow(clippy::unwrap_used)]

mod gateway_bed;
mod plugin;

use std::time::Duration;

use serde_json::Value;

use gateway_bed::{BedOptions, NS, eventually};
use plugin::{finish, plugin_bed, read_until, run, start};

/// The processes of `box` as the gateway lists them to the admin.
async fn listed(admin: &kube::Client) -> Vec<Value> {
    let req = http::Request::get(format!(
        "/apis/subresources.wrenn.dev/v1alpha1/namespaces/{NS}/capsules/box/processes"
    ))
    .body(Vec::new())
    .unwrap();
    let list: Value = admin.request(req).await.unwrap();
    list["items"].as_array().cloned().unwrap_or_default()
}

async fn tagged(admin: &kube::Client, tag: &str) -> Value {
    listed(admin)
        .await
        .into_iter()
        .rev()
        .find(|p| p["tag"] == tag)
        .unwrap_or_else(|| panic!("no process tagged {tag}"))
}

/// Waits until the process tagged `tag` exited; answers it.
async fn exited(admin: &kube::Client, tag: &str) -> Value {
    eventually(
        Duration::from_secs(30),
        "the process exits",
        || async move {
            let p = tagged(admin, tag).await;
            (p["state"] == "Exited")
                .then_some(p.clone())
                .ok_or(p.to_string())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn detached_processes_outlive_their_clients_replay_their_output_and_obey_rbac() {
    let Some((_c, bin, bed)) = plugin_bed(
        "processes::detached_processes_outlive_their_clients_replay_their_output_and_obey_rbac",
        BedOptions::default(),
    )
    .await
    else {
        return;
    };
    let (alice, bob, admin) = (&bed.alice_kubeconfig, &bed.bob_kubeconfig, &bed.admin);
    // The guest agent runs as a host process here: a host file is its
    // file, so the test can tell the job when to finish.
    let scratch = tempfile::tempdir().unwrap();
    let go = scratch.path().join("go");
    let script = format!(
        "echo started; while [ ! -e {} ]; do sleep 0.1; done; echo finished; exit 7",
        go.display()
    );

    // Start detached with a tag: the plugin returns at once.
    let ran = run(
        &bin,
        alice,
        &[
            "exec", "-d", "--tag", "job", "box", "--", "sh", "-c", &script,
        ],
    )
    .await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(
        ran.stdout.contains("(job) started in capsule/box"),
        "{ran:?}"
    );
    // The tag is taken while it runs: 409 with the tag.
    let ran = run(
        &bin,
        alice,
        &["exec", "-d", "--tag", "job", "box", "--", "true"],
    )
    .await;
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(
        ran.stderr.contains("\"job\"") && ran.stderr.contains("409"),
        "{ran:?}"
    );
    // ps shows it running with its tag.
    let ran = run(&bin, alice, &["ps", "box"]).await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let line = ran.stdout.lines().find(|l| l.contains("job")).unwrap();
    assert!(
        line.contains("Running") && line.contains("sh -c echo started"),
        "{ran:?}"
    );

    // An attach that goes away (the plugin killed mid-stream) leaves it running.
    let mut first = start(&bin, alice, &["attach", "box", "job"]);
    assert!(
        read_until(&mut first, "started\n")
            .await
            .starts_with("started\n")
    );
    first.kill().await.unwrap();
    let _ = first.wait().await;
    assert_eq!(tagged(admin, "job").await["state"], "Running");

    // A new attach replays the output since start, follows the rest and
    // ends with the process's exit code as its own.
    let mut second = start(&bin, alice, &["attach", "box", "job"]);
    read_until(&mut second, "started\n").await;
    std::fs::write(&go, b"").unwrap();
    let ran = finish(second, b"").await;
    assert_eq!(ran.code, Some(7), "{ran:?}");
    assert_eq!(ran.stdout, "finished\n", "{ran:?}");
    let p = exited(admin, "job").await;
    assert_eq!(p["exitCode"], 7, "{p}");
    // logs of an exited process: all it printed.
    let ran = run(&bin, alice, &["logs", "box", "job"]).await;
    assert_eq!(
        (ran.code, ran.stdout.as_str()),
        (Some(0), "started\nfinished\n"),
        "{ran:?}"
    );

    // kill by tag: the process ends by the signal, and ps says so.
    let ran = run(
        &bin,
        alice,
        &[
            "exec", "-d", "--tag", "sleeper", "box", "--", "sleep", "300",
        ],
    )
    .await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let ran = run(&bin, alice, &["kill", "box", "sleeper"]).await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let p = exited(admin, "sleeper").await;
    assert_eq!(p["signal"], 15, "{p}");
    let ran = run(&bin, alice, &["ps", "box"]).await;
    let line = ran.stdout.lines().find(|l| l.contains("sleeper")).unwrap();
    assert!(
        line.contains("Exited") && line.contains("signal 15"),
        "{ran:?}"
    );
    // attach to it: the exit code a shell would report, 128 + 15.
    let ran = run(&bin, alice, &["attach", "box", "sleeper"]).await;
    assert_eq!(ran.code, Some(143), "{ran:?}");

    // Ring overflow: 1200000 bytes through a 1 MiB ring; the newest MiB
    // is kept and every reader is told how much went.
    let ran = run(
        &bin,
        alice,
        &[
            "exec",
            "-d",
            "--tag",
            "loud",
            "box",
            "--",
            "sh",
            "-c",
            "head -c 1200000 /dev/zero | tr '\\0' x",
        ],
    )
    .await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let p = exited(admin, "loud").await;
    assert_eq!(
        (p["outputBytes"].as_u64(), p["droppedBytes"].as_u64()),
        (Some(1_200_000), Some(151_424)),
        "{p}"
    );
    let ran = run(&bin, alice, &["logs", "box", "loud"]).await;
    assert_eq!(ran.stdout.len(), 1 << 20, "{:?}", ran.stderr);
    assert!(
        ran.stderr
            .contains("151424 bytes of earlier output were dropped"),
        "{ran:?}"
    );
    let ran = run(&bin, alice, &["attach", "box", "loud"]).await;
    assert_eq!(ran.code, Some(0), "{:?}", ran.stderr);
    assert_eq!(ran.stdout.len(), 1 << 20);
    assert!(
        ran.stderr
            .contains("151424 bytes of earlier output were dropped"),
        "{ran:?}"
    );
    // The raw answer carries the count as a header too.
    let req = http::Request::get(format!(
        "/apis/subresources.wrenn.dev/v1alpha1/namespaces/{NS}/capsules/box/processes?op=logs&tag=loud"
    ))
    .body(kube::client::Body::empty())
    .unwrap();
    let resp = admin.send(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()
            .get("x-wrenn-dropped-bytes")
            .and_then(|v| v.to_str().ok()),
        Some("151424")
    );

    // An unknown tag: 404 naming the tag, not the capsule.
    let ran = run(&bin, alice, &["attach", "box", "nosuch"]).await;
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(
        ran.stderr.contains("\"nosuch\"") && ran.stderr.contains("404"),
        "{ran:?}"
    );
    let req = http::Request::get(format!(
        "/apis/subresources.wrenn.dev/v1alpha1/namespaces/{NS}/capsules/box/processes?op=logs&tag=nosuch"
    ))
    .body(Vec::new())
    .unwrap();
    match admin.request_text(req).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 404, "{s:?}");
            assert!(s.message.contains("\"nosuch\""), "{s:?}");
        }
        other => panic!("an unknown tag answered {other:?}"),
    }
    // Attach reads no stdin, and says so.
    let req = http::Request::get(format!(
        "/apis/subresources.wrenn.dev/v1alpha1/namespaces/{NS}/capsules/box/attach?tag=job&stdin=true"
    ))
    .body(Vec::new())
    .unwrap();
    match admin.connect(req).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 400, "{s:?}");
            assert!(s.message.contains("no stdin"), "{s:?}");
        }
        Err(other) => panic!("attach with stdin: {other}"),
        Ok(_) => panic!("attach with stdin was accepted"),
    }

    // RBAC: bob (view) may do none of it; the detached process is untouched.
    let ran = run(
        &bin,
        alice,
        &["exec", "-d", "--tag", "kept", "box", "--", "sleep", "300"],
    )
    .await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    for args in [
        vec!["ps", "box"],
        vec!["logs", "box", "kept"],
        vec!["attach", "box", "kept"],
        vec!["kill", "box", "kept"],
        vec!["exec", "-d", "box", "--", "true"],
    ] {
        let mut all = vec!["-n", NS];
        all.extend(&args);
        let ran = run(&bin, bob, &all).await;
        assert_eq!(ran.code, Some(1), "{args:?}: {ran:?}");
        assert!(ran.stderr.contains("forbidden"), "{args:?}: {ran:?}");
    }
    assert_eq!(tagged(admin, "kept").await["state"], "Running");
    let ran = run(&bin, alice, &["kill", "box", "kept", "-s", "KILL"]).await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert_eq!(exited(admin, "kept").await["signal"], 9);
}
