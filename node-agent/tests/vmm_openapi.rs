//! Contract tests: every request body the agent can produce is validated
//! against Cloud Hypervisor's OpenAPI spec (a committed copy of
//! shared/reference/cloud-hypervisor-openapi.yaml, main @ ae44c297), with
//! `$ref`s resolved against the spec's own `components`.
//!
//! The schema for each body is looked up from the spec's `paths` by the
//! endpoint the agent calls, so a body sent to the wrong endpoint fails too.
//! Validation is *strict*: every object schema gets
//! `additionalProperties: false`, because CH silently ignores unknown
//! fields (notes §6) and a typo would otherwise pass here and in CH alike.
//!
//! Where the spec and CH disagree we follow CH (notes §16); each deviation
//! is patched into the spec copy by [`apply_documented_deviations`] with
//! the reason next to it.
// Test helpers outside #[test] fns unwrap too: a failed setup is a failed test.
#![allow(clippy::unwrap_used)]

use jsonschema::Validator;
use serde_json::{Value, json};
use wrenn_node_agent::vmm::MachineSpec;
use wrenn_node_agent::vmm::ch::api::{
    Action, BalloonConfig, DiskConfig, Endpoint, ImageType, MemoryRestoreMode, Method, NetConfig,
    RateLimiterConfig, RequestBody, RestoreConfig, RestoredNetFds, TokenBucket, VmConfig,
    VmRemoveDevice, VmResize, VmSnapshotConfig, VmSpec, build_file_url, build_tap_fd_net,
    build_vm_config, endpoint,
};

const SPEC: &str = include_str!("data/ch/cloud-hypervisor-openapi.yaml");

fn spec() -> Value {
    let mut spec: Value = serde_saphyr::from_str(SPEC).expect("the spec is YAML");
    apply_documented_deviations(&mut spec);
    spec
}

/// Where CH's code differs from its spec, the spec copy is patched to what
/// CH really accepts. Each entry names its source.
fn apply_documented_deviations(spec: &mut Value) {
    let schemas = &mut spec["components"]["schemas"];
    // Deviation 1 (notes §8.2, §16): `RestoreConfig.net_fds` (v40+) carries
    // the count of SCM_RIGHTS TAP fds per NIC and is not in the spec.
    schemas["RestoreConfig"]["properties"]["net_fds"] = json!({
        "type": "array",
        "items": {
            "type": "object",
            "required": ["id", "num_fds"],
            "properties": {"id": {"type": "string"}, "num_fds": {"type": "integer", "minimum": 1}}
        }
    });
    // Deviation 2 (notes §16): `MemoryRestoreMode` is PascalCase in JSON;
    // the spec agrees (Copy, OnDemand), so nothing to patch — asserted by
    // `restore_mode_must_be_pascal_case` below.
    //
    // Deviation 3 (notes §6, v49): `NetConfig.ip`/`mask` have no defaults
    // any more; we never send them, so the stale defaults do not matter.
    //
    // Deviation 4 (notes §16): `VmConfig.payload` is "required" in the spec
    // but not enforced by CH at create; we always send it, so the spec's
    // stricter rule stays.
}

/// Adds `additionalProperties: false` to every object schema that lists
/// properties and says nothing about extras.
fn make_strict(v: &mut Value) {
    match v {
        Value::Object(map) => {
            let is_object_schema = map.get("properties").is_some_and(Value::is_object);
            if is_object_schema && !map.contains_key("additionalProperties") {
                map.insert("additionalProperties".into(), Value::Bool(false));
            }
            for (_, child) in map.iter_mut() {
                make_strict(child);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(make_strict),
        _ => {}
    }
}

struct Contract {
    spec: Value,
    components: Value,
}

impl Contract {
    fn new() -> Self {
        let spec = spec();
        let mut components = spec["components"].clone();
        make_strict(&mut components);
        Self { spec, components }
    }

    /// The schema `$ref` of `action`'s request body, from the spec's paths.
    fn request_schema(&self, action: Action) -> String {
        let path = format!("/{}", action.name());
        let op = &self.spec["paths"][&path][match action.method() {
            Method::Get => "get",
            Method::Put => "put",
        }];
        assert!(
            op.is_object(),
            "{path} {:?} is not in the spec",
            action.method()
        );
        op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            .as_str()
            .unwrap_or_else(|| panic!("{path} has no JSON request body in the spec"))
            .to_string()
    }

    fn has_request_body(&self, action: Action) -> bool {
        let path = format!("/{}", action.name());
        let op = &self.spec["paths"][&path]["put"];
        op.get("requestBody").is_some()
    }

    fn validator(&self, schema_ref: &str) -> Validator {
        let schema = json!({"$ref": schema_ref, "components": self.components});
        jsonschema::validator_for(&schema).expect("the spec's schemas compile")
    }

    /// Encodes `body` as the client would and validates it.
    fn check<E: Endpoint>(&self, what: &str, body: &E::Request) -> Result<(), String> {
        let bytes = body
            .to_body()
            .expect("encodes")
            .unwrap_or_else(|| panic!("{what}: {} sends no body", E::ACTION));
        let value: Value = serde_json::from_slice(&bytes).expect("valid JSON");
        let validator = self.validator(&self.request_schema(E::ACTION));
        let errors: Vec<String> = validator
            .iter_errors(&value)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{what} ({}): {}\nbody: {value}",
                E::ACTION,
                errors.join("; ")
            ))
        }
    }
}

fn vm_spec() -> VmSpec {
    VmSpec::new(
        2,
        512 << 20,
        "/var/lib/wrenn/kernels/vmlinux",
        "console=ttyS0 root=/dev/vda rw",
        "/dev/mapper/wrenn-abc",
    )
}

/// Every `vm.create` body the builders make.
fn vm_configs() -> Vec<(&'static str, VmConfig)> {
    let plain = build_vm_config(&vm_spec());
    let full = build_vm_config(&VmSpec {
        serial_file: Some("/var/lib/wrenn/capsules/abc/serial.log".into()),
        vsock: Some((3, "/var/lib/wrenn/capsules/abc/vsock.sock".into())),
        system_uuid: Some("5b1c5e0e-0000-4000-8000-000000000001".into()),
        ..vm_spec()
    });
    let mut named_tap = plain.clone();
    named_tap.net.push(NetConfig {
        id: Some("net0".into()),
        tap: Some("tap0".into()),
        mac: Some("02:fc:00:00:00:05".into()),
        num_queues: Some(2),
        ..NetConfig::default()
    });
    // What ChMachine sends for a qcow2 root disk with an initramfs.
    let machine = wrenn_node_agent::vmm::build_machine_config(&MachineSpec {
        kernel: "/var/lib/wrenn/kernels/vmlinux".into(),
        initramfs: Some("/var/lib/wrenn/kernels/initrd".into()),
        root_disk: "/var/lib/wrenn/disks/wrenn-abc.qcow2".into(),
        root_disk_format: wrenn_node_agent::vmm::DiskFormat::Qcow2,
        netns: None,
        tap: None,
        ..small(machine_spec())
    });
    vec![
        ("minimal", plain),
        ("serial+vsock+uuid", full),
        ("named tap", named_tap),
        ("machine: qcow2 + initramfs", machine),
        ("machine: confined, with a NIC", confined_machine()),
    ]
}

/// What ChMachine sends for a capsule with a NIC: Landlock on, with the
/// run dir and the TAP device as extra rules.
fn confined_machine() -> VmConfig {
    wrenn_node_agent::vmm::build_machine_config(&machine_spec())
}

/// `spec` at 1 vCPU and 256 MiB, its cgroup limits to match.
fn small(spec: MachineSpec) -> MachineSpec {
    MachineSpec {
        vcpus: 1,
        memory_bytes: 256 << 20,
        limits: wrenn_node_agent::vmm::cgroup::CgroupLimits::build_for_vm(1, 256 << 20),
        ..spec
    }
}

/// Capsule `abc` with a NIC in its own netns, as ChMachine is given it.
fn machine_spec() -> MachineSpec {
    MachineSpec {
        capsule: "abc".into(),
        vcpus: 2,
        memory_bytes: 512 << 20,
        kernel: "/opt/wrenn/share/vmlinuz".into(),
        initramfs: None,
        cmdline: "console=ttyS0".into(),
        root_disk: "/dev/mapper/wrenn-abc".into(),
        root_disk_format: wrenn_node_agent::vmm::DiskFormat::Raw,
        netns: Some("/run/netns/wrenn-abc".into()),
        tap: Some(wrenn_node_agent::vmm::TapSpec {
            name: "tap0".into(),
            mac: "02:fc:00:00:00:05".into(),
        }),
        vsock_cid: 3,
        vsock_socket: "/var/lib/wrenn/vmm/abc/vsock.sock".into(),
        limits: wrenn_node_agent::vmm::cgroup::CgroupLimits::build_for_vm(2, 512 << 20),
        run_dir: "/var/lib/wrenn/vmm/abc".into(),
    }
}

#[test]
fn cloud_hypervisor_runs_with_its_seccomp_and_landlock() {
    let args: Vec<String> =
        wrenn_node_agent::vmm::build_ch_args(7, std::path::Path::new("/r/events.json"))
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
    assert_eq!(
        args,
        [
            "--api-socket",
            "fd=7",
            "--event-monitor",
            "path=/r/events.json",
            "--seccomp",
            "true"
        ]
    );
    let config = confined_machine();
    assert_eq!(config.landlock_enable, Some(true));
    let rules: Vec<(&str, &str)> = config
        .landlock_rules
        .iter()
        .map(|r| (r.path.as_str(), r.access.as_str()))
        .collect();
    assert_eq!(
        rules,
        [("/var/lib/wrenn/vmm/abc", "rw"), ("/dev/net/tun", "rw")]
    );
    // Without a NIC, no TAP device rule.
    let (_, qcow) = vm_configs()
        .into_iter()
        .find(|(n, _)| *n == "machine: qcow2 + initramfs")
        .unwrap();
    assert!(qcow.landlock_rules.iter().all(|r| r.path != "/dev/net/tun"));
}

fn nets() -> Vec<(&'static str, NetConfig)> {
    let mut limited = build_tap_fd_net("net0", "02:fc:00:00:00:05", 2);
    limited.mtu = Some(1500);
    limited.rate_limiter_config = Some(RateLimiterConfig {
        bandwidth: Some(TokenBucket {
            size: 209_715_200,
            one_time_burst: Some(104_857_600),
            refill_time: 1000,
        }),
        ops: None,
    });
    // `fds` is set the way `vm.info` echoes it; it must not be sent.
    let mut echoed = build_tap_fd_net("net1", "02:fc:00:00:00:06", 1);
    echoed.fds = Some(vec![3]);
    vec![
        (
            "tap fd, one pair",
            build_tap_fd_net("net0", "02:fc:00:00:00:05", 1),
        ),
        ("tap fds, two pairs, rate limited", limited),
        ("echoed fds", echoed),
    ]
}

fn restores() -> Vec<(&'static str, RestoreConfig)> {
    let dir = std::path::Path::new("/var/lib/wrenn/snapshots/s1");
    vec![
        (
            "copy",
            RestoreConfig {
                source_url: build_file_url(dir),
                prefault: Some(false),
                memory_restore_mode: Some(MemoryRestoreMode::Copy),
                resume: None,
                net_fds: vec![],
            },
        ),
        (
            "on demand, resume, net fds",
            RestoreConfig {
                source_url: build_file_url(dir),
                prefault: None,
                memory_restore_mode: Some(MemoryRestoreMode::OnDemand),
                resume: Some(true),
                net_fds: vec![RestoredNetFds {
                    id: "net0".into(),
                    num_fds: 1,
                }],
            },
        ),
    ]
}

#[test]
fn every_vm_create_body_matches_the_spec() {
    let c = Contract::new();
    for (what, cfg) in vm_configs() {
        c.check::<endpoint::VmCreate>(what, &cfg).unwrap();
    }
}

#[test]
fn every_add_net_body_matches_the_spec() {
    let c = Contract::new();
    let mut nets = nets();
    let machine_net = wrenn_node_agent::vmm::build_net_config(&MachineSpec {
        kernel: "/k".into(),
        cmdline: String::new(),
        root_disk: "/d".into(),
        vsock_socket: "/v".into(),
        run_dir: "/r".into(),
        ..small(machine_spec())
    })
    .unwrap();
    nets.push(("machine: tap by name", machine_net));
    for (what, net) in nets {
        c.check::<endpoint::VmAddNet>(what, &net).unwrap();
    }
}

#[test]
fn add_disk_body_matches_the_spec() {
    let c = Contract::new();
    let disk = DiskConfig {
        path: "/dev/mapper/wrenn-abc-data".into(),
        id: Some("data0".into()),
        readonly: Some(true),
        direct: Some(true),
        serial: Some("vol-1".into()),
        image_type: Some(ImageType::Raw),
        num_queues: Some(1),
        queue_size: Some(128),
        rate_limiter_config: None,
        backing_files: None,
    };
    c.check::<endpoint::VmAddDisk>("data disk", &disk).unwrap();
}

#[test]
fn snapshot_restore_remove_and_resize_bodies_match_the_spec() {
    let c = Contract::new();
    let snap = VmSnapshotConfig {
        destination_url: build_file_url(std::path::Path::new("/var/lib/wrenn/snapshots/s1.tmp")),
    };
    c.check::<endpoint::VmSnapshot>("snapshot", &snap).unwrap();
    for (what, r) in restores() {
        c.check::<endpoint::VmRestore>(what, &r).unwrap();
    }
    let rm = VmRemoveDevice { id: "net0".into() };
    c.check::<endpoint::VmRemoveDevice>("remove", &rm).unwrap();
    let balloon = VmResize {
        desired_balloon: Some(256 << 20),
        ..VmResize::default()
    };
    c.check::<endpoint::VmResize>("balloon", &balloon).unwrap();
}

#[test]
fn every_action_exists_in_the_spec_and_bodies_match_presence() {
    let c = Contract::new();
    use Action::*;
    // Every action the agent calls, and whether its request has a body.
    let (body, none) = (true, false);
    let all = [
        (VmmPing, none),
        (VmmShutdown, none),
        (VmCreate, body),
        (VmBoot, none),
        (VmShutdown, none),
        (VmDelete, none),
        (VmPause, none),
        (VmResume, none),
        (VmReboot, none),
        (VmPowerButton, none),
        (VmSnapshot, body),
        (VmRestore, body),
        (VmInfo, none),
        (VmCounters, none),
        (VmAddNet, body),
        (VmAddDisk, body),
        (VmRemoveDevice, body),
        (VmResize, body),
    ];
    for (a, sends_body) in all {
        let path = format!("/{}", a.name());
        let method = match a.method() {
            Method::Get => "get",
            Method::Put => "put",
        };
        assert!(
            c.spec["paths"][&path][method].is_object(),
            "{path} {method} missing from the spec"
        );
        if a.method() == Method::Put {
            assert_eq!(
                c.has_request_body(a),
                sends_body,
                "{path}: body presence differs from the spec"
            );
        }
    }
    // The unit request encodes to no body at all: CH gives 400 for a body
    // on vm.boot.
    assert_eq!(().to_body().unwrap(), None);
}

#[test]
fn strict_validation_catches_typos_and_wrong_enums() {
    let c = Contract::new();
    let v = c.validator("#/components/schemas/VmConfig");
    let mut body = serde_json::to_value(build_vm_config(&vm_spec())).unwrap();
    assert!(v.is_valid(&body));
    body["memory"]["tph"] = json!(false); // typo of thp: CH would ignore it
    assert!(!v.is_valid(&body), "strict mode must reject unknown fields");

    let r = c.validator("#/components/schemas/RestoreConfig");
    let lower = json!({"source_url": "file:///s", "memory_restore_mode": "ondemand"});
    assert!(!r.is_valid(&lower), "restore_mode_must_be_pascal_case");
    let balloon = c.validator("#/components/schemas/BalloonConfig");
    assert!(
        balloon.is_valid(
            &serde_json::to_value(BalloonConfig {
                size: 0,
                deflate_on_oom: Some(true),
                free_page_reporting: Some(true),
            })
            .unwrap()
        )
    );
}

#[test]
fn committed_spec_is_the_reference_copy() {
    // When CI has ../shared beside the clone, the committed copy must equal
    // it; otherwise this only checks the copy is there.
    let shared =
        wrenn_testkit::workspace_root().join("../shared/reference/cloud-hypervisor-openapi.yaml");
    if let Ok(text) = std::fs::read_to_string(&shared) {
        assert_eq!(
            text,
            SPEC,
            "tests/data/ch copy differs from {}",
            shared.display()
        );
    }
    assert!(SPEC.contains("title: Cloud Hypervisor API"));
}
