//! Logs: `tracing` events on stderr (the journal under systemd), filtered
//! like `RUST_LOG` (default `info` for `lb run`, `warn` for other commands),
//! as text or, for log shippers, one JSON object per line. Every health
//! transition, reload, refused change and announcement change is one event
//! with its fields (`vip`, `backend`, `reason`, ...).

use std::str::FromStr;

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `fields`, ...).
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("log format `{other}`: expected text or json")),
        }
    }
}

/// Installs the process's subscriber: `RUST_LOG` if set (e.g.
/// `RUST_LOG=lb_user=debug`), else `default_level`. A second call (tests
/// running several agents in one process) keeps the first subscriber.
pub fn init(format: LogFormat, default_level: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours for a terminal only, not for the journal or a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
