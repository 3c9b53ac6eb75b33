//! The comparative benchmark behind `e2e/scripts/bench.sh`: Wrenn's
//! operator on fake-VMM agents against agent-sandbox's controller on kwok
//! nodes, on one Go-built kube-apiserver, in one run. Every scenario stops
//! by itself.
//!
//! ```text
//! compare [--capsules N] [--sequential N] [--concurrency 1,50,200] [--agents N]
//!         [--out DIR]            write DIR/benchmarks.{md,json} and DIR/benchmarks/*.svg
//!                                (relative paths: from the workspace root)
//!         [--include NAME=FILE]  add a node-agent bench's output to the page
//!         [--gate-record JSON]   run the short mode, store its ratios in JSON, rewrite the page
//!         [--gate JSON]          run the short mode, fail if a ratio regressed against JSON
//! ```
//! Run through cargo: `cargo bench -p wrenn-e2e --bench compare -- ARGS`
//! (release) or `cargo test -p wrenn-e2e --bench compare -- ARGS` (dev).
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod scenarios;
#[path = "wrenn.rs"]
mod wrenn;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use wrenn_e2e::bench::figures::{Figures, GateFigures, Params, Path, Ratio, median_ratios, ratios};
use wrenn_e2e::bench::{gate, report, svg};

/// Command-line arguments (`--name value`).
struct Args {
    params: Params,
    out: Option<PathBuf>,
    include: Vec<(String, PathBuf)>,
    gate_record: Option<PathBuf>,
    gate: Option<PathBuf>,
}

/// The short run CI repeats: a few seconds per system, in interleaved
/// rounds whose median ratio the gate compares. One in flight only: with
/// more, the rounds' ratios (speedup and writes alike) spread too widely
/// under load to gate (see `gate::Margins::WHY`).
fn gate_params() -> Params {
    Params {
        objects: 10,
        sequential: 5,
        in_flight: vec![1],
        agents: 2,
        profile: profile().into(),
        rounds: 5,
    }
}

fn profile() -> &'static str {
    if cfg!(debug_assertions) {
        "dev"
    } else {
        "release"
    }
}

fn parse() -> Result<Args> {
    let mut a = Args {
        params: Params {
            objects: 200,
            sequential: 30,
            in_flight: vec![1, 50, 200],
            agents: 4,
            profile: profile().into(),
            rounds: 1,
        },
        out: None,
        include: Vec::new(),
        gate_record: None,
        gate: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        // cargo passes `--bench` to a bench target; nothing to do with it.
        if flag == "--bench" {
            continue;
        }
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        let num = || -> Result<usize> {
            value
                .parse()
                .with_context(|| format!("{flag}: not a number: {value}"))
        };
        match flag.as_str() {
            "--capsules" => a.params.objects = num()?.max(1),
            "--sequential" => a.params.sequential = num()?.max(1),
            "--agents" => a.params.agents = num()?.max(1),
            "--concurrency" => {
                a.params.in_flight = value
                    .split(',')
                    .map(|v| v.trim().parse::<usize>().map(|n| n.max(1)))
                    .collect::<Result<_, _>>()
                    .with_context(|| format!("--concurrency: not a list of numbers: {value}"))?;
            }
            "--out" => a.out = Some(from_root(&value)),
            "--include" => {
                let (name, file) = value
                    .split_once('=')
                    .with_context(|| format!("--include NAME=FILE, not {value}"))?;
                a.include.push((name.into(), file.into()));
            }
            "--gate-record" => a.gate_record = Some(from_root(&value)),
            "--gate" => a.gate = Some(from_root(&value)),
            _ => bail!("unknown argument {flag}"),
        }
    }
    Ok(a)
}

/// `path` as given when absolute, else under the workspace root: cargo
/// runs a bench from its package's directory (`e2e/`), not from where it
/// was called, so `docs/benchmarks.json` means the same from anywhere.
fn from_root(path: &str) -> PathBuf {
    let p = PathBuf::from(path);
    if p.is_absolute() {
        p
    } else {
        wrenn_e2e::workspace_root().join(p)
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("compare: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<ExitCode> {
    let args = parse()?;
    let stages = wrenn::Stages::default();
    stages.install()?;
    if let Some(reference) = &args.gate {
        return gate_run(reference, &stages);
    }
    if let Some(file) = &args.gate_record {
        let mut f: Figures = read(file)?;
        let params = gate_params();
        let done = scenarios::run_all(&params, &stages)?;
        print_rounds(&done.per_round);
        f.gate = Some(GateFigures {
            ratios: median_ratios(&done.per_round),
            rounds: done.per_round,
            params,
        });
        let dir = file.parent().context("the JSON has no directory")?;
        return write(dir, &f).map(|()| ExitCode::SUCCESS);
    }
    let done = scenarios::run_all(&args.params, &stages)?;
    let mut node_agent = BTreeMap::new();
    for (name, file) in &args.include {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("read {}", file.display()))?;
        node_agent.insert(name.clone(), text);
    }
    let f = Figures {
        command: command(&args.params),
        versions: done.versions,
        machine: scenarios::machine(),
        ratios: ratios(&done.runs),
        runs: done.runs,
        params: args.params.clone(),
        gate: None,
        spans: done.spans,
        node_agent,
    };
    match &args.out {
        Some(dir) => write(dir, &f)?,
        None => println!("{}", report::markdown(&f, &[])),
    }
    Ok(ExitCode::SUCCESS)
}

/// CI's short run: its ratios against the committed ones.
fn gate_run(reference: &std::path::Path, stages: &wrenn::Stages) -> Result<ExitCode> {
    let case = wrenn_testkit::case(wrenn_testkit::Tier::Cluster, "bench::ratio_gate");
    if let Err(why) = wrenn_e2e::ControlPlane::shared() {
        case.skip(format!("no control plane: {why}"));
        return Ok(ExitCode::SUCCESS);
    }
    let committed: Figures = read(reference)?;
    let Some(reference_gate) = committed.gate else {
        bail!(
            "{} has no gate reference: run e2e/scripts/bench.sh",
            reference.display()
        );
    };
    let params = gate_params();
    let done = scenarios::run_all(&params, stages)?;
    print_rounds(&done.per_round);
    let now = median_ratios(&done.per_round);
    println!("ratio gate (above 1: Wrenn ahead), median of the rounds now vs committed:");
    for r in &now {
        let was = reference_gate
            .ratios
            .iter()
            .find(|c| c.path == r.path && c.in_flight == r.in_flight);
        println!(
            "  {:?} {:>3} in flight: p50 speedup {:.2} (was {}), throughput {:.2} (was {}), write saving {:.2} (was {})",
            r.path,
            r.in_flight,
            r.p50_speedup,
            was.map_or("-".into(), |c| format!("{:.2}", c.p50_speedup)),
            r.throughput_speedup,
            was.map_or("-".into(), |c| format!("{:.2}", c.throughput_speedup)),
            r.write_saving,
            was.map_or("-".into(), |c| format!("{:.2}", c.write_saving)),
        );
    }
    let mut failures = gate::check(&reference_gate, &params, &now, gate::Margins::default());
    // A round that did not finish is a failure whatever the medians say:
    // an object never Ready within a minute is a bug, not noise.
    failures.extend(done.runs.iter().filter_map(|r| {
        let why = r.failed.as_deref()?;
        Some(format!(
            "{} {:?} {} in flight did not finish: {why}",
            r.system.name(),
            r.path,
            r.in_flight
        ))
    }));
    if failures.is_empty() {
        println!("ratio gate: passed");
        drop(case);
        return Ok(ExitCode::SUCCESS);
    }
    for f in &failures {
        eprintln!("ratio gate: {f}");
    }
    panic!("ratio gate failed: {} regression(s)", failures.len());
}

/// Each round's ratios, for the log.
fn print_rounds(per_round: &[Ratio]) {
    for r in per_round {
        println!(
            "  round: {:?} {:>3} in flight: p50 speedup {:.2}, throughput {:.2}, write saving {:.2}",
            r.path, r.in_flight, r.p50_speedup, r.throughput_speedup, r.write_saving
        );
    }
}

fn command(p: &Params) -> String {
    format!(
        "e2e/scripts/bench.sh --capsules {} --sequential {} --concurrency {} --agents {}",
        p.objects,
        p.sequential,
        p.in_flight
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
        p.agents
    )
}

fn read(file: &std::path::Path) -> Result<Figures> {
    let text = std::fs::read_to_string(file).with_context(|| format!("read {}", file.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parse {}", file.display()))
}

/// Writes `dir/benchmarks.json`, `dir/benchmarks.md` and the plots.
fn write(dir: &std::path::Path, f: &Figures) -> Result<()> {
    let plots_dir = dir.join("benchmarks");
    std::fs::create_dir_all(&plots_dir)
        .with_context(|| format!("create {}", plots_dir.display()))?;
    let mut plots = Vec::new();
    for (path, file) in [(Path::Cold, "cold.svg"), (Path::Warm, "warm.svg")] {
        std::fs::write(plots_dir.join(file), svg::cdf(path, &f.runs))
            .with_context(|| format!("write {file}"))?;
        plots.push((path, format!("benchmarks/{file}")));
    }
    let json = serde_json::to_string_pretty(f).context("serialise the figures")?;
    std::fs::write(dir.join("benchmarks.json"), json + "\n").context("write benchmarks.json")?;
    std::fs::write(dir.join("benchmarks.md"), report::markdown(f, &plots))
        .context("write benchmarks.md")?;
    println!(
        "wrote {}/benchmarks.{{md,json}} and the plots",
        dir.display()
    );
    Ok(())
}
