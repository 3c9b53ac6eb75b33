//! Per-capsule history: readings of cumulative counters and gauges become
//! points in three fixed-size rings (10 min at 1 s, 2 h at 30 s, 24 h at
//! 5 min), and a range query picks the finest ring that still holds the
//! range. Pure: time comes in as arguments, nothing here reads a clock.
//!
//! Units in a point: CPU is a rate (millicores over the point's interval),
//! memory and disk are gauges (averaged when downsampled), network is bytes
//! moved during the point's interval (summed when downsampled). Rates come
//! from the monotonic clock the caller passes, so a wall-clock jump never
//! produces a spike; wall time only places points on the time axis.
//!
//! Why this file is long: 504 lines of code and 276 of unit tests kept beside
//! the code they check.

use std::time::Duration;

use super::source::Reading;

/// One resolution of the history: how far apart its points are and how
/// many it keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tier {
    /// Seconds between points.
    pub step_seconds: u32,
    /// Points kept; older ones are overwritten.
    pub capacity: usize,
}

impl Tier {
    /// The span the tier keeps, in nanoseconds.
    pub fn span_nanos(&self) -> i64 {
        i64::from(self.step_seconds) * NANOS_PER_SEC * self.capacity as i64
    }

    fn step_nanos(&self) -> i64 {
        i64::from(self.step_seconds) * NANOS_PER_SEC
    }
}

/// The three resolutions, finest first: 10 min at 1 s, 2 h at 30 s, 24 h
/// at 5 min.
pub const TIERS: [Tier; 3] = [
    Tier {
        step_seconds: 1,
        capacity: 600,
    },
    Tier {
        step_seconds: 30,
        capacity: 240,
    },
    Tier {
        step_seconds: 300,
        capacity: 288,
    },
];

/// A wall clock that went back by more than this starts the history over:
/// points stamped in what is now the future would otherwise hide every new
/// one. Smaller steps back (NTP corrections) only drop samples until the
/// clock has caught up.
pub const CLOCK_RESET_AFTER: Duration = Duration::from_secs(120);

const NANOS_PER_SEC: i64 = 1_000_000_000;

/// One point of a capsule's history. `None` means the source had no value
/// for the whole interval (not connected, failed, or a counter reset).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Point {
    /// Unix time in nanoseconds: the sample's time at 1 s, the start of the
    /// bucket at coarser resolutions.
    pub at_unix_nanos: i64,
    /// Average CPU use over the interval, in millicores (1000 = one CPU).
    pub cpu_millicores: Option<u64>,
    /// Average resident memory of the VMM process on the host.
    pub host_rss_bytes: Option<u64>,
    /// Average bytes allocated by the capsule's writable disk.
    pub disk_allocated_bytes: Option<u64>,
    /// Average guest memory in use (total - available), from the guest.
    pub guest_memory_used_bytes: Option<u64>,
    /// Bytes sent to the guest during the interval.
    pub net_rx_bytes: Option<u64>,
    /// Bytes sent by the guest during the interval.
    pub net_tx_bytes: Option<u64>,
}

/// The answer to a range query.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Range {
    /// Seconds between points (1, 30 or 300).
    pub step_seconds: u32,
    /// Points in time order, within `[from, to]`. Intervals without samples
    /// (the agent was down, the capsule was suspended) have no point.
    pub points: Vec<Point>,
}

/// A point as stored: presence bits instead of `Option`s and CPU in 32
/// bits keep a point at 56 bytes and a full capsule history near 62 KiB.
#[derive(Clone, Copy, Debug, Default)]
struct Packed {
    at: i64,
    cpu_millicores: u32,
    present: u8,
    // rss, disk, guest memory, rx, tx
    values: [u64; 5],
}

const CPU_PRESENT: u8 = 1 << 7;

impl Packed {
    fn from_point(p: &Point) -> Self {
        let mut packed = Packed {
            at: p.at_unix_nanos,
            ..Default::default()
        };
        if let Some(mc) = p.cpu_millicores {
            packed.present |= CPU_PRESENT;
            // 4 million CPUs' worth saturates; no host has that many.
            packed.cpu_millicores = u32::try_from(mc).unwrap_or(u32::MAX);
        }
        let fields = [
            p.host_rss_bytes,
            p.disk_allocated_bytes,
            p.guest_memory_used_bytes,
            p.net_rx_bytes,
            p.net_tx_bytes,
        ];
        for (i, f) in fields.iter().enumerate() {
            if let Some(v) = f {
                packed.present |= 1 << i;
                packed.values[i] = *v;
            }
        }
        packed
    }

    fn to_point(self) -> Point {
        let get = |i: usize| (self.present & (1 << i) != 0).then_some(self.values[i]);
        Point {
            at_unix_nanos: self.at,
            cpu_millicores: (self.present & CPU_PRESENT != 0)
                .then_some(u64::from(self.cpu_millicores)),
            host_rss_bytes: get(0),
            disk_allocated_bytes: get(1),
            guest_memory_used_bytes: get(2),
            net_rx_bytes: get(3),
            net_tx_bytes: get(4),
        }
    }
}

/// A fixed-capacity ring of points in time order. Grows up to its capacity,
/// then overwrites the oldest point.
#[derive(Clone, Debug)]
struct Ring {
    buf: Vec<Packed>,
    capacity: usize,
    /// Index of the oldest point once the ring is full.
    head: usize,
    /// Whether a point was ever overwritten (the ring no longer holds the
    /// capsule's whole life).
    wrapped: bool,
}

impl Ring {
    fn new(capacity: usize) -> Self {
        Self {
            buf: Vec::new(),
            capacity,
            head: 0,
            wrapped: false,
        }
    }

    fn push(&mut self, p: Packed) {
        if self.buf.len() < self.capacity {
            if self.buf.capacity() == self.buf.len() {
                // Grow in steps but never past the capacity: a full ring
                // costs exactly `capacity` points.
                let want = (self.buf.len() * 2).clamp(16, self.capacity);
                self.buf.reserve_exact(want - self.buf.len());
            }
            self.buf.push(p);
        } else {
            self.buf[self.head] = p;
            self.head = (self.head + 1) % self.capacity;
            self.wrapped = true;
        }
    }

    fn iter(&self) -> impl Iterator<Item = &Packed> {
        self.buf[self.head..]
            .iter()
            .chain(self.buf[..self.head].iter())
    }

    fn oldest(&self) -> Option<i64> {
        self.iter().next().map(|p| p.at)
    }

    fn clear(&mut self) {
        self.buf = Vec::new();
        self.head = 0;
        self.wrapped = false;
    }

    fn memory_bytes(&self) -> usize {
        self.buf.capacity() * std::mem::size_of::<Packed>()
    }
}

/// The sums behind one coarse point still being filled.
#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    start: i64,
    samples: u32,
    cpu_ns: u128,
    cpu_elapsed_ns: u128,
    // rss, disk, guest memory: sum and count each
    gauge_sum: [u128; 3],
    gauge_n: [u32; 3],
    net: [Option<u64>; 2],
}

impl Bucket {
    fn new(start: i64) -> Self {
        Self {
            start,
            ..Default::default()
        }
    }

    fn add(&mut self, s: &Interval) {
        self.samples += 1;
        if let Some((cpu, elapsed)) = s.cpu {
            self.cpu_ns += u128::from(cpu);
            self.cpu_elapsed_ns += u128::from(elapsed);
        }
        for (i, g) in [
            s.point.host_rss_bytes,
            s.point.disk_allocated_bytes,
            s.point.guest_memory_used_bytes,
        ]
        .into_iter()
        .enumerate()
        {
            if let Some(v) = g {
                self.gauge_sum[i] += u128::from(v);
                self.gauge_n[i] += 1;
            }
        }
        for (i, n) in [s.point.net_rx_bytes, s.point.net_tx_bytes]
            .into_iter()
            .enumerate()
        {
            if let Some(v) = n {
                self.net[i] = Some(self.net[i].unwrap_or(0).saturating_add(v));
            }
        }
    }

    fn to_point(self) -> Point {
        let avg = |i: usize| {
            (self.gauge_n[i] > 0).then(|| {
                u64::try_from(self.gauge_sum[i] / u128::from(self.gauge_n[i])).unwrap_or(u64::MAX)
            })
        };
        Point {
            at_unix_nanos: self.start,
            cpu_millicores: millicores(self.cpu_ns, self.cpu_elapsed_ns),
            host_rss_bytes: avg(0),
            disk_allocated_bytes: avg(1),
            guest_memory_used_bytes: avg(2),
            net_rx_bytes: self.net[0],
            net_tx_bytes: self.net[1],
        }
    }
}

/// CPU time over elapsed time, rounded, in millicores.
fn millicores(cpu_ns: u128, elapsed_ns: u128) -> Option<u64> {
    (elapsed_ns > 0)
        .then(|| u64::try_from((cpu_ns * 1000 + elapsed_ns / 2) / elapsed_ns).unwrap_or(u64::MAX))
}

/// A 1 s point plus the raw CPU figures coarse buckets need to average the
/// rate correctly (total CPU over total time, not a mean of means).
struct Interval {
    point: Point,
    cpu: Option<(u64, u64)>,
}

/// The last value of each cumulative counter, for deltas.
#[derive(Clone, Copy, Debug, Default)]
struct Baseline {
    /// (monotonic nanos, CPU nanos)
    cpu: Option<(u64, u64)>,
    net: Option<(u64, u64)>,
}

/// What happened to one recorded reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// Stored as a new point.
    Stored,
    /// Dropped: its wall time is not after the newest point's (a small step
    /// back of the clock, or two samples in one instant).
    ClockBehind,
    /// The clock went back by more than [`CLOCK_RESET_AFTER`]: the history
    /// was cleared and the reading stored as its first point.
    HistoryReset,
}

/// One capsule's history across the three tiers.
#[derive(Clone, Debug)]
pub struct Series {
    fine: Ring,
    coarse: [(Ring, Option<Bucket>); 2],
    baseline: Baseline,
    newest: Option<i64>,
    latest: Reading,
}

impl Default for Series {
    fn default() -> Self {
        Self::new()
    }
}

impl Series {
    /// An empty history.
    pub fn new() -> Self {
        Self {
            fine: Ring::new(TIERS[0].capacity),
            coarse: [
                (Ring::new(TIERS[1].capacity), None),
                (Ring::new(TIERS[2].capacity), None),
            ],
            baseline: Baseline::default(),
            newest: None,
            latest: Reading::default(),
        }
    }

    /// Forgets the counter baselines: the next reading starts new deltas.
    /// Call when the source changes (a new VMM process after restore), so a
    /// counter that restarted from zero is not read as a huge delta.
    pub fn rebase(&mut self) {
        self.baseline = Baseline::default();
    }

    /// The most recent value of each source (cumulative counters as read),
    /// for the Prometheus gauges.
    pub fn latest(&self) -> &Reading {
        &self.latest
    }

    /// Records `reading`, taken at wall time `at_unix_nanos` and monotonic
    /// time `mono_nanos` (any fixed origin; only differences are used).
    pub fn record(&mut self, at_unix_nanos: i64, mono_nanos: u64, reading: &Reading) -> Recorded {
        let mut outcome = Recorded::Stored;
        if let Some(newest) = self.newest
            && at_unix_nanos <= newest
        {
            let behind = newest.saturating_sub(at_unix_nanos);
            if behind <= CLOCK_RESET_AFTER.as_nanos() as i64 {
                // The baseline stays, so the next stored point's deltas
                // cover the dropped interval and no CPU or traffic is lost.
                return Recorded::ClockBehind;
            }
            self.clear();
            outcome = Recorded::HistoryReset;
        }
        self.merge_latest(reading);
        let interval = self.interval(at_unix_nanos, mono_nanos, reading);
        self.fine.push(Packed::from_point(&interval.point));
        for (tier, (ring, bucket)) in TIERS[1..].iter().zip(self.coarse.iter_mut()) {
            let start = at_unix_nanos - at_unix_nanos.rem_euclid(tier.step_nanos());
            match bucket {
                Some(b) if b.start == start => b.add(&interval),
                _ => {
                    if let Some(done) = bucket.take() {
                        ring.push(Packed::from_point(&done.to_point()));
                    }
                    let mut b = Bucket::new(start);
                    b.add(&interval);
                    *bucket = Some(b);
                }
            }
        }
        self.newest = Some(at_unix_nanos);
        outcome
    }

    fn merge_latest(&mut self, r: &Reading) {
        let l = &mut self.latest;
        l.cpu_usage_ns = r.cpu_usage_ns.or(l.cpu_usage_ns);
        l.host_rss_bytes = r.host_rss_bytes.or(l.host_rss_bytes);
        l.disk_allocated_bytes = r.disk_allocated_bytes.or(l.disk_allocated_bytes);
        l.net = r.net.or(l.net);
        l.guest_memory_used_bytes = r.guest_memory_used_bytes.or(l.guest_memory_used_bytes);
    }

    /// Turns cumulative counters into the interval since the previous
    /// reading and moves the baselines. A counter that went down restarted
    /// (new process, new cgroup): that interval has no value.
    fn interval(&mut self, at: i64, mono: u64, r: &Reading) -> Interval {
        let mut cpu = None;
        if let Some(now) = r.cpu_usage_ns {
            if let Some((then_mono, then)) = self.baseline.cpu
                && now >= then
                && mono > then_mono
            {
                cpu = Some((now - then, mono - then_mono));
            }
            self.baseline.cpu = Some((mono, now));
        }
        let mut net = (None, None);
        if let Some(n) = r.net {
            if let Some((rx, tx)) = self.baseline.net
                && n.rx_bytes >= rx
                && n.tx_bytes >= tx
            {
                net = (Some(n.rx_bytes - rx), Some(n.tx_bytes - tx));
            }
            self.baseline.net = Some((n.rx_bytes, n.tx_bytes));
        }
        Interval {
            point: Point {
                at_unix_nanos: at,
                cpu_millicores: cpu.and_then(|(c, e)| millicores(u128::from(c), u128::from(e))),
                host_rss_bytes: r.host_rss_bytes,
                disk_allocated_bytes: r.disk_allocated_bytes,
                guest_memory_used_bytes: r.guest_memory_used_bytes,
                net_rx_bytes: net.0,
                net_tx_bytes: net.1,
            },
            cpu,
        }
    }

    fn clear(&mut self) {
        self.fine.clear();
        for (ring, bucket) in &mut self.coarse {
            ring.clear();
            *bucket = None;
        }
        self.newest = None;
    }

    /// Points in `[from, to]` (unix nanos) at the finest resolution that is
    /// at least `min_step` and still holds `from`: a ring that never
    /// overwrote anything holds the capsule's whole life, otherwise its
    /// oldest point must be no later than `from`. When none does, the
    /// coarsest ring answers with what it has.
    pub fn range(&self, from: i64, to: i64, min_step: Duration) -> Range {
        let tier = self.pick(from, min_step);
        let step_seconds = TIERS[tier].step_seconds;
        if from > to {
            return Range {
                step_seconds,
                points: Vec::new(),
            };
        }
        let in_range = |p: &Point| p.at_unix_nanos >= from && p.at_unix_nanos <= to;
        let points = if tier == 0 {
            self.fine
                .iter()
                .map(|p| p.to_point())
                .filter(in_range)
                .collect()
        } else {
            let (ring, bucket) = &self.coarse[tier - 1];
            // The bucket being filled is the freshest estimate of its
            // interval; leaving it out would hide up to 5 min of data.
            ring.iter()
                .map(|p| p.to_point())
                .chain(bucket.map(Bucket::to_point))
                .filter(in_range)
                .collect()
        };
        Range {
            step_seconds,
            points,
        }
    }

    fn pick(&self, from: i64, min_step: Duration) -> usize {
        let holds = |ring: &Ring| !ring.wrapped || ring.oldest().is_some_and(|o| o <= from);
        let rings = [&self.fine, &self.coarse[0].0, &self.coarse[1].0];
        (0..TIERS.len())
            .filter(|&i| u64::from(TIERS[i].step_seconds) >= min_step.as_secs())
            .find(|&i| holds(rings[i]))
            .unwrap_or(TIERS.len() - 1)
    }

    /// Heap and inline bytes this history uses now.
    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.fine.memory_bytes()
            + self
                .coarse
                .iter()
                .map(|(r, _)| r.memory_bytes())
                .sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::NetCounters;

    const S: i64 = NANOS_PER_SEC;
    /// A wall time on a 5 min boundary, so buckets start at t = 0.
    const T0: i64 = 1_800_000_000 * S;

    fn reading(cpu_ns: u64, rss: u64, rx: u64) -> Reading {
        Reading {
            cpu_usage_ns: Some(cpu_ns),
            host_rss_bytes: Some(rss),
            disk_allocated_bytes: Some(1 << 20),
            net: Some(NetCounters {
                rx_bytes: rx,
                tx_bytes: rx / 2,
            }),
            guest_memory_used_bytes: None,
        }
    }

    /// Records a reading at second `t` of both clocks.
    fn at(series: &mut Series, t: i64, r: Reading) -> Recorded {
        series.record(T0 + t * S, (t * S) as u64 + 7, &r)
    }

    fn all(series: &Series, min_step_s: u64) -> Range {
        series.range(i64::MIN, i64::MAX, Duration::from_secs(min_step_s))
    }

    #[test]
    fn cumulative_cpu_becomes_millicores_and_counters_become_deltas() {
        let mut s = Series::new();
        for t in 0..5 {
            // Half a CPU, 1000 bytes a second in.
            at(
                &mut s,
                t,
                reading(t as u64 * 500_000_000, 4096, t as u64 * 1000),
            );
        }
        let r = all(&s, 0);
        assert_eq!(r.step_seconds, 1);
        assert_eq!(r.points.len(), 5);
        // The first reading only sets the baselines.
        assert_eq!(r.points[0].cpu_millicores, None);
        assert_eq!(r.points[0].net_rx_bytes, None);
        assert_eq!(r.points[0].host_rss_bytes, Some(4096));
        for p in &r.points[1..] {
            assert_eq!(p.cpu_millicores, Some(500));
            assert_eq!(p.net_rx_bytes, Some(1000));
            assert_eq!(p.net_tx_bytes, Some(500));
            assert_eq!(p.guest_memory_used_bytes, None);
        }
        assert_eq!(s.latest().cpu_usage_ns, Some(2_000_000_000));
    }

    #[test]
    fn coarse_points_average_gauges_sum_traffic_and_rate_cpu_over_time() {
        let mut s = Series::new();
        // One busy CPU for 30 s, then idle; RSS grows 1000 bytes a second.
        for t in 0..60 {
            let cpu = 1_000_000_000 * t.min(30) as u64;
            at(&mut s, t, reading(cpu, t as u64 * 1000, t as u64 * 100));
        }
        let r = all(&s, 30);
        assert_eq!(r.step_seconds, 30);
        assert_eq!(r.points.len(), 2, "{r:?}");
        let (a, b) = (r.points[0], r.points[1]);
        assert_eq!((a.at_unix_nanos, b.at_unix_nanos), (T0, T0 + 30 * S));
        assert_eq!(a.cpu_millicores, Some(1000));
        // 1 s of CPU (the interval ending at t = 30) over 30 s.
        assert_eq!(b.cpu_millicores, Some(33));
        assert_eq!(a.host_rss_bytes, Some(14_500));
        assert_eq!(b.host_rss_bytes, Some(44_500));
        assert_eq!(a.net_rx_bytes, Some(2_900));
        assert_eq!(b.net_rx_bytes, Some(3_000));
        assert_eq!(a.disk_allocated_bytes, Some(1 << 20));
        // The 5 min bucket still filling answers too: 30 s of CPU in 59 s.
        let r = all(&s, 300);
        assert_eq!(r.step_seconds, 300);
        assert_eq!(r.points.len(), 1);
        assert_eq!(r.points[0].cpu_millicores, Some(508));
        assert_eq!(r.points[0].net_rx_bytes, Some(5_900));
    }

    #[test]
    fn a_late_tick_weighs_by_its_length_not_as_one_sample() {
        let mut s = Series::new();
        at(&mut s, 0, reading(0, 0, 0));
        at(&mut s, 1, reading(1_000_000_000, 0, 0)); // 1 s at 1000 mc
        at(&mut s, 4, reading(1_000_000_000, 0, 0)); // 3 s idle
        let fine = all(&s, 0);
        assert_eq!(fine.points[2].cpu_millicores, Some(0));
        // The mean of the two rates would be 500; the CPU used is 1 s in 4 s.
        assert_eq!(all(&s, 30).points[0].cpu_millicores, Some(250));
    }

    #[test]
    fn gaps_stay_empty_and_the_rate_after_a_gap_covers_the_gap() {
        let mut s = Series::new();
        for t in (0..=10).chain(100..=110) {
            at(&mut s, t, reading(t as u64 * 100_000_000, 1, 0));
        }
        let r = all(&s, 0);
        assert_eq!(r.points.len(), 22);
        assert!(
            r.points
                .iter()
                .all(|p| p.at_unix_nanos <= T0 + 10 * S || p.at_unix_nanos >= T0 + 100 * S)
        );
        let after_gap = r
            .points
            .iter()
            .find(|p| p.at_unix_nanos == T0 + 100 * S)
            .unwrap();
        assert_eq!(after_gap.cpu_millicores, Some(100));
        // No 30 s bucket is made up for the seconds nobody sampled.
        let coarse = all(&s, 30);
        let starts: Vec<i64> = coarse
            .points
            .iter()
            .map(|p| (p.at_unix_nanos - T0) / S)
            .collect();
        assert_eq!(starts, vec![0, 90]);
    }

    #[test]
    fn a_small_step_back_of_the_clock_drops_samples_without_losing_cpu() {
        let mut s = Series::new();
        at(&mut s, 100, reading(0, 1, 0));
        // Wall clock back 10 s, monotonic clock on: dropped.
        assert_eq!(
            s.record(T0 + 90 * S, 101 * S as u64, &reading(1_000_000_000, 1, 0)),
            Recorded::ClockBehind
        );
        assert_eq!(all(&s, 0).points.len(), 1);
        // Next sample past the newest point: its rate covers both seconds.
        assert_eq!(
            s.record(T0 + 102 * S, 102 * S as u64, &reading(2_000_000_000, 1, 0)),
            Recorded::Stored
        );
        let r = all(&s, 0);
        assert_eq!(r.points.len(), 2);
        assert_eq!(r.points[1].cpu_millicores, Some(1000));
    }

    #[test]
    fn a_large_step_back_of_the_clock_starts_the_history_over() {
        let mut s = Series::new();
        for t in 3600..3700 {
            at(&mut s, t, reading(0, 1, 0));
        }
        let back = T0 + 1000 * S;
        assert_eq!(
            s.record(back, 3700 * S as u64, &reading(0, 1, 0)),
            Recorded::HistoryReset
        );
        let r = all(&s, 0);
        assert_eq!(r.points.len(), 1);
        assert_eq!(r.points[0].at_unix_nanos, back);
        // The baseline survived: the rate of that point is a real one.
        assert_eq!(r.points[0].cpu_millicores, Some(0));
        assert!(all(&s, 30).points.iter().all(|p| p.at_unix_nanos <= back));
    }

    #[test]
    fn a_counter_that_went_down_gives_no_value_for_that_interval() {
        let mut s = Series::new();
        at(&mut s, 0, reading(5_000_000_000, 1, 9000));
        at(&mut s, 1, reading(100, 1, 10)); // new VMM: counters from zero
        at(&mut s, 2, reading(500_000_100, 1, 1010));
        let r = all(&s, 0);
        assert_eq!(r.points[1].cpu_millicores, None);
        assert_eq!(r.points[1].net_rx_bytes, None);
        assert_eq!(r.points[2].cpu_millicores, Some(500));
        assert_eq!(r.points[2].net_rx_bytes, Some(1000));
    }

    #[test]
    fn rebase_starts_new_deltas() {
        let mut s = Series::new();
        at(&mut s, 0, reading(0, 1, 0));
        s.rebase();
        at(&mut s, 1, reading(1_000_000_000, 1, 0));
        assert_eq!(all(&s, 0).points[1].cpu_millicores, None);
    }

    #[test]
    fn the_finest_ring_that_holds_the_range_answers() {
        let mut s = Series::new();
        for t in 0..300 {
            at(&mut s, t, reading(0, 1, 0));
        }
        let now = T0 + 299 * S;
        // Young capsule: 1 s holds its whole life, even for a day's range.
        let day = s.range(now - 86_400 * S, now, Duration::ZERO);
        assert_eq!((day.step_seconds, day.points.len()), (1, 300));
        // A coarser minimum step is honoured.
        assert_eq!(
            s.range(now - 3600 * S, now, Duration::from_secs(2))
                .step_seconds,
            30
        );

        for t in 300..3 * 3600 {
            at(&mut s, t, reading(0, 1, 0));
        }
        let now = T0 + (3 * 3600 - 1) * S;
        let last_5min = s.range(now - 300 * S, now, Duration::ZERO);
        assert_eq!((last_5min.step_seconds, last_5min.points.len()), (1, 301));
        let last_hour = s.range(now - 3600 * S, now, Duration::ZERO);
        assert_eq!(last_hour.step_seconds, 30);
        assert_eq!(last_hour.points.len(), 120);
        let last_3h = s.range(now - 3 * 3600 * S, now, Duration::ZERO);
        assert_eq!(last_3h.step_seconds, 300);
        assert_eq!(last_3h.points.len(), 36);
        // A range within the 1 s ring but in the past.
        let old = s.range(now - 120 * S, now - 60 * S, Duration::ZERO);
        assert_eq!((old.step_seconds, old.points.len()), (1, 61));
        assert!(s.range(now, now - 1, Duration::ZERO).points.is_empty());
    }

    #[test]
    fn packed_points_round_trip() {
        let p = Point {
            at_unix_nanos: -5,
            cpu_millicores: Some(0),
            host_rss_bytes: None,
            disk_allocated_bytes: Some(u64::MAX),
            guest_memory_used_bytes: Some(3),
            net_rx_bytes: None,
            net_tx_bytes: Some(0),
        };
        assert_eq!(Packed::from_point(&p).to_point(), p);
        assert_eq!(
            Packed::from_point(&Point::default()).to_point(),
            Point::default()
        );
        assert_eq!(std::mem::size_of::<Packed>(), 56);
    }

    #[test]
    fn memory_is_bounded_by_the_ring_capacities() {
        let mut s = Series::new();
        let empty = s.memory_bytes();
        for t in 0..2 * 86_400 {
            at(&mut s, t, reading(t as u64, 1, t as u64));
        }
        let full = s.memory_bytes();
        let points: usize = TIERS.iter().map(|t| t.capacity).sum();
        assert_eq!(full - empty, points * std::mem::size_of::<Packed>());
        for t in 2 * 86_400..2 * 86_400 + 1000 {
            at(&mut s, t, reading(t as u64, 1, t as u64));
        }
        assert_eq!(s.memory_bytes(), full);
        let end = T0 + (2 * 86_400 + 999) * S;
        let fine = s.range(end - 599 * S, end, Duration::ZERO);
        assert_eq!((fine.step_seconds, fine.points.len()), (1, 600));
        assert!(
            fine.points
                .windows(2)
                .all(|w| w[0].at_unix_nanos < w[1].at_unix_nanos)
        );
        assert_eq!(fine.points.last().unwrap().at_unix_nanos, end);
        let hour = s.range(end - 3600 * S, end, Duration::ZERO);
        assert_eq!((hour.step_seconds, hour.points.len()), (30, 120));
        // Older than anything kept: the coarsest ring answers with its day.
        let everything = all(&s, 0);
        assert_eq!(
            (everything.step_seconds, everything.points.len()),
            (300, 289)
        );
    }
}
