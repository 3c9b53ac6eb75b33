//! Building the workspace's binaries from inside tests: once per test
//! process, with the features `cargo test --workspace` resolves and the
//! toolchain `rust-toolchain.toml` pins, so a test's build reuses the
//! outer build's artifacts instead of rebuilding them.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::workspace_root;

/// The example that makes a build resolve features as `cargo test
/// --workspace` does (see [`cargo_build`]).
const DEV_UNIT: [&str; 2] = ["--example", "gen"];

/// Builds `bin` of `package` (debug, or release with
/// [`release_binaries`]; locked) and returns its path.
///
/// With the features `cargo test --workspace` resolves: `-p <package>`
/// alone resolves fewer (no other member, no dev-dependency), which
/// changes the features of libc, serde_json, tower and more, so the binary
/// and half its dependencies were compiled a second time inside the first
/// test that needed it. `--workspace` plus one small example (a target
/// that needs dev-dependencies) gives the test build's resolution, whose
/// artifacts are already there.
///
/// Built once per test process: a restart in the middle of a scenario (the
/// operator or an agent after a kill -9) must not wait on a build, which on
/// a busy machine can queue behind another build's lock for minutes and
/// then reads as a slow recovery.
pub fn cargo_build(package: &str, bin: &str) -> Result<PathBuf> {
    static BUILT: std::sync::Mutex<Vec<(String, PathBuf)>> = std::sync::Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, path)) = built.iter().find(|(b, _)| b == bin) {
        return Ok(path.clone());
    }
    let path = build_now(package, bin)?;
    built.push((bin.to_string(), path.clone()));
    Ok(path)
}

fn build_now(package: &str, bin: &str) -> Result<PathBuf> {
    let root = workspace_root();
    let channel = pinned_channel(&root)?;
    let mut cmd = pinned_cargo(&channel, std::env::var_os("CARGO"));
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(set_by_cargo_for_the_test) {
            cmd.env_remove(&name);
        }
    }
    let release = release_binaries();
    cmd.args(["build", "--locked", "-q", "--workspace", "--bin", bin]);
    if release {
        cmd.arg("--release");
    }
    let status = cmd
        .args(DEV_UNIT)
        .current_dir(&root)
        .status()
        .context("run cargo build")?;
    if !status.success() {
        bail!("cargo build of {package}'s {bin} failed: {status}");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let profile = if release { "release" } else { "debug" };
    Ok(target.join(profile).join(bin))
}

/// Whether the binaries are built as they ship (`WRENN_E2E_RELEASE=1`):
/// for benchmarks whose figures a debug build would distort. Tests keep
/// the debug build the test build already made.
pub fn release_binaries() -> bool {
    std::env::var_os("WRENN_E2E_RELEASE").is_some_and(|v| v == "1")
}

/// Whether `name` is a variable cargo sets for the test it runs (the
/// test's package name, manifest directory, ...), which the build run from
/// the test must not see: build scripts watch some of them (ring's
/// `rerun-if-env-changed=CARGO_PKG_NAME`, `CARGO_MANIFEST_DIR`, ...), so a
/// build that saw them and one from a shell that did not each found the
/// other's ring stale and rebuilt it and everything above it (rustls,
/// kube, tonic, every Wrenn crate): minutes per switch on a busy machine.
fn set_by_cargo_for_the_test(name: &str) -> bool {
    const EXACT: [&str; 7] = [
        "CARGO_CRATE_NAME",
        "CARGO_BIN_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "CARGO_RUSTC_CURRENT_DIR",
        "OUT_DIR",
        "CARGO_MANIFEST_LINKS",
    ];
    name.starts_with("CARGO_PKG_") || name.starts_with("CARGO_MANIFEST_") || EXACT.contains(&name)
}

/// The toolchain `rust-toolchain.toml` pins (its `channel`).
fn pinned_channel(root: &Path) -> Result<String> {
    let path = root.join("rust-toolchain.toml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    parse_channel(&text).with_context(|| format!("no channel = \"...\" in {}", path.display()))
}

/// The `channel` of a `rust-toolchain.toml` (pure; the file is one small
/// table, so no TOML parser).
fn parse_channel(toml: &str) -> Option<String> {
    toml.lines().find_map(|line| {
        let (key, value) = line.split_once('=')?;
        (key.trim() == "channel").then(|| value.trim().trim_matches('"').to_string())
    })
}

/// A cargo of exactly `channel`: `$CARGO` (the cargo running the tests)
/// when it is that version, else `rustup run <channel> cargo`. A cargo of
/// another toolchain (seen: `$CARGO` naming rustup's `stable` while the
/// outer build was the pinned one) fingerprints dependencies differently,
/// so the two builds rebuilt each other's artifacts in the shared target
/// directory. `RUSTUP_TOOLCHAIN` keeps the `rustc` it finds on `PATH` (a
/// rustup proxy) on the same channel.
fn pinned_cargo(channel: &str, cargo_env: Option<std::ffi::OsString>) -> Command {
    let is_pinned = |cargo: &std::ffi::OsStr| {
        Command::new(cargo)
            .arg("--version")
            .env("RUSTUP_TOOLCHAIN", channel)
            .output()
            .is_ok_and(|o| {
                o.status.success()
                    && String::from_utf8_lossy(&o.stdout).starts_with(&format!("cargo {channel} "))
            })
    };
    let mut cmd = match cargo_env {
        Some(cargo) if is_pinned(&cargo) => Command::new(cargo),
        _ => {
            let mut c = Command::new("rustup");
            c.args(["run", channel, "cargo"]);
            c
        }
    };
    cmd.env("RUSTUP_TOOLCHAIN", channel);
    cmd
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn what_cargo_sets_for_a_test_is_kept_from_the_inner_build() {
        for name in [
            "CARGO_PKG_NAME",
            "CARGO_PKG_VERSION_MAJOR",
            "CARGO_MANIFEST_DIR",
            "CARGO_MANIFEST_PATH",
            "CARGO_CRATE_NAME",
            "OUT_DIR",
        ] {
            assert!(set_by_cargo_for_the_test(name), "{name}");
        }
        // What configures the build stays.
        for name in [
            "CARGO",
            "CARGO_TARGET_DIR",
            "CARGO_HOME",
            "CARGO_INCREMENTAL",
            "CARGO_BUILD_JOBS",
            "RUSTUP_TOOLCHAIN",
        ] {
            assert!(!set_by_cargo_for_the_test(name), "{name}");
        }
    }

    #[test]
    fn the_channel_is_read_from_the_toolchain_file() {
        let text = "[toolchain]\nchannel = \"1.95.0\"\ncomponents = [\"clippy\"]\n";
        assert_eq!(parse_channel(text).as_deref(), Some("1.95.0"));
        assert_eq!(parse_channel("[toolchain]\n"), None);
        // The repository's own file names a version, not `stable`.
        let pinned = pinned_channel(&workspace_root()).unwrap();
        assert!(pinned.starts_with("1."), "{pinned}");
    }

    /// What was seen: `$CARGO` a cargo of another toolchain. The build
    /// must use the pinned one instead.
    #[test]
    fn a_cargo_of_another_toolchain_is_not_used() {
        let channel = pinned_channel(&workspace_root()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let other = dir.path().join("cargo");
        std::fs::write(&other, "#!/bin/sh\necho 'cargo 1.80.0 (other toolchain)'\n").unwrap();
        std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o755)).unwrap();
        for cargo_env in [Some(other.into_os_string()), None] {
            let out = pinned_cargo(&channel, cargo_env)
                .arg("--version")
                .output()
                .unwrap();
            let version = String::from_utf8_lossy(&out.stdout);
            assert!(
                version.starts_with(&format!("cargo {channel} ")),
                "{version}"
            );
        }
    }

    /// The cargo running these tests is the pinned one (rustup honours
    /// rust-toolchain.toml), so it is used as it is.
    #[test]
    fn the_pinned_cargo_from_the_environment_is_used() {
        let channel = pinned_channel(&workspace_root()).unwrap();
        let cargo = std::env::var_os("CARGO").unwrap();
        let cmd = pinned_cargo(&channel, Some(cargo.clone()));
        assert_eq!(cmd.get_program(), cargo);
    }
}
