//! Regenerates `src/gen/` from `proto/*.proto` (needs `protoc`, Debian's
//! protobuf-compiler). With `--check`, generates into a temporary directory
//! and fails naming every file that differs from the committed one.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let check = args.iter().any(|a| a == "--check");
    // `--root DIR`, else where `cargo run` says this package is, else where
    // it was built: one target directory serves several clones, so a build
    // made in another clone bakes that clone's path.
    let root = match args.iter().position(|a| a == "--root") {
        Some(i) => match args.get(i + 1) {
            Some(d) => PathBuf::from(d),
            None => {
                eprintln!("gen: --root needs a directory");
                return ExitCode::FAILURE;
            }
        },
        None => std::env::var_os("CARGO_MANIFEST_DIR")
            .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from),
    };
    let root = root.as_path();
    let committed = root.join("src/gen");
    let out = if check {
        std::env::temp_dir().join(format!("wrenn-proto-gen-{}", std::process::id()))
    } else {
        committed.clone()
    };
    if let Err(err) = generate(root, &out) {
        eprintln!("gen: {err}");
        return ExitCode::FAILURE;
    }
    if !check {
        println!("wrote {}", out.display());
        return ExitCode::SUCCESS;
    }
    let stale = compare(&out, &committed);
    let _ = std::fs::remove_dir_all(&out);
    if stale.is_empty() {
        ExitCode::SUCCESS
    } else {
        for f in stale {
            eprintln!(
                "gen: proto/src/gen/{f} is stale; run `cargo run -p wrenn-proto --example gen`"
            );
        }
        ExitCode::FAILURE
    }
}

fn generate(root: &Path, out: &Path) -> Result<(), String> {
    std::fs::create_dir_all(out).map_err(|e| format!("create {}: {e}", out.display()))?;
    let protos: Vec<PathBuf> = ["proto/guest.proto", "proto/agent.proto"]
        .iter()
        .map(|p| root.join(p))
        .collect();
    tonic_prost_build::configure()
        .build_transport(false)
        // Written by hand in lib.rs, redacting the password.
        .skip_debug(["wrenn.agent.v1.RegistryCredentials"])
        // A download's chunks decode as slices of tonic's receive buffer,
        // not as a copy of it: the gateway passes them on untouched.
        .bytes(".wrenn.guest.v1.FileChunk.data")
        .out_dir(out)
        .compile_protos(&protos, &[root.join("proto")])
        .map_err(|e| format!("compile protos: {e}"))
}

fn compare(fresh: &Path, committed: &Path) -> Vec<String> {
    let mut stale = Vec::new();
    let names = |d: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .map(|r| {
                r.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    let (a, b) = (names(fresh), names(committed));
    for n in a.iter().chain(b.iter().filter(|n| !a.contains(n))) {
        let x = std::fs::read(fresh.join(n)).ok();
        let y = std::fs::read(committed.join(n)).ok();
        if x != y {
            stale.push(n.clone());
        }
    }
    stale
}
