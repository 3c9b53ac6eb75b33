//! Latency plots as plain SVG: one chart per path (cold, warm), one
//! cumulative distribution line per system and concurrency, log-scaled
//! time axis. Written by hand: no plotting crate, no font dependencies
//! (text is left to the viewer's sans-serif). Pure: returns the document.

use std::fmt::Write as _;

use crate::bench::figures::{Path, Run, System};

const W: f64 = 760.0;
const H: f64 = 420.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 200.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;

/// The cumulative latency distribution of every run of `path`.
pub fn cdf(path: Path, runs: &[Run]) -> String {
    let runs: Vec<&Run> = runs
        .iter()
        .filter(|r| {
            r.path == path
                && r.measured
                    .as_ref()
                    .is_some_and(|m| !m.latency_ms.is_empty())
        })
        .collect();
    let all = runs
        .iter()
        .filter_map(|r| r.measured.as_ref())
        .flat_map(|m| m.latency_ms.iter().copied());
    let (lo, hi) = all.fold((f64::MAX, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    // Decades that hold every sample; at least one.
    let lo_dec = if lo.is_finite() && lo > 0.0 {
        lo.log10().floor()
    } else {
        0.0
    };
    let hi_dec = (hi.max(1.0).log10().ceil()).max(lo_dec + 1.0);
    let x = |ms: f64| {
        let v = ms.max(10f64.powf(lo_dec)).log10();
        LEFT + (v - lo_dec) / (hi_dec - lo_dec) * (W - LEFT - RIGHT)
    };
    let y = |frac: f64| TOP + (1.0 - frac) * (H - TOP - BOTTOM);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{LEFT}" y="22" font-size="15">{} create → Ready: cumulative share of objects (log time axis)</text>
"#,
        match path {
            Path::Cold => "Cold",
            Path::Warm => "Warm",
        }
    );
    // Axes, decade grid lines and labels.
    let _ = writeln!(
        s,
        r##"<g stroke="#888" fill="none"><line x1="{LEFT}" y1="{}" x2="{}" y2="{}"/><line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{}"/></g>"##,
        y(0.0),
        W - RIGHT,
        y(0.0),
        y(0.0)
    );
    let mut d = lo_dec;
    while d <= hi_dec {
        let ms = 10f64.powf(d);
        let px = x(ms);
        let _ = writeln!(
            s,
            r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{:.1}" stroke="#ddd"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            y(0.0),
            y(0.0) + 18.0,
            label(ms)
        );
        d += 1.0;
    }
    for q in [0.0, 0.5, 0.9, 1.0] {
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{:.1}" x2="{}" y2="{:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{}%</text>"##,
            y(q),
            W - RIGHT,
            y(q),
            LEFT - 6.0,
            y(q) + 4.0,
            (q * 100.0) as u32
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{}" text-anchor="middle">milliseconds from create to Ready</text>"#,
        (LEFT + W - RIGHT) / 2.0,
        H - 10.0
    );
    for (i, r) in runs.iter().enumerate() {
        let Some(m) = &r.measured else { continue };
        let n = m.latency_ms.len() as f64;
        let mut pts = format!("{:.1},{:.1}", x(m.latency_ms[0]), y(0.0));
        for (k, v) in m.latency_ms.iter().enumerate() {
            let _ = write!(pts, " {:.1},{:.1}", x(*v), y((k + 1) as f64 / n));
        }
        let (colour, dash) = style(r.system, r.in_flight, i);
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" stroke-dasharray="{dash}" points="{pts}"/>"#
        );
        let ly = TOP + 18.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{}" y1="{ly:.1}" x2="{}" y2="{ly:.1}" stroke="{colour}" stroke-width="2" stroke-dasharray="{dash}"/><text x="{}" y="{:.1}">{} · {} in flight</text>"#,
            W - RIGHT + 10.0,
            W - RIGHT + 34.0,
            W - RIGHT + 40.0,
            ly + 4.0,
            r.system.name(),
            r.in_flight
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Wrenn in blues, the peer in oranges; darker and dashed as more are in flight.
fn style(system: System, in_flight: usize, _i: usize) -> (&'static str, &'static str) {
    let step = match in_flight {
        0..=1 => 0,
        2..=50 => 1,
        _ => 2,
    };
    let colour = match (system, step) {
        (System::Wrenn, 0) => "#6baed6",
        (System::Wrenn, 1) => "#2171b5",
        (System::Wrenn, _) => "#08306b",
        (System::AgentSandbox, 0) => "#fd8d3c",
        (System::AgentSandbox, 1) => "#d94801",
        (System::AgentSandbox, _) => "#7f2704",
    };
    (colour, ["", "6 3", "2 2"][step])
}

fn label(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{} s", ms / 1000.0)
    } else {
        format!("{ms} ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::figures::Measured;

    #[test]
    fn one_line_per_run_of_the_path_inside_the_plot() {
        let run = |system, path, in_flight, lat: Vec<f64>| Run {
            system,
            path,
            objects: lat.len(),
            in_flight,
            measured: Some(Measured::new(lat, 1.0)),
            failed: None,
        };
        let runs = vec![
            run(System::Wrenn, Path::Cold, 1, vec![12.0, 30.0, 45.0]),
            run(
                System::AgentSandbox,
                Path::Cold,
                50,
                vec![200.0, 900.0, 2500.0],
            ),
            run(System::Wrenn, Path::Warm, 1, vec![5.0]),
        ];
        let svg = cdf(Path::Cold, &runs);
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("agent-sandbox · 50 in flight"));
        assert!(
            svg.contains(">10 ms<") && svg.contains(">10 s<"),
            "decades 10 ms..10 s"
        );
        // Every plotted point is inside the drawing area.
        for pts in svg.split("points=\"").skip(1) {
            for p in pts.split('"').next().unwrap().split(' ') {
                let (px, py) = p.split_once(',').unwrap();
                let (px, py): (f64, f64) = (px.parse().unwrap(), py.parse().unwrap());
                assert!((LEFT..=W - RIGHT).contains(&px) && (TOP..=H - BOTTOM).contains(&py));
            }
        }
    }
}
