//! `funnelhouse.toml`: one typed struct, every field with its default. Flags beat
//! environment variables beat the file; unknown keys are an error naming key and file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use funnelhouse_ingest::HttpConfig;
use funnelhouse_query::CampaignConfig;
use funnelhouse_schemas::AuthConfig;
use funnelhouse_schemas::units::{ByteSize, de_duration};
use funnelhouse_storage::{IngestConfig, StorageConfig};
use serde::Deserialize;

use crate::error::CliError;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the WAL, Parquet files and manifest live. Default `"./data"`.
    pub data_dir: PathBuf,
    /// HTTP listen address; port 0 binds a free port. Default `"127.0.0.1:8080"`.
    pub http_addr: String,
    /// Postgres wire listen address. Default `"127.0.0.1:5433"`.
    pub pg_addr: String,
    /// Write keys and read tokens. Default: none required.
    pub auth: AuthConfig,
    pub http: HttpConfig,
    pub ingest: IngestConfig,
    pub query: QueryConfig,
    /// Parquet on S3-compatible object storage shared by several collectors. Default:
    /// absent, Parquet stays in `<data_dir>/events`.
    pub storage: StorageConfig,
    /// Named campaign funnels, targets and alerts. Default none.
    pub campaigns: Vec<CampaignConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data"),
            http_addr: "127.0.0.1:8080".into(),
            pg_addr: "127.0.0.1:5433".into(),
            auth: AuthConfig::default(),
            http: HttpConfig::default(),
            ingest: IngestConfig::default(),
            query: QueryConfig::default(),
            storage: StorageConfig::default(),
            campaigns: Vec::new(),
        }
    }
}

/// `[query]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueryConfig {
    /// A query running longer is cancelled. Default `"60s"`.
    #[serde(deserialize_with = "de_duration")]
    pub timeout: Duration,
    /// Memory pool for queries; sorts, aggregations and funnels spill past it. Below 1 GiB
    /// the process also does without transparent huge pages, for a tighter RSS. Default
    /// `"8GiB"`.
    pub memory_limit: ByteSize,
    /// SQL results stop at this many rows and say so (JSON: `"truncated": true`).
    /// Default 1 000 000.
    pub max_result_rows: usize,
    /// A Ballista scheduler (`"df://HOST:PORT"`) to run SQL and funnels on, over the
    /// committed files. Default none: in this process.
    pub ballista: Option<String>,
    /// `ballista` as a session upgrade, made when the config is loaded.
    #[serde(skip)]
    pub distribute: Option<funnelhouse_query::Distribute>,
}

impl Default for QueryConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(60),
            memory_limit: ByteSize(8 << 30),
            max_result_rows: 1_000_000,
            ballista: None,
            distribute: None,
        }
    }
}

/// Values given as flags or environment variables (clap has already merged those two).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub data_dir: Option<PathBuf>,
    pub http_addr: Option<String>,
    pub pg_addr: Option<String>,
}

impl Config {
    /// Read the file (when given), apply overrides, validate.
    pub fn load(file: Option<&Path>, overrides: Overrides) -> Result<Config, CliError> {
        let mut cfg = match file {
            None => Config::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    CliError::Config(format!("{}: cannot read: {e}", path.display()))
                })?;
                toml::from_str(&text)
                    .map_err(|e| CliError::Config(format!("{}: {e}", path.display())))?
            }
        };
        if let Some(d) = overrides.data_dir {
            cfg.data_dir = d;
        }
        if let Some(a) = overrides.http_addr {
            cfg.http_addr = a;
        }
        if let Some(a) = overrides.pg_addr {
            cfg.pg_addr = a;
        }
        let origin = file.map_or("defaults".to_string(), |p| p.display().to_string());
        cfg.validate()
            .map_err(|e| CliError::Config(format!("{origin}: {e}")))?;
        cfg.query.distribute = (cfg.query.ballista.as_deref())
            .map(funnelhouse_cluster::distribute)
            .transpose()
            .map_err(|e| CliError::Config(format!("{origin}: query.ballista: {e}")))?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        for (key, addr) in [("http_addr", &self.http_addr), ("pg_addr", &self.pg_addr)] {
            addr.parse::<std::net::SocketAddr>().map_err(|_| {
                format!("{key}: {addr:?} is not an address like \"127.0.0.1:8080\"")
            })?;
        }
        self.ingest.validate()?;
        self.http.validate()?;
        self.storage.validate()?;
        if self.query.max_result_rows == 0 {
            return Err("query.max_result_rows: must be at least 1".into());
        }
        self.check_exposure()?;
        let mut names = std::collections::HashSet::new();
        for c in &self.campaigns {
            if !names.insert(&c.name) {
                return Err(format!("campaigns: {:?} is defined twice", c.name));
            }
            c.validate()?;
        }
        Ok(())
    }
}

impl Config {
    /// A collector open to the network with neither keys nor tokens takes anyone's
    /// events and answers anyone's queries: only with `[auth] open = true`.
    fn check_exposure(&self) -> Result<(), String> {
        let Ok(addr) = self.http_addr.parse::<std::net::SocketAddr>() else {
            return Ok(());
        };
        let unguarded = self.auth.write_keys.is_empty() && self.auth.read_tokens.is_empty();
        if unguarded && !addr.ip().is_loopback() && !self.auth.open {
            return Err(format!(
                "http_addr: {addr} is reachable from other machines and [auth] has no write_keys or read_tokens; add keys, or set [auth] open = true if that is meant"
            ));
        }
        Ok(())
    }

    /// Campaign -> landing URL, the campaigns scan links may name.
    pub fn landing_pages(&self) -> std::collections::HashMap<String, Option<String>> {
        self.campaigns
            .iter()
            .map(|c| (c.name.clone(), c.landing_url.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_contract_example_parses() {
        let text = r#"
data_dir = "./data"
http_addr = "127.0.0.1:8080"
pg_addr = "127.0.0.1:5433"
[auth]
write_keys = ["wk_live_1"]
read_tokens = ["rt_1"]
[ingest]
dedup_window = "24h"
dedup_max_ids = 100000000
max_request_bytes = "8MiB"
max_event_bytes = "32KiB"
max_future = "off"
partition = "day"
[query]
timeout = "60s"
memory_limit = "8GiB"
[http]
cors_origins = ["*"]
[storage]
url = "s3://bucket/prefix"
endpoint = "http://127.0.0.1:9000"
region = "us-east-1"
allow_http = true
[[campaigns]]
name = "parcel-lottery"
landing_url = "https://shop.example/lottery"
start = "2026-11-01T00:00:00Z"
end = "2026-11-30T00:00:00Z"
[campaigns.funnel]
steps = ["package", "scan", "view", {event = "draw", where = {prize = "gold"}}]
window = "24h"
[campaigns.targets.jd]
package = 50000
scan = 20000
[[campaigns.alerts]]
step = "scan"
min_step_conversion = 0.3
over = "1h"
min_users = 30
webhook = "http://127.0.0.1:9000/hook"
"#;
        let cfg: Config = toml::from_str(text).unwrap();
        assert_eq!(cfg.ingest.max_request_bytes.0, 8 << 20);
        assert_eq!(cfg.storage.validate(), Ok(()));
        assert_eq!(
            cfg.storage.bucket_and_prefix().unwrap(),
            ("bucket", "prefix")
        );
        assert_eq!(cfg.campaigns[0].funnel.as_ref().unwrap().steps.len(), 4);
        cfg.validate().unwrap();
    }

    #[test]
    fn a_ballista_address_without_a_port_is_refused_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("funnelhouse.toml");
        for (value, ok) in [("df://127.0.0.1:50050", true), ("df://scheduler", false)] {
            std::fs::write(&path, format!("[query]\nballista = \"{value}\"\n")).unwrap();
            match Config::load(Some(&path), Overrides::default()) {
                Ok(cfg) => assert!(ok && cfg.query.distribute.is_some(), "{value} loaded"),
                Err(e) => {
                    let e = e.to_string();
                    assert!(
                        !ok && e.contains("query.ballista") && e.contains(value),
                        "{e}"
                    );
                }
            }
        }
    }

    #[test]
    fn unknown_keys_name_the_key_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("funnelhouse.toml");
        std::fs::write(&path, "[ingest]\nmax_request_byte = \"1MiB\"\n").unwrap();
        let err = Config::load(Some(&path), Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("max_request_byte") && err.contains("funnelhouse.toml"),
            "{err}"
        );
    }
}
