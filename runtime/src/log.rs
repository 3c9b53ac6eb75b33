//! How every Wrenn binary logs: the `--log-level` and `--log-format` flags
//! each one flattens into its own, and the subscriber they install. The
//! binary decides what a bad filter costs it (its exit code).

use clap::ValueEnum;

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line.
    Json,
}

/// Logging flags.
#[derive(Clone, Debug, clap::Args)]
pub struct LogArgs {
    /// Log filter, e.g. `info` or `wrenn_operator=debug`.
    #[arg(long, env = "WRENN_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// `plain` or `json`.
    #[arg(long, env = "WRENN_LOG_FORMAT", value_enum, default_value = "plain")]
    pub log_format: LogFormat,
}

impl LogArgs {
    /// Installs the process's tracing subscriber; `Err` names a bad filter.
    pub fn init(&self) -> Result<(), String> {
        let filter = tracing_subscriber::EnvFilter::try_new(&self.log_level)
            .map_err(|err| format!("--log-level {:?}: {err}", self.log_level))?;
        let builder = tracing_subscriber::fmt().with_env_filter(filter);
        match self.log_format {
            LogFormat::Json => builder.json().init(),
            LogFormat::Plain => builder.init(),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Flags {
        #[command(flatten)]
        log: LogArgs,
    }

    #[test]
    fn formats_are_plain_or_json() {
        let f = Flags::try_parse_from(["x"]).unwrap();
        assert_eq!(
            (f.log.log_level.as_str(), f.log.log_format),
            ("info", LogFormat::Plain)
        );
        let f = Flags::try_parse_from(["x", "--log-format", "json"]).unwrap();
        assert_eq!(f.log.log_format, LogFormat::Json);
        assert!(Flags::try_parse_from(["x", "--log-format", "yaml"]).is_err());
    }
}
