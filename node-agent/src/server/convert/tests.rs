//! Tests of the proto ↔ domain conversions: what the edge refuses and
//! what round-trips.

use super::*;

/// An image directory with a root disk, a kernel, an OCI layout
/// directory and an archive, as a node admin would fill it.
struct Dirs {
    _root: tempfile::TempDir,
    dir: PathBuf,
    dirs: ImageDirs,
}

fn dirs() -> Dirs {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("images");
    std::fs::create_dir_all(dir.join("kernels")).unwrap();
    std::fs::create_dir_all(dir.join("base")).unwrap();
    std::fs::write(dir.join("base.ext4"), b"ext4").unwrap();
    std::fs::write(dir.join("kernels/vmlinux"), b"k").unwrap();
    std::fs::write(dir.join("a.tar"), b"tar").unwrap();
    let dirs = ImageDirs::new(std::slice::from_ref(&dir), &root.path().join("state")).unwrap();
    let dir = dir.canonicalize().unwrap();
    Dirs {
        _root: root,
        dir,
        dirs,
    }
}

fn prepare() -> pb::PrepareTemplateRequest {
    pb::PrepareTemplateRequest {
        disk: Some(pb::TemplateDisk {
            key: "ns/web@sha256:1".into(),
            disk: Some(pb::template_disk::Disk::OciReference(
                "registry.example/web:1".into(),
            )),
            digest: String::new(),
            disk_bytes: 0,
        }),
        warm: Some(pb::WarmBuild {
            snapshot_id: "warm-ns-web-1".into(),
            resources: Some(pb::Resources {
                vcpus: 1,
                memory_bytes: 256 << 20,
                disk_bytes: 1 << 30,
            }),
            env: Default::default(),
            start_command: vec!["/srv/app".into()],
            readiness: Some(pb::warm_build::Readiness::TcpPort(8080)),
            timeout_seconds: 0,
        }),
        kernel_path: String::new(),
        kernel_cmdline: String::new(),
        retry: false,
        registry_credentials: None,
    }
}

#[test]
fn credentials_reach_a_registry_pull_and_are_refused_elsewhere() {
    let d = dirs();
    let mut r = prepare();
    r.registry_credentials = Some(pb::RegistryCredentials {
        username: "robot".into(),
        password: "pw".into(),
    });
    let ok = from_prepare(r.clone(), &d.dirs).unwrap();
    assert_eq!(
        ok.credentials,
        Some(crate::images::Credentials::new("robot", "pw"))
    );
    assert!(!format!("{ok:?}").contains("\"pw\""), "{ok:?}");
    // A local image or a root disk pulls nothing: credentials would be a
    // field that does nothing.
    for disk in [
        pb::template_disk::Disk::RootfsPath("base.ext4".into()),
        pb::template_disk::Disk::OciReference("docker-archive:a.tar".into()),
    ] {
        r.disk.as_mut().unwrap().disk = Some(disk.clone());
        let e = from_prepare(r.clone(), &d.dirs).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("registry_credentials"), "{e:?}");
        r.registry_credentials = None;
        assert!(from_prepare(r.clone(), &d.dirs).is_ok(), "{disk:?}");
        r.registry_credentials = Some(pb::RegistryCredentials::default());
    }
}

#[test]
fn prepare_requests_take_defaults_and_refuse_what_cannot_build() {
    let d = dirs();
    let ok = from_prepare(prepare(), &d.dirs).unwrap();
    // The image is built at the warm shape's disk size, the timeout
    // defaults to 300 s.
    assert_eq!(ok.disk_bytes, 1 << 30);
    let warm = ok.warm.unwrap();
    assert_eq!(warm.timeout, DEFAULT_WARM_TIMEOUT);
    assert_eq!(warm.readiness, Readiness::TcpPort(8080));
    let refused = |edit: fn(&mut pb::PrepareTemplateRequest), needle: &str| {
        let mut r = prepare();
        edit(&mut r);
        let e = from_prepare(r, &d.dirs).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(needle), "{needle}: {}", e.message());
    };
    refused(|r| r.disk = None, "disk is required");
    refused(
        |r| r.disk.as_mut().unwrap().key.clear(),
        "disk.key is required",
    );
    refused(
        |r| {
            r.disk.as_mut().unwrap().disk = Some(pb::template_disk::Disk::RootfsUrl(
                "https://x/r.ext4".into(),
            ))
        },
        "does not download",
    );
    refused(
        |r| r.warm.as_mut().unwrap().start_command.clear(),
        "start_command",
    );
    refused(
        |r| r.warm.as_mut().unwrap().snapshot_id = "../etc".into(),
        "snapshot id",
    );
    refused(|r| r.warm.as_mut().unwrap().readiness = None, "readiness");
    refused(
        |r| r.warm.as_mut().unwrap().readiness = Some(pb::warm_build::Readiness::TcpPort(0)),
        "tcp_port",
    );
    refused(
        |r| {
            r.warm.as_mut().unwrap().readiness =
                Some(pb::warm_build::Readiness::Exec(pb::ExecProbe {
                    argv: vec![],
                }))
        },
        "exec.argv",
    );
    refused(
        |r| r.warm.as_mut().unwrap().resources = None,
        "warm.resources",
    );
    refused(
        |r| {
            r.warm = None;
        },
        "disk_bytes",
    );
    refused(|r| r.kernel_path = "/boot/vmlinuz".into(), "kernel_path");
    refused(|r| r.kernel_path = "../vmlinux".into(), "kernel_path");
    refused(
        |r| r.kernel_cmdline = "rdinit=/bin/sh".into(),
        "\"rdinit=/bin/sh\"",
    );
    refused(
        |r| {
            r.disk.as_mut().unwrap().disk =
                Some(pb::template_disk::Disk::RootfsPath("/dev/vda".into()))
        },
        "disk.rootfs_path",
    );
    let mut with_kernel = prepare();
    with_kernel.kernel_path = "kernels/vmlinux".into();
    with_kernel.kernel_cmdline = "quiet console=hvc0".into();
    let ok = from_prepare(with_kernel, &d.dirs).unwrap();
    assert_eq!(ok.kernel, Some(d.dir.join("kernels/vmlinux")));
    assert_eq!(ok.cmdline, "quiet console=hvc0");
    // A root disk alone needs no warm part.
    let mut disk_only = prepare();
    disk_only.warm = None;
    disk_only.disk.as_mut().unwrap().disk_bytes = 1 << 30;
    assert!(from_prepare(disk_only, &d.dirs).unwrap().warm.is_none());
}

fn request() -> pb::CreateCapsuleRequest {
    pb::CreateCapsuleRequest {
        uid: "3f2a9c1e-77b0".into(),
        spec: Some(pb::CapsuleSpec {
            namespace: "ns".into(),
            name: "web".into(),
            source: Some(pb::BootSource {
                source: Some(pb::boot_source::Source::Template(pb::TemplateDisk {
                    key: "ns/base@sha256:1".into(),
                    disk: Some(pb::template_disk::Disk::RootfsPath("base.ext4".into())),
                    digest: "sha256:1".into(),
                    disk_bytes: 1 << 30,
                })),
            }),
            resources: Some(pb::Resources {
                vcpus: 2,
                memory_bytes: 512 << 20,
                disk_bytes: 1 << 30,
            }),
            kernel_path: String::new(),
            kernel_cmdline: "quiet".into(),
            env: [("A".to_string(), "1".to_string())].into(),
            network: Some(pb::NetworkPolicy {
                egress: pb::Egress::Deny as i32,
                allow_cidrs: vec!["198.51.100.0/24".into()],
                ports: vec![],
                ..Default::default()
            }),
        }),
        initial_state: 0,
    }
}

#[test]
fn the_guest_token_never_reaches_the_wire() {
    let (uid, spec, _) = from_create(request(), &dirs().dirs).unwrap();
    let mut rec = crate::capsule::Record::new(&uid, &spec);
    let token = crate::guest::GuestToken::generate().unwrap();
    rec.guest_token = Some(token.clone());
    let view = rec.view(&BackendInfo {
        kind: crate::vmm::BackendKind::CloudHypervisor,
        version: "v1".into(),
        accelerated: true,
    });
    assert_eq!(view.guest_token.as_ref(), Some(&token));
    let event = Event {
        sequence: 1,
        kind: EventKind::StateChanged,
        capsule: Some(view.clone()),
        unix_nanos: 0,
        name_refused: None,
    };
    for shown in [
        format!("{:?}", to_capsule(&view)),
        format!("{:?}", to_event(&event)),
        format!("{view:?}"),
        format!("{rec:?}"),
    ] {
        assert!(!shown.contains(token.expose()), "token shown: {shown}");
    }
}

#[test]
fn spec_converts_with_node_files_resolved() {
    let d = dirs();
    let mut req = request();
    req.spec.as_mut().unwrap().kernel_path = "kernels/vmlinux".into();
    let (uid, spec, initial) = from_create(req, &d.dirs).unwrap();
    assert_eq!((uid.as_str(), initial), ("3f2a9c1e-77b0", State::Running));
    assert_eq!(
        spec.egress,
        Egress::AllowList(vec!["198.51.100.0/24".parse().unwrap()])
    );
    assert_eq!(spec.kernel, Some(d.dir.join("kernels/vmlinux")));
    let BootSource::Template(t) = &spec.source else {
        panic!("{spec:?}")
    };
    assert_eq!(t.rootfs, d.dir.join("base.ext4"));
    // Shown back with the resolved paths; everything else as sent.
    let shown = to_spec(&spec);
    assert_eq!(
        shown.kernel_path,
        d.dir.join("kernels/vmlinux").display().to_string()
    );
    assert_eq!(shown.kernel_cmdline, "quiet");
    assert_eq!(shown.env, request().spec.unwrap().env);
    let net = shown.network.unwrap();
    assert_eq!(
        (net.egress, net.allow_cidrs),
        (pb::Egress::Deny as i32, vec!["198.51.100.0/24".to_string()])
    );
}

#[test]
fn deny_with_cidrs_allows_exactly_those_and_allow_with_cidrs_is_refused() {
    let net = |egress: pb::Egress, cidrs: &[&str]| pb::NetworkPolicy {
        egress: egress as i32,
        allow_cidrs: cidrs.iter().map(|c| c.to_string()).collect(),
        ports: vec![],
        ..Default::default()
    };
    assert_eq!(
        from_network(net(pb::Egress::Deny, &["203.0.113.0/24"])).unwrap(),
        Egress::AllowList(vec!["203.0.113.0/24".parse().unwrap()])
    );
    assert_eq!(
        from_network(net(pb::Egress::Deny, &[])).unwrap(),
        Egress::Deny
    );
    assert_eq!(
        from_network(net(pb::Egress::Unspecified, &[])).unwrap(),
        Egress::Allow
    );
    let e = from_network(net(pb::Egress::Allow, &["203.0.113.0/24"])).unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("only with egress DENY"), "{e:?}");
    let e = from_network(net(pb::Egress::Deny, &["2001:db8::/32"])).unwrap_err();
    assert!(e.message().contains("IPv4 only"), "{e:?}");
    for (listed, inside) in [
        ("10.20.0.0/16", "10.0.0.0/8"),
        ("192.168.1.0/24", "192.168.0.0/16"),
        ("169.254.169.254/32", "169.254.0.0/16"),
        ("168.63.129.16/32", "168.63.129.16/32"),
    ] {
        let e = from_network(net(pb::Egress::Deny, &["203.0.113.0/24", listed])).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(
            e.message().contains(&format!("lies inside {inside}")),
            "{e:?}"
        );
    }
    // Wider than a blocked range is fine: the rest of it is reachable.
    assert_eq!(
        from_network(net(pb::Egress::Deny, &["0.0.0.0/0"])).unwrap(),
        Egress::AllowList(vec!["0.0.0.0/0".parse().unwrap()])
    );
}

type Mutation = Box<dyn Fn(&mut pb::CreateCapsuleRequest)>;

fn set_disk(r: &mut pb::CreateCapsuleRequest, disk: pb::template_disk::Disk) {
    let source = r.spec.as_mut().unwrap().source.as_mut().unwrap();
    if let Some(pb::boot_source::Source::Template(t)) = source.source.as_mut() {
        t.disk = Some(disk);
    }
}

#[test]
fn image_and_snapshot_sources_round_trip() {
    let d = dirs();
    for disk in [
        pb::template_disk::Disk::OciReference("oci:base:v1".into()),
        pb::template_disk::Disk::OciReference("docker-archive:a.tar".into()),
        pb::template_disk::Disk::OciReference("ghcr.io/wrenn/base:1".into()),
    ] {
        let mut r = request();
        set_disk(&mut r, disk);
        let (_, spec, _) = from_create(r, &d.dirs).unwrap();
        assert!(matches!(spec.source, BootSource::Image(_)), "{spec:?}");
        assert_eq!(from_spec(to_spec(&spec), &d.dirs).unwrap(), spec);
    }
    let mut r = request();
    r.spec.as_mut().unwrap().source = Some(pb::BootSource {
        source: Some(pb::boot_source::Source::Snapshot(pb::SnapshotRef {
            id: "snap-1".into(),
        })),
    });
    let (_, spec, _) = from_create(r, &d.dirs).unwrap();
    assert_eq!(
        spec.source,
        BootSource::Snapshot {
            id: "snap-1".into()
        }
    );
    assert_eq!(from_spec(to_spec(&spec), &d.dirs).unwrap(), spec);
    assert_eq!(
        to_status(&Error::SnapshotNotFound { id: "s".into() }).code(),
        tonic::Code::NotFound
    );
    let image = |source| Error::Image {
        uid: "c1".into(),
        reference: "oci:img".into(),
        source: Box::new(source),
    };
    let hostile = to_status(&image(crate::images::Error::UnsafeEntry {
        layer: "sha256:1".into(),
        entry: "dev/sda".into(),
        why: "device node".into(),
    }));
    assert_eq!(hostile.code(), tonic::Code::FailedPrecondition);
    assert_eq!(
        hostile.message(),
        "build template disk of capsule c1 from oci:img: \
         refuse entry \"dev/sda\" of layer sha256:1: device node"
    );
    let busy = to_status(&image(crate::images::Error::Lock {
        path: "/l".into(),
        source: std::io::ErrorKind::WouldBlock.into(),
    }));
    assert_eq!(busy.code(), tonic::Code::Unavailable);
}

#[test]
fn bad_requests_name_the_field() {
    let cases: Vec<(Mutation, &str)> = vec![
        (Box::new(|r| r.uid = "Bad/Uid".into()), "uid"),
        (Box::new(|r| r.spec = None), "spec is required"),
        (
            Box::new(|r| set_disk(r, pb::template_disk::Disk::RootfsPath("/dev/vda".into()))),
            "absolute paths are not allowed",
        ),
        (
            Box::new(|r| r.spec.as_mut().unwrap().resources.as_mut().unwrap().vcpus = 0),
            "vcpus",
        ),
        (
            Box::new(|r| {
                r.spec
                    .as_mut()
                    .unwrap()
                    .network
                    .as_mut()
                    .unwrap()
                    .allow_cidrs = vec!["300.1.1.1/8".into()]
            }),
            "allow_cidrs",
        ),
        (
            Box::new(|r| r.spec.as_mut().unwrap().kernel_path = "/boot/vmlinux".into()),
            "spec.kernel_path",
        ),
        (
            Box::new(|r| r.spec.as_mut().unwrap().kernel_cmdline = "quiet -- x".into()),
            "\"--\"",
        ),
        (
            Box::new(|r| set_disk(r, pb::template_disk::Disk::RootfsPath("../x".into()))),
            "rootfs_path",
        ),
        (
            Box::new(|r| set_disk(r, pb::template_disk::Disk::OciReference("/srv/img".into()))),
            "oci_reference",
        ),
        (Box::new(|r| r.initial_state = 9), "initial_state"),
        (
            Box::new(|r| {
                set_disk(
                    r,
                    pb::template_disk::Disk::OciReference("oci:/srv/img".into()),
                )
            }),
            "oci_reference",
        ),
        (
            Box::new(|r| set_disk(r, pb::template_disk::Disk::RootfsUrl("https://x/r".into()))),
            "use rootfs_path",
        ),
        (
            Box::new(|r| {
                set_disk(r, pb::template_disk::Disk::OciReference("alpine:3".into()));
                r.spec
                    .as_mut()
                    .unwrap()
                    .resources
                    .as_mut()
                    .unwrap()
                    .disk_bytes = 0;
            }),
            "disk_bytes",
        ),
    ];
    let d = dirs();
    for (mutate, field) in cases {
        let mut r = request();
        mutate(&mut r);
        let st = from_create(r, &d.dirs).unwrap_err();
        assert_eq!(st.code(), tonic::Code::InvalidArgument);
        assert!(st.message().contains(field), "{field}: {}", st.message());
    }
}

#[test]
fn errors_map_to_codes_users_can_act_on() {
    let paused = Error::WrongState {
        uid: "c1".into(),
        state: State::Paused,
        hint: "resume it first",
    };
    let st = to_status(&paused);
    assert_eq!(st.code(), tonic::Code::FailedPrecondition);
    assert_eq!(st.message(), "capsule c1 is paused; resume it first");
    assert_eq!(
        to_status(&Error::NotFound { uid: "x".into() }).code(),
        tonic::Code::NotFound
    );
    assert_eq!(
        to_status(&Error::AlreadyExists {
            uid: "x".into(),
            field: "env"
        })
        .code(),
        tonic::Code::AlreadyExists
    );
}

#[test]
fn names_are_checked_at_the_edge_and_echoed_back_as_sent() {
    let net = |egress: pb::Egress, hosts: &[&str], dns: Option<pb::DnsConfig>| pb::NetworkPolicy {
        egress: egress as i32,
        allow_hosts: hosts.iter().map(|h| h.to_string()).collect(),
        dns,
        ..Default::default()
    };
    let dns = pb::DnsConfig {
        nameservers: vec!["1.1.1.1".into()],
        searches: vec!["corp.example".into()],
        options: vec!["ndots:2".into()],
        block_under_deny: false,
    };
    let n = from_names(&net(
        pb::Egress::Deny,
        &["pypi.org", "*.github.com"],
        Some(dns.clone()),
    ))
    .unwrap();
    assert!(n.allow_hosts.allows("api.github.com"));
    assert_eq!(n.dns.nameservers, [std::net::Ipv4Addr::new(1, 1, 1, 1)]);
    // What the agent reports is what the operator sent, so the operator
    // sees no difference and sends no update.
    assert_eq!(to_dns(&n.dns), Some(dns));
    assert_eq!(to_dns(&DnsConfig::default()), None);
    let hosts: Vec<String> = n.allow_hosts.into();
    assert_eq!(hosts, ["pypi.org", "*.github.com"]);

    for (bad, want) in [
        (
            net(pb::Egress::Allow, &["pypi.org"], None),
            "only with egress DENY",
        ),
        (net(pb::Egress::Deny, &["*"], None), "allow_hosts"),
        (
            net(
                pb::Egress::Deny,
                &["pypi.org"],
                Some(pb::DnsConfig {
                    block_under_deny: true,
                    ..Default::default()
                }),
            ),
            "needs name resolution",
        ),
        (
            net(
                pb::Egress::Allow,
                &[],
                Some(pb::DnsConfig {
                    nameservers: vec!["10.96.0.10".into()],
                    ..Default::default()
                }),
            ),
            "10.0.0.0/8",
        ),
    ] {
        let e = from_names(&bad).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains(want), "{e:?} lacks {want}");
    }
}

#[test]
fn only_tcp_ports_with_sources_are_published_and_bad_ones_are_refused() {
    let port = |port: u32, protocol: &str, from: &[&str]| pb::Port {
        port,
        protocol: protocol.into(),
        from_cidrs: from.iter().map(|s| s.to_string()).collect(),
    };
    let rules = from_ports(&[
        port(9000, "TCP", &["10.244.0.0/16", "10.244.0.0/16"]),
        port(8888, "TCP", &["10.244.0.0/16"]),
        // No sources: the data plane's alone.
        port(22, "TCP", &[]),
        port(53, "UDP", &[]),
    ])
    .unwrap();
    let shown: Vec<(u16, usize)> = rules.iter().map(|r| (r.port, r.from.len())).collect();
    assert_eq!(shown, vec![(8888, 1), (9000, 1)]);

    for bad in [
        vec![port(53, "UDP", &["10.0.0.0/8"])],
        vec![port(0, "TCP", &["10.0.0.0/8"])],
        vec![port(70000, "TCP", &["10.0.0.0/8"])],
        vec![port(80, "TCP", &["fd00::/8"])],
        vec![port(80, "TCP", &["10.0.0.1/8"])],
        vec![
            port(80, "TCP", &["10.0.0.0/8"]),
            port(80, "TCP", &["10.1.0.0/16"]),
        ],
    ] {
        let err = from_ports(&bad).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad:?}");
    }

    // Pod selectors resolve to one /32 per Pod: up to 1024 per port.
    let pods = |n: u32| -> Vec<String> {
        (0..n)
            .map(|i| format!("{}/32", std::net::Ipv4Addr::from(0x0af4_0000 + i)))
            .collect()
    };
    let many = |n| pb::Port {
        port: 80,
        protocol: "TCP".into(),
        from_cidrs: pods(n),
    };
    assert_eq!(from_ports(&[many(1024)]).unwrap()[0].from.len(), 1024);
    let err = from_ports(&[many(1025)]).unwrap_err();
    assert!(err.message().contains("at most 1024"), "{err:?}");
}

#[test]
fn a_refused_name_reaches_the_wire_as_its_reason_text() {
    let (uid, spec, _) = from_create(request(), &dirs().dirs).unwrap();
    let rec = crate::capsule::Record::new(&uid, &spec);
    let view = rec.view(&BackendInfo {
        kind: crate::vmm::BackendKind::CloudHypervisor,
        version: "v1".into(),
        accelerated: true,
    });
    let event = Event {
        sequence: 7,
        kind: EventKind::NameRefused,
        capsule: Some(view),
        unix_nanos: 1,
        name_refused: Some(crate::network::dns::NameRefused {
            capsule: crate::network::CapsuleId::new(&uid).unwrap(),
            name: "evil.example".into(),
            reason: wrenn_crds::reason::Reason::NameNotAllowed,
            queries: 3,
        }),
    };
    let pb = to_event(&event);
    assert_eq!(pb.kind, pb::EventKind::NameRefused as i32);
    assert_eq!(
        pb.name_refused,
        Some(pb::NameRefused {
            name: "evil.example".into(),
            reason: "NameNotAllowed".into(),
            queries: 3,
        })
    );
    assert_eq!(pb.capsule.map(|c| c.uid), Some(uid));
}
