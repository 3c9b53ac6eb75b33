//! What a test looks at on the host to prove a capsule left nothing
//! behind: processes, files and network namespaces.

use std::path::Path;

/// Processes whose command line mentions `needle` (QEMU carries the
/// capsule's run directory, named by its UID).
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline"))
            && String::from_utf8_lossy(&cmd).contains(needle)
        {
            found.push(pid);
        }
    }
    found
}

/// Paths under `root` whose path mentions `needle` (a capsule UID).
pub fn files_mentioning(root: &Path, needle: &str) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.to_string_lossy().contains(needle) {
                hits.push(p.display().to_string());
            }
            if p.is_dir() && !p.is_symlink() {
                stack.push(p);
            }
        }
    }
    hits
}

/// Capsule network namespaces mounted in `dir` (an agent's `--netns-dir`).
pub fn capsule_namespaces(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("wrenn-"))
        .collect()
}
