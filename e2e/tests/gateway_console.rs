//! Tier 2: `capsules/console` through the real parts of [`gateway_bed`]:
//! the serial console's tail, following new output, `kubectl get --raw`,
//! and who may read it.
#![allow(clippy::unwrap_used)]

mod gateway_bed;

use std::time::Duration;

use gateway_bed::{Bed, BedOptions, NS, call, sub_path};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn console_shows_the_tail_and_follows_new_output() {
    let Some((_c, b)) = Bed::for_case(
        "gateway_console::console_shows_the_tail_and_follows_new_output",
        BedOptions::tagged(5),
    )
    .await
    else {
        return;
    };
    use http::Method;
    // Written where the VMM writes the serial console (the VMM is fake).
    let run = b.supervisor().layout().run_dir(&b.uid);
    std::fs::create_dir_all(&run).unwrap();
    let log = run.join("serial.log");
    std::fs::write(&log, "boot 1\nboot 2\nboot 3\nlogin:\n").unwrap();
    let console = |q: &str| sub_path(NS, "box", "console", q);
    let (code, body) = call(&b.alice, Method::GET, console("tailLines=2"), Vec::new()).await;
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(String::from_utf8_lossy(&body), "boot 3\nlogin:\n");
    // kubectl reads it as it reads any path of the API.
    let raw =
        b.cp.kubectl_ok(&["get", "--raw", &console("tailLines=1")], None)
            .unwrap();
    assert_eq!(raw.trim_end(), "login:");
    let (_, body) = call(&b.alice, Method::GET, console(""), Vec::new()).await;
    assert_eq!(
        String::from_utf8_lossy(&body),
        "boot 1\nboot 2\nboot 3\nlogin:\n"
    );

    // A follower gets the tail, then what the guest prints next.
    let req = http::Request::get(console("tailLines=1&follow=true"))
        .body(kube::client::Body::from(Vec::new()))
        .unwrap();
    let resp = b.alice.send(req).await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut body = resp.into_body();
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut appended = false;
    while !seen.contains("late line") {
        let frame = tokio::time::timeout_at(deadline, http_body_util::BodyExt::frame(&mut body))
            .await
            .unwrap_or_else(|_| panic!("no new console output in 30 s: {seen:?}"))
            .unwrap()
            .unwrap();
        if let Ok(d) = frame.into_data() {
            seen.push_str(&String::from_utf8_lossy(&d));
        }
        if !appended && seen.contains("login:") {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
            f.write_all(b"late line\n").unwrap();
            appended = true;
        }
    }
    assert_eq!(seen, "login:\nlate line\n");
    drop(body);

    let (code, _) = call(&b.bob, Method::GET, console(""), Vec::new()).await;
    assert_eq!(code, 403);
    let (code, body) = call(
        &b.alice,
        Method::GET,
        sub_path(NS, "nap", "console", ""),
        Vec::new(),
    )
    .await;
    assert_eq!(code, 409, "{}", String::from_utf8_lossy(&body));
    drop(b);
}
