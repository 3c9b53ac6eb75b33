//! Writes the CRD and admission-policy YAML into a directory (default
//! `crds/` beside this crate), or checks that the files there are current
//! with `--check`, naming each stale file.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut check = false;
    // Where `cargo run` says this package is, else where it was built: one
    // target directory serves several clones, so a build made in another
    // clone bakes that clone's path (scripts pass `--out`).
    let mut dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--check" => check = true,
            "--out" => match args.next() {
                Some(d) => dir = PathBuf::from(d),
                None => return usage("--out needs a directory"),
            },
            "-h" | "--help" => return usage(""),
            other => return usage(&format!("unknown argument {other:?}")),
        }
    }
    let mut files = Vec::new();
    for (name, crd) in wrenn_crds::crds() {
        files.push((name, wrenn_crds::to_yaml(&crd).map_err(|e| e.to_string())));
    }
    files.push((
        "policy.yaml",
        wrenn_crds::policy::documents()
            .map_err(|e| e.to_string())
            .and_then(|docs| {
                docs.iter()
                    .map(|d| wrenn_crds::to_yaml(d).map_err(|e| e.to_string()))
                    .collect::<Result<Vec<_>, _>>()
                    .map(|d| d.join("---\n"))
            }),
    ));
    let mut stale = 0;
    for (name, rendered) in files {
        let rendered = match rendered {
            Ok(r) => r,
            Err(err) => {
                eprintln!("crdgen: render {name}: {err}");
                return ExitCode::FAILURE;
            }
        };
        let path = dir.join(name);
        if check {
            let current = std::fs::read_to_string(&path).unwrap_or_default();
            if current != rendered {
                eprintln!(
                    "crdgen: {} is stale; run `cargo run -p wrenn-crds --bin crdgen`",
                    path.display()
                );
                stale += 1;
            }
        } else {
            if let Err(err) =
                std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, rendered))
            {
                eprintln!("crdgen: write {}: {err}", path.display());
                return ExitCode::FAILURE;
            }
            println!("wrote {}", path.display());
        }
    }
    if stale > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn usage(problem: &str) -> ExitCode {
    if !problem.is_empty() {
        eprintln!("crdgen: {problem}");
    }
    eprintln!("usage: crdgen [--check] [--out DIR]");
    if problem.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    }
}
