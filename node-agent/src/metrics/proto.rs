//! `GetMetrics` conversion, pure: the request's range with its defaults,
//! and a [`Range`] as the wire response. The server validates the UID and
//! calls [`Metrics::range`](super::Metrics::range) in between.

use std::time::Duration;

use wrenn_proto::agent::v1::{GetMetricsRequest, GetMetricsResponse, MetricsSample};

use super::ring::{Point, Range};

/// Range asked when the request leaves `from` unset: the finest tier's span.
pub const DEFAULT_RANGE: Duration = Duration::from_secs(600);

/// The `[from, to]` of `req` in unix nanos, given the time now: an unset
/// (zero) `to` means now; an unset `from` means [`DEFAULT_RANGE`] before
/// `to`.
pub fn from_request(req: &GetMetricsRequest, now_unix_nanos: i64) -> (i64, i64) {
    let to = if req.to_unix_nanos == 0 {
        now_unix_nanos
    } else {
        req.to_unix_nanos
    };
    let from = if req.from_unix_nanos == 0 {
        to.saturating_sub(DEFAULT_RANGE.as_nanos() as i64)
    } else {
        req.from_unix_nanos
    };
    (from, to)
}

/// The wire form of `range`. proto3 has no absent numbers, so a figure the
/// source did not give is 0. `cpu_millicores` is the average over the
/// sample's interval; network bytes are those moved during it;
/// memory and disk are averages over it.
pub fn to_proto(range: &Range) -> GetMetricsResponse {
    GetMetricsResponse {
        resolution_seconds: range.step_seconds,
        samples: range.points.iter().map(sample).collect(),
    }
}

fn sample(p: &Point) -> MetricsSample {
    MetricsSample {
        unix_nanos: p.at_unix_nanos,
        cpu_millicores: p.cpu_millicores.unwrap_or(0),
        guest_memory_used_bytes: p.guest_memory_used_bytes.unwrap_or(0),
        host_rss_bytes: p.host_rss_bytes.unwrap_or(0),
        disk_allocated_bytes: p.disk_allocated_bytes.unwrap_or(0),
        net_rx_bytes: p.net_rx_bytes.unwrap_or(0),
        net_tx_bytes: p.net_tx_bytes.unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_bounds_mean_the_last_ten_minutes() {
        let now = 1_000_000 * 1_000_000_000i64;
        let req = GetMetricsRequest {
            uid: "u".into(),
            ..Default::default()
        };
        assert_eq!(from_request(&req, now), (now - 600_000_000_000, now));
        let req = GetMetricsRequest {
            uid: "u".into(),
            from_unix_nanos: 5,
            to_unix_nanos: 9,
        };
        assert_eq!(from_request(&req, now), (5, 9));
    }

    #[test]
    fn points_keep_their_order_values_and_resolution() {
        let range = Range {
            step_seconds: 30,
            points: vec![
                Point {
                    at_unix_nanos: 30_000_000_000,
                    cpu_millicores: Some(250),
                    host_rss_bytes: Some(4096),
                    disk_allocated_bytes: Some(1 << 20),
                    guest_memory_used_bytes: None,
                    net_rx_bytes: Some(10),
                    net_tx_bytes: Some(20),
                },
                Point {
                    at_unix_nanos: 60_000_000_000,
                    ..Default::default()
                },
            ],
        };
        let resp = to_proto(&range);
        assert_eq!(resp.resolution_seconds, 30);
        assert_eq!(
            resp.samples,
            vec![
                MetricsSample {
                    unix_nanos: 30_000_000_000,
                    cpu_millicores: 250,
                    guest_memory_used_bytes: 0,
                    host_rss_bytes: 4096,
                    disk_allocated_bytes: 1 << 20,
                    net_rx_bytes: 10,
                    net_tx_bytes: 20,
                },
                MetricsSample {
                    unix_nanos: 60_000_000_000,
                    ..Default::default()
                },
            ]
        );
    }
}
