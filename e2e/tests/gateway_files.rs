//! Tier 2: `capsules/files` through the real parts of [`gateway_bed`]:
//! 50 MiB streamed both ways with the guest-checked SHA-256, stat, paged
//! list, mkdir, rename, chmod, chown, remove, directories as tar with
//! escaping entries refused, the guest's own errors, and who may do it.
#![allow(clippy::unwrap_used)]

mod gateway_bed;

use std::path::Path;

use gateway_bed::{Bed, BedOptions, NS, big_data, call, json_of, sha256_hex, sub_path};
use serde_json::{Value, json};

/// A tar entry whose name is written as given, `..` and all (the tar
/// crate's builder refuses such names, an attacker's does not).
fn raw_entry(name: &str, kind: tar::EntryType, link: Option<&str>, data: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_old();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    if let Some(l) = link {
        h.as_old_mut().linkname[..l.len()].copy_from_slice(l.as_bytes());
    }
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

fn tar_of(entries: &[Vec<u8>]) -> Vec<u8> {
    let mut out: Vec<u8> = entries.concat();
    out.extend_from_slice(&[0u8; 1024]);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn files_stream_both_ways_with_checksums_and_refuse_escapes() {
    let Some((_c, b)) = Bed::for_case(
        "gateway_files::files_stream_both_ways_with_checksums_and_refuse_escapes",
        BedOptions::tagged(4),
    )
    .await
    else {
        return;
    };
    let alice = &b.alice;
    let files = |q: &str| sub_path(NS, "box", "files", q);
    use http::Method;
    // Discovery lists what is served, with its verbs.
    let req = http::Request::get("/apis/subresources.wrenn.dev/v1alpha1")
        .body(Vec::new())
        .unwrap();
    let list: Value = b.admin.request(req).await.unwrap();
    let names: Vec<&str> = list["resources"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            "capsules/exec",
            "capsules/files",
            "capsules/console",
            "capsules/attach",
            "capsules/processes",
            "capsules/portforward",
            "capsules/proxy"
        ]
    );

    // The guest agent runs on this host: its files are the host's, in a
    // directory of this test.
    let root = tempfile::Builder::new()
        .prefix("wrenn-gw-files-")
        .tempdir()
        .unwrap();
    let r = root.path().display().to_string();

    // 50 MiB up with its checksum, and down again, streamed.
    let data = big_data();
    let sum = sha256_hex(&data);
    let (code, body) = call(
        alice,
        Method::PUT,
        files(&format!("path={r}/big.bin&mode=0600&sha256={sum}")),
        data,
    )
    .await;
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let info = json_of(&body);
    assert_eq!(info["size"], 50 << 20, "{info}");
    assert_eq!(info["mode"], 0o600, "{info}");
    let req = http::Request::get(files(&format!("path={r}/big.bin")))
        .body(kube::client::Body::from(Vec::new()))
        .unwrap();
    let resp = alice.send(req).await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        resp.headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()),
        Some("52428800")
    );
    let mut body = resp.into_body();
    let mut hash = sha2::Sha256::default();
    let mut got = 0usize;
    while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
        if let Ok(d) = frame.unwrap().into_data() {
            got += d.len();
            sha2::Digest::update(&mut hash, &d);
        }
    }
    let down: String = sha2::Digest::finalize(hash)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!((got, down.as_str()), (50 << 20, sum.as_str()));
    // The guest computes the same checksum.
    let (code, body) = call(
        alice,
        Method::GET,
        files(&format!("path={r}/big.bin&op=stat&sha256=true")),
        Vec::new(),
    )
    .await;
    assert_eq!(code, 200);
    let st = json_of(&body);
    assert_eq!(st["sha256"], sum.as_str(), "{st}");
    assert_eq!(st["isDir"], false, "{st}");

    // A checksum mismatch is 422 and leaves no file, partial or temporary.
    let (code, body) = call(
        alice,
        Method::PUT,
        files(&format!("path={r}/bad.bin&sha256={}", "0".repeat(64))),
        b"not what you expected".to_vec(),
    )
    .await;
    assert_eq!(code, 422, "{}", String::from_utf8_lossy(&body));
    assert!(
        json_of(&body)["message"]
            .as_str()
            .unwrap()
            .contains("SHA-256")
    );
    let (code, body) = call(
        alice,
        Method::GET,
        files(&format!("path={r}&op=list")),
        Vec::new(),
    )
    .await;
    assert_eq!(code, 200);
    let listed: Vec<String> = json_of(&body)["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["path"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, [format!("{r}/big.bin")]);

    // mkdir, paged list, rename, chmod, chown, remove.
    let post = |q: String| call(alice, Method::POST, files(&q), Vec::new());
    let (code, body) = post(format!("path={r}/d/e&op=mkdir&recursive=true")).await;
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(json_of(&body)["isDir"], true);
    for n in ["a", "b", "c"] {
        let (code, _) = call(
            alice,
            Method::PUT,
            files(&format!("path={r}/d/{n}")),
            n.into(),
        )
        .await;
        assert_eq!(code, 200);
    }
    let (_, body) = call(
        alice,
        Method::GET,
        files(&format!("path={r}/d&op=list&limit=2")),
        Vec::new(),
    )
    .await;
    let page = json_of(&body);
    assert_eq!(page["items"].as_array().unwrap().len(), 2, "{page}");
    assert_eq!(page["items"][0]["path"], format!("{r}/d/a"));
    let next = page["continue"].as_str().unwrap().to_string();
    let (_, body) = call(
        alice,
        Method::GET,
        files(&format!("path={r}/d&op=list&limit=2&continue={next}")),
        Vec::new(),
    )
    .await;
    let page = json_of(&body);
    let rest: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["path"].as_str())
        .collect();
    assert_eq!(rest, [format!("{r}/d/c"), format!("{r}/d/e")], "{page}");
    assert!(page.get("continue").is_none(), "{page}");
    let (code, body) = post(format!("path={r}/d/c&op=rename&to={r}/d/z")).await;
    assert_eq!(code, 200);
    assert_eq!(json_of(&body)["path"], format!("{r}/d/z"));
    let (_, body) = post(format!("path={r}/d/z&op=chmod&mode=0751")).await;
    assert_eq!(json_of(&body)["mode"], 0o751);
    let (_, body) = post(format!("path={r}/d/z&op=chown&uid=1&gid=2")).await;
    let owned = json_of(&body);
    assert_eq!(
        (owned["uid"].clone(), owned["gid"].clone()),
        (json!(1), json!(2))
    );
    let (code, body) = post(format!("path={r}/d/z&op=remove")).await;
    assert_eq!((code, json_of(&body)), (200, json!({})));
    let (code, body) = call(
        alice,
        Method::GET,
        files(&format!("path={r}/d/z&op=stat")),
        Vec::new(),
    )
    .await;
    assert_eq!(code, 404, "{}", String::from_utf8_lossy(&body));
    // A directory with contents goes only with recursive=true.
    let (code, _) = post(format!("path={r}/d&op=remove")).await;
    assert_eq!(code, 409);
    let (code, _) = post(format!("path={r}/d&op=remove&recursive=true")).await;
    assert_eq!(code, 200);

    // A directory round trip as tar.
    let (code, _) = post(format!("path={r}/src/sub&op=mkdir&recursive=true")).await;
    assert_eq!(code, 200);
    for (p, d) in [
        ("src/x.txt", &b"x"[..]),
        ("src/sub/y.bin", &[0u8, 1, 2, 255][..]),
    ] {
        let (code, _) = call(
            alice,
            Method::PUT,
            files(&format!("path={r}/{p}")),
            d.to_vec(),
        )
        .await;
        assert_eq!(code, 200);
    }
    let (code, packed) = call(
        alice,
        Method::GET,
        files(&format!("path={r}/src&op=tar")),
        Vec::new(),
    )
    .await;
    assert_eq!(code, 200);
    let mut names: Vec<String> = tar::Archive::new(&packed[..])
        .entries()
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path().unwrap().display().to_string();
            p.trim_end_matches('/').to_string()
        })
        .collect();
    names.sort();
    assert_eq!(names, ["sub", "sub/y.bin", "x.txt"]);
    let (code, body) = call(
        alice,
        Method::PUT,
        files(&format!("path={r}/dst&op=tar")),
        packed,
    )
    .await;
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(json_of(&body)["entries"], 3);
    let (_, y) = call(
        alice,
        Method::GET,
        files(&format!("path={r}/dst/sub/y.bin")),
        Vec::new(),
    )
    .await;
    assert_eq!(y, [0u8, 1, 2, 255]);

    // Tar entries leaving the directory are refused, and nothing lands
    // outside it: `..`, an absolute path, a symlink then a file through it.
    let outside = format!("{r}/outside");
    let attacks = [
        tar_of(&[raw_entry(
            "../escaped.txt",
            tar::EntryType::Regular,
            None,
            b"x",
        )]),
        tar_of(&[raw_entry(
            &format!("{outside}/abs.txt"),
            tar::EntryType::Regular,
            None,
            b"x",
        )]),
        tar_of(&[
            raw_entry("link", tar::EntryType::Symlink, Some(&r), b""),
            raw_entry("link/owned.txt", tar::EntryType::Regular, None, b"x"),
        ]),
        tar_of(&[raw_entry(
            "hard",
            tar::EntryType::Link,
            Some("../big.bin"),
            b"",
        )]),
    ];
    for (i, attack) in attacks.into_iter().enumerate() {
        let (code, body) = call(
            alice,
            Method::PUT,
            files(&format!("path={r}/jail&op=tar")),
            attack,
        )
        .await;
        assert_eq!(code, 400, "attack {i}: {}", String::from_utf8_lossy(&body));
        let msg = json_of(&body)["message"].as_str().unwrap().to_string();
        assert!(msg.contains("refused"), "attack {i}: {msg}");
    }
    assert!(!root.path().join("escaped.txt").exists());
    assert!(!Path::new(&outside).exists());
    assert!(!root.path().join("owned.txt").exists());

    // The guest's own errors pass through: root may not create files in
    // sysfs (EACCES), and a missing file is 404.
    let (code, body) = call(
        alice,
        Method::PUT,
        files("path=/sys/kernel/wrenn-gateway-test"),
        b"x".to_vec(),
    )
    .await;
    assert_eq!(code, 403, "{}", String::from_utf8_lossy(&body));
    let msg = json_of(&body)["message"].as_str().unwrap().to_string();
    assert!(msg.contains("ermission denied"), "{msg}");
    let (code, body) = call(
        alice,
        Method::GET,
        files(&format!("path={r}/nope")),
        Vec::new(),
    )
    .await;
    assert_eq!(code, 404, "{}", String::from_utf8_lossy(&body));

    // bob only views; unknown and paused capsules say so.
    let (code, _) = call(
        &b.bob,
        Method::GET,
        files(&format!("path={r}/big.bin&op=stat")),
        Vec::new(),
    )
    .await;
    assert_eq!(code, 403);
    let (code, body) = call(
        alice,
        Method::GET,
        sub_path(NS, "nosuch", "files", "path=/etc/hostname"),
        Vec::new(),
    )
    .await;
    assert_eq!(code, 404);
    assert!(
        json_of(&body)["message"]
            .as_str()
            .unwrap()
            .contains("\"nosuch\"")
    );
    let (code, body) = call(
        alice,
        Method::GET,
        sub_path(NS, "nap", "files", "path=/etc/hostname"),
        Vec::new(),
    )
    .await;
    assert_eq!(code, 409);
    assert!(
        json_of(&body)["message"]
            .as_str()
            .unwrap()
            .contains("Paused")
    );
    drop(b);
}
