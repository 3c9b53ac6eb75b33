//! Resource arithmetic shared by planning and placement: a capsule's
//! effective resources (its own, else its template's defaults), Kubernetes
//! quantities in bytes, and Go-style durations. Pure; no I/O.

use std::fmt;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use wrenn_crds::capsule::CapsuleResources;
use wrenn_crds::template::TemplateDefaults;

/// vCPUs, memory and disk of one capsule or one node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// Disk in bytes.
    pub disk_bytes: u64,
}

impl Resources {
    /// Component-wise sum.
    pub fn plus(self, other: Resources) -> Resources {
        Resources {
            vcpus: self.vcpus.saturating_add(other.vcpus),
            memory_bytes: self.memory_bytes.saturating_add(other.memory_bytes),
            disk_bytes: self.disk_bytes.saturating_add(other.disk_bytes),
        }
    }

    /// Component-wise difference, floored at zero.
    pub fn minus(self, other: Resources) -> Resources {
        Resources {
            vcpus: self.vcpus.saturating_sub(other.vcpus),
            memory_bytes: self.memory_bytes.saturating_sub(other.memory_bytes),
            disk_bytes: self.disk_bytes.saturating_sub(other.disk_bytes),
        }
    }
}

impl From<Resources> for wrenn_proto::agent::v1::Resources {
    fn from(r: Resources) -> Self {
        Self {
            vcpus: r.vcpus,
            memory_bytes: r.memory_bytes,
            disk_bytes: r.disk_bytes,
        }
    }
}

impl From<&wrenn_proto::agent::v1::Resources> for Resources {
    fn from(r: &wrenn_proto::agent::v1::Resources) -> Self {
        Self {
            vcpus: r.vcpus,
            memory_bytes: r.memory_bytes,
            disk_bytes: r.disk_bytes,
        }
    }
}

/// A spec value that passed the API server but cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// A quantity the parser does not understand.
    #[error("{field} {value:?} is not a quantity in bytes")]
    Quantity {
        /// Which field.
        field: &'static str,
        /// Its text.
        value: String,
    },
    /// A duration the parser does not understand.
    #[error("{field} {value:?} is not a duration")]
    Duration {
        /// Which field.
        field: &'static str,
        /// Its text.
        value: String,
    },
}

/// Parses a Kubernetes quantity (`512Mi`, `4Gi`, `1G`, `1.5Gi`, `1e9`) as bytes.
pub fn quantity_bytes(field: &'static str, q: &Quantity) -> Result<u64, Error> {
    let bad = || Error::Quantity {
        field,
        value: q.0.clone(),
    };
    let text = q.0.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let number: f64 = number.parse().map_err(|_| bad())?;
    let multiplier: f64 = match suffix {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        "Pi" => 1024.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0,
        s if s.starts_with(['e', 'E']) => {
            let exp: i32 = s[1..].parse().map_err(|_| bad())?;
            10f64.powi(exp)
        }
        _ => return Err(bad()),
    };
    let bytes = (number * multiplier).ceil();
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes as u64)
}

/// Renders bytes as the largest exact binary unit (`512Mi`, `3Gi`), else bytes.
pub fn format_bytes(bytes: u64) -> String {
    for (unit, size) in [
        ("Ti", 1u64 << 40),
        ("Gi", 1 << 30),
        ("Mi", 1 << 20),
        ("Ki", 1 << 10),
    ] {
        if bytes >= size && bytes.is_multiple_of(size) {
            return format!("{}{unit}", bytes / size);
        }
    }
    bytes.to_string()
}

/// The capsule's resources after template defaults fill what it leaves unset.
pub fn effective(
    own: Option<&CapsuleResources>,
    defaults: &TemplateDefaults,
) -> Result<Resources, Error> {
    let vcpus = own.and_then(|r| r.vcpus).unwrap_or(defaults.vcpus);
    let memory = own
        .and_then(|r| r.memory.as_ref())
        .unwrap_or(&defaults.memory);
    let disk = own.and_then(|r| r.disk.as_ref()).unwrap_or(&defaults.disk);
    Ok(Resources {
        vcpus,
        memory_bytes: quantity_bytes("memory", memory)?,
        disk_bytes: quantity_bytes("disk", disk)?,
    })
}

/// Parses a Go-style duration (`90s`, `30m`, `1h30m`, `1.5h`, `250ms`).
pub fn parse_duration(field: &'static str, text: &str) -> Result<Duration, Error> {
    let bad = || Error::Duration {
        field,
        value: text.to_string(),
    };
    if text.is_empty() {
        return Err(bad());
    }
    let mut rest = text;
    let mut total = 0f64;
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        if n == 0 {
            return Err(bad());
        }
        let value: f64 = rest[..n].parse().map_err(|_| bad())?;
        rest = &rest[n..];
        let u = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..u] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        rest = &rest[u..];
        total += value * seconds;
    }
    if !total.is_finite() || total > 1e12 {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(total))
}

impl fmt::Display for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} vCPU, {} memory, {} disk",
            self.vcpus,
            format_bytes(self.memory_bytes),
            format_bytes(self.disk_bytes)
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn q(s: &str) -> Quantity {
        Quantity(s.into())
    }

    #[test]
    fn quantities_in_binary_and_decimal_units() {
        assert_eq!(quantity_bytes("m", &q("512Mi")).unwrap(), 512 << 20);
        assert_eq!(quantity_bytes("m", &q("4Gi")).unwrap(), 4 << 30);
        assert_eq!(quantity_bytes("m", &q("1G")).unwrap(), 1_000_000_000);
        assert_eq!(quantity_bytes("m", &q("1.5Gi")).unwrap(), 3 << 29);
        assert_eq!(quantity_bytes("m", &q("1e3")).unwrap(), 1000);
        assert_eq!(quantity_bytes("m", &q("1024")).unwrap(), 1024);
        assert!(quantity_bytes("m", &q("lots")).is_err());
        assert!(quantity_bytes("m", &q("5Xi")).is_err());
    }

    #[test]
    fn bytes_render_in_the_largest_exact_unit() {
        assert_eq!(format_bytes(512 << 20), "512Mi");
        assert_eq!(format_bytes(3 << 30), "3Gi");
        assert_eq!(format_bytes(1000), "1000");
    }

    #[test]
    fn capsule_values_override_template_defaults_one_by_one() {
        let defaults = TemplateDefaults::default();
        let own = CapsuleResources {
            vcpus: Some(2),
            memory: None,
            disk: Some(q("4Gi")),
        };
        let r = effective(Some(&own), &defaults).unwrap();
        assert_eq!(
            r,
            Resources {
                vcpus: 2,
                memory_bytes: 512 << 20,
                disk_bytes: 4 << 30
            }
        );
        assert_eq!(effective(None, &defaults).unwrap().vcpus, 1);
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_duration("d", "90s").unwrap(), Duration::from_secs(90));
        assert_eq!(
            parse_duration("d", "1h30m").unwrap(),
            Duration::from_secs(5400)
        );
        assert_eq!(
            parse_duration("d", "1.5h").unwrap(),
            Duration::from_secs(5400)
        );
        assert_eq!(
            parse_duration("d", "250ms").unwrap(),
            Duration::from_millis(250)
        );
        assert!(parse_duration("d", "2 hours").is_err());
        assert!(parse_duration("d", "5").is_err());
        assert!(parse_duration("d", "").is_err());
    }
}
