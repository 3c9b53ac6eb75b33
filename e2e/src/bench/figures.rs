//! What a benchmark run measured, as written to `docs/benchmarks.json`, and
//! the Wrenn-versus-peer ratios computed from it. Pure: no I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Which system a run measured.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum System {
    /// Wrenn's operator on in-process fake-VMM node agents (0 ms boot).
    Wrenn,
    /// agent-sandbox's controller, Pods bound by kube-scheduler and made
    /// Ready by kwok fake kubelets.
    AgentSandbox,
}

/// Which path to Ready a run measured.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Path {
    /// Wrenn: `Capsule` → Running (cold boot); peer: `Sandbox` → Ready.
    Cold,
    /// Wrenn: `Capsule` of a warm `CapsuleTemplate` → Running (restore);
    /// peer: `SandboxClaim` on a filled `SandboxWarmPool` → Ready.
    Warm,
}

impl System {
    /// Display name.
    pub fn name(self) -> &'static str {
        match self {
            System::Wrenn => "Wrenn",
            System::AgentSandbox => "agent-sandbox",
        }
    }

    /// What this system's object of `path` is, for tables.
    pub fn object(self, path: Path) -> &'static str {
        match (self, path) {
            (System::Wrenn, Path::Cold) => "Capsule → Running",
            (System::Wrenn, Path::Warm) => "Capsule (warm template) → Running",
            (System::AgentSandbox, Path::Cold) => "Sandbox → Ready",
            (System::AgentSandbox, Path::Warm) => "SandboxClaim (warm pool) → Ready",
        }
    }
}

/// Figures of one scenario that completed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Measured {
    /// Create call → Ready seen on the watch, per object, ms, ascending.
    pub latency_ms: Vec<f64>,
    /// Median, 90th, 99th percentile and maximum of `latency_ms`.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Slowest object.
    pub max_ms: f64,
    /// First create → last Ready, seconds.
    pub wall_s: f64,
    /// Objects Ready per second over `wall_s`.
    pub per_s: f64,
    /// Writes to the measured object itself after its create, up to its
    /// Ready, per object.
    pub own_writes: f64,
    /// Every write in the namespace during the scenario and until it is
    /// quiet again (status, child objects, Events; not the bench's own
    /// creates), per object.
    pub all_writes: f64,
    /// `all_writes` by kind, per object.
    pub writes_by_kind: BTreeMap<String, f64>,
}

impl Measured {
    /// Summarises `latency_ms` (any order) over a `wall_s` second run.
    pub fn new(mut latency_ms: Vec<f64>, wall_s: f64) -> Self {
        latency_ms.sort_by(f64::total_cmp);
        let n = latency_ms.len();
        Measured {
            p50_ms: percentile(&latency_ms, 50.0),
            p90_ms: percentile(&latency_ms, 90.0),
            p99_ms: percentile(&latency_ms, 99.0),
            max_ms: latency_ms.last().copied().unwrap_or(0.0),
            per_s: if wall_s > 0.0 { n as f64 / wall_s } else { 0.0 },
            latency_ms,
            wall_s,
            own_writes: 0.0,
            all_writes: 0.0,
            writes_by_kind: BTreeMap::new(),
        }
    }
}

/// Nearest-rank percentile of ascending `sorted` (0 when empty).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One scenario: a system, a path, how many objects with how many in flight.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Run {
    /// The system measured.
    pub system: System,
    /// Cold or warm.
    pub path: Path,
    /// Objects applied.
    pub objects: usize,
    /// At most this many created and not yet Ready at any time.
    pub in_flight: usize,
    /// The figures, when the scenario completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured: Option<Measured>,
    /// Why it could not run or did not finish.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
}

/// Wrenn against the peer on one path at one concurrency. Every ratio is
/// oriented so that above 1 means Wrenn is ahead.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Ratio {
    /// Cold or warm.
    pub path: Path,
    /// Objects in flight.
    pub in_flight: usize,
    /// Peer p50 / Wrenn p50.
    pub p50_speedup: f64,
    /// Peer p99 / Wrenn p99.
    pub p99_speedup: f64,
    /// Wrenn objects/s / peer objects/s.
    pub throughput_speedup: f64,
    /// Peer writes per object / Wrenn writes per object (all writes).
    pub write_saving: f64,
}

/// Pairs each Wrenn run with the peer's run of the same path and
/// concurrency; pairs where either side has no figures give no ratio.
pub fn ratios(runs: &[Run]) -> Vec<Ratio> {
    let mut out = Vec::new();
    for w in runs.iter().filter(|r| r.system == System::Wrenn) {
        let Some(p) = runs.iter().find(|r| {
            r.system == System::AgentSandbox && r.path == w.path && r.in_flight == w.in_flight
        }) else {
            continue;
        };
        let (Some(wm), Some(pm)) = (&w.measured, &p.measured) else {
            continue;
        };
        out.push(Ratio {
            path: w.path,
            in_flight: w.in_flight,
            p50_speedup: div(pm.p50_ms, wm.p50_ms),
            p99_speedup: div(pm.p99_ms, wm.p99_ms),
            throughput_speedup: div(wm.per_s, pm.per_s),
            write_saving: div(pm.all_writes, wm.all_writes),
        });
    }
    out
}

/// One ratio per path and concurrency from the ratios of each round
/// (`per_round`, in any order): for every field, the median over the
/// rounds. A burst of load that lands on one side of one round moves that
/// round's ratio a long way and the median not at all.
pub fn median_ratios(per_round: &[Ratio]) -> Vec<Ratio> {
    let mut keys: Vec<(Path, usize)> = Vec::new();
    for r in per_round {
        if !keys.contains(&(r.path, r.in_flight)) {
            keys.push((r.path, r.in_flight));
        }
    }
    keys.into_iter()
        .map(|(path, in_flight)| {
            let rounds: Vec<&Ratio> = per_round
                .iter()
                .filter(|r| r.path == path && r.in_flight == in_flight)
                .collect();
            let med = |f: fn(&Ratio) -> f64| median(rounds.iter().map(|r| f(r)).collect());
            Ratio {
                path,
                in_flight,
                p50_speedup: med(|r| r.p50_speedup),
                p99_speedup: med(|r| r.p99_speedup),
                throughput_speedup: med(|r| r.throughput_speedup),
                write_saving: med(|r| r.write_saving),
            }
        })
        .collect()
}

/// Median of `v` (the mean of the middle two when even; 0 when empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn div(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

/// The machine a run was made on.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Machine {
    /// Logical CPUs.
    pub cores: usize,
    /// CPU model name.
    pub cpu: String,
    /// `uname -r`.
    pub kernel: String,
    /// Memory, GiB.
    pub memory_gib: f64,
    /// "KVM" when /dev/kvm opens, else "TCG (no KVM)".
    pub virtualization: String,
    /// Load average over the minute before the run.
    pub load_before: f64,
}

/// The parameters of a run (also of the gate's short run).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Params {
    /// Objects per scenario with more than one in flight.
    pub objects: usize,
    /// Objects of the one-in-flight scenarios.
    pub sequential: usize,
    /// The concurrencies measured.
    pub in_flight: Vec<usize>,
    /// Wrenn fake agents, and the peer's kwok nodes.
    pub agents: usize,
    /// Cargo profile the Wrenn side was built with.
    pub profile: String,
    /// Rounds per scenario, each side's rounds interleaved (Wrenn, peer,
    /// peer, Wrenn, ...), every round with `objects` (or `sequential`)
    /// objects per side. 1 in the full run.
    #[serde(default = "one")]
    pub rounds: usize,
}

fn one() -> usize {
    1
}

/// Everything one `bench.sh` run wrote.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Figures {
    /// The command that produced this file.
    pub command: String,
    /// Versions of what was measured.
    pub versions: BTreeMap<String, String>,
    /// The machine.
    pub machine: Machine,
    /// What was run.
    pub params: Params,
    /// Each scenario.
    pub runs: Vec<Run>,
    /// Wrenn / peer ratios of `runs`.
    pub ratios: Vec<Ratio>,
    /// The short run CI repeats, measured right after the full one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<GateFigures>,
    /// Where the operator spent its time, per span (Wrenn side).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub spans: Vec<SpanRow>,
    /// Node-agent micro benchmarks (their own output, verbatim).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_agent: BTreeMap<String, String>,
}

/// The gate's reference: the short run's parameters and ratios.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct GateFigures {
    /// What the short run ran.
    pub params: Params,
    /// Its ratios: per path and concurrency, the median over the rounds.
    pub ratios: Vec<Ratio>,
    /// Each round's ratios, for the spread.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rounds: Vec<Ratio>,
}

/// Time spent in one operator `tracing` span over a scenario.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SpanRow {
    /// Which scenario (`cold/200`).
    pub scenario: String,
    /// Span name.
    pub span: String,
    /// Spans closed.
    pub count: usize,
    /// Median, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Sum, ms.
    pub total_ms: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(system: System, path: Path, in_flight: usize, lat: &[f64], wall: f64) -> Run {
        let mut m = Measured::new(lat.to_vec(), wall);
        m.all_writes = if system == System::Wrenn { 6.0 } else { 12.0 };
        Run {
            system,
            path,
            objects: lat.len(),
            in_flight,
            measured: Some(m),
            failed: None,
        }
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
        let m = Measured::new(vec![30.0, 10.0, 20.0], 2.0);
        assert_eq!(m.latency_ms, vec![10.0, 20.0, 30.0]);
        assert_eq!((m.p50_ms, m.max_ms, m.per_s), (20.0, 30.0, 1.5));
    }

    #[test]
    fn ratios_pair_runs_and_say_above_one_when_wrenn_leads() {
        let runs = vec![
            run(System::Wrenn, Path::Cold, 1, &[10.0, 20.0], 1.0),
            run(System::AgentSandbox, Path::Cold, 1, &[40.0, 80.0], 4.0),
            // A peer run without a Wrenn partner, and a failed pair: no ratio.
            run(System::AgentSandbox, Path::Cold, 50, &[1.0], 1.0),
            Run {
                measured: None,
                failed: Some("no pool".into()),
                ..run(System::AgentSandbox, Path::Warm, 1, &[], 0.0)
            },
            run(System::Wrenn, Path::Warm, 1, &[5.0], 1.0),
        ];
        let r = ratios(&runs);
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(r[0].p50_speedup, 4.0);
        assert_eq!(r[0].throughput_speedup, 4.0);
        assert_eq!(r[0].write_saving, 2.0);
    }

    fn ratio(path: Path, in_flight: usize, p50: f64) -> Ratio {
        Ratio {
            path,
            in_flight,
            p50_speedup: p50,
            p99_speedup: p50,
            throughput_speedup: 2.0 * p50,
            write_saving: 1.5,
        }
    }

    #[test]
    fn the_median_of_rounds_ignores_one_round_hit_by_load() {
        let rounds = [
            ratio(Path::Cold, 1, 2.0),
            ratio(Path::Cold, 1, 0.3),
            ratio(Path::Warm, 1, 5.0),
            ratio(Path::Cold, 1, 2.2),
            ratio(Path::Cold, 20, 1.0),
            ratio(Path::Cold, 20, 3.0),
        ];
        let m = median_ratios(&rounds);
        let keys: Vec<_> = m.iter().map(|r| (r.path, r.in_flight)).collect();
        assert_eq!(keys, [(Path::Cold, 1), (Path::Warm, 1), (Path::Cold, 20)]);
        assert_eq!(m[0].p50_speedup, 2.0);
        assert_eq!(m[0].throughput_speedup, 4.0);
        assert_eq!(m[1].p50_speedup, 5.0);
        // Two rounds: the mean of both.
        assert_eq!(m[2].p50_speedup, 2.0);
        assert_eq!(median(Vec::new()), 0.0);
    }
}
