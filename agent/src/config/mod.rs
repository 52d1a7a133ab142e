//! Configuration: defaults, then a TOML file, then `PGFERRY_*` environment
//! variables, then command-line flags.
//!
//! Field names carry their units; each doc comment states the default. Unknown
//! keys are errors, so a typo never becomes a silent no-op. Connection URLs may
//! carry passwords and are kept as [`SecretString`] with a redacted `Debug`.

use std::path::{Path, PathBuf};

use secrecy::SecretString;
use serde::Deserialize;

mod sections;

pub use sections::{
    CopyConfig, CopyMethod, CutoverConfig, MatviewRefresh, MetricsConfig, SchemaConfig, SourceLimits,
    SyncConfig, ToastCompression, VerifyScope,
};

/// Configuration problems; all map to exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or environment could not be read or parsed.
    #[error("invalid configuration")]
    Load(#[source] config::ConfigError),
    /// A value is present but unusable.
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// A required value is missing.
    #[error("missing {what}: {how}")]
    Missing {
        /// What is missing.
        what: &'static str,
        /// How to provide it.
        how: &'static str,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// libpq URL of the source (the production database). No default.
    #[serde(default)]
    pub source: Option<SecretString>,
    /// libpq URL of the target (the RDS/Aurora database). No default.
    #[serde(default)]
    pub target: Option<SecretString>,
    /// Directory holding `pg_dump`/`pg_restore`; default: `PATH`, then the newest
    /// `/usr/lib/postgresql/*/bin`.
    #[serde(default)]
    pub pg_bin_dir: Option<PathBuf>,
    /// Connection budget and lock behaviour on the source.
    #[serde(default)]
    pub source_limits: SourceLimits,
    /// Bulk copy settings.
    #[serde(default)]
    pub copy: CopyConfig,
    /// Delta drain settings.
    #[serde(default)]
    pub sync: SyncConfig,
    /// Cutover settings.
    #[serde(default)]
    pub cutover: CutoverConfig,
    /// Prometheus metrics.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// What of the schema beyond tables moves.
    #[serde(default)]
    pub schema: SchemaConfig,
    /// Tables (`schema.table`) copied whole while writes are fenced instead of
    /// synced: for tables without a primary key or unique NOT NULL index.
    /// Their copy time is write downtime; `check` estimates it. A TOML list,
    /// or comma-separated in `PGFERRY_COPY_ONLY`. Default none.
    #[serde(default, deserialize_with = "list")]
    pub copy_only: Vec<String>,
    /// Copy large objects (with their OIDs) during the cutover and verify
    /// them. Their writes cannot be fenced: the application must not write
    /// large objects during the cutover. Default false (check refuses them).
    #[serde(default)]
    pub large_objects: bool,
}

/// A list given as a sequence (TOML) or a comma-separated string (env).
pub(crate) fn list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Seq(Vec<String>),
        Text(String),
    }
    Ok(match Either::deserialize(d)? {
        Either::Seq(v) => v,
        Either::Text(s) => s
            .split(',')
            .map(str::trim)
            .filter(|x| !x.is_empty())
            .map(str::to_string)
            .collect(),
    })
}

/// `PGFERRY_*` variables that are not configuration keys.
pub const RESERVED_ENV: &[&str] = &[
    "PGFERRY_LOG",
    "PGFERRY_FAILPOINTS",
    "PGFERRY_FAILPOINT_RELEASE",
    "PGFERRY_TARGET_URL",
    "PGFERRY_RDS_MASTER_PASSWORD",
];

/// The process environment minus the reserved variables.
fn config_env() -> config::Map<String, String> {
    std::env::vars()
        .filter(|(k, _)| k.starts_with("PGFERRY_") && !RESERVED_ENV.contains(&k.as_str()))
        .collect()
}

/// A load error as the operator can act on it, and without a secret: a
/// TOML syntax error keeps its position and reason but not the quoted line
/// (it may hold a URL with its password); an unknown key names the
/// `PGFERRY_*` variable it came from and the nearest valid one.
fn explain_load_error(e: config::ConfigError, env: &config::Map<String, String>) -> ConfigError {
    match e {
        config::ConfigError::FileParse { uri, cause } => {
            let reason: Vec<String> = cause
                .to_string()
                .lines()
                .filter(|l| {
                    let t = l.trim_start();
                    !(t.starts_with('|')
                        || t.split_once('|')
                            .is_some_and(|(n, _)| n.trim().parse::<u32>().is_ok()))
                })
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty())
                .collect();
            ConfigError::Invalid(format!(
                "the config file {} is not valid TOML: {}",
                uri.unwrap_or_default(),
                reason.join(": ")
            ))
        }
        other => {
            let text = other.to_string();
            let Some(field) = text
                .split_once("unknown field `")
                .and_then(|(_, rest)| rest.split_once('`'))
                .map(|(f, _)| f.to_string())
            else {
                return ConfigError::Load(other);
            };
            let expected: Vec<String> = text
                .split_once("expected ")
                .map(|(_, rest)| rest.split('`').skip(1).step_by(2).map(str::to_string).collect())
                .unwrap_or_default();
            let nearest = expected.iter().min_by_key(|x| edit_distance(x, &field)).cloned();
            let variable = env.keys().find(|k| {
                k.strip_prefix("PGFERRY_")
                    .is_some_and(|rest| rest.to_lowercase().rsplit("__").next() == Some(field.as_str()))
            });
            match (variable, nearest) {
                (Some(var), Some(near)) => {
                    let prefix = var
                        .rsplit_once("__")
                        .map_or("PGFERRY_".to_string(), |(p, _)| format!("{p}__"));
                    ConfigError::Invalid(format!(
                        "environment variable {var} is not a setting: did you mean {prefix}{}?",
                        near.to_uppercase()
                    ))
                }
                (Some(var), None) => {
                    ConfigError::Invalid(format!("environment variable {var} is not a setting"))
                }
                (None, Some(near)) => ConfigError::Invalid(format!(
                    "unknown setting `{field}` in the config file: did you mean `{near}`?"
                )),
                (None, None) => ConfigError::Invalid(format!("unknown setting `{field}`")),
            }
        }
    }
}

/// Levenshtein distance, for suggesting the nearest setting.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// Values given on the command line; they win over file and environment.
#[derive(Debug, Default)]
pub struct Overrides {
    /// `--source`.
    pub source: Option<SecretString>,
    /// `--target`.
    pub target: Option<SecretString>,
}

impl Config {
    /// Loads file (if any), then `PGFERRY_*` variables, then the overrides.
    ///
    /// Environment keys use `__` between sections: `PGFERRY_COPY__WORKERS=8`,
    /// `PGFERRY_SOURCE=postgres://...`.
    pub fn load(file: Option<&Path>, overrides: Overrides) -> Result<Self, ConfigError> {
        Self::load_from(file, overrides, config_env())
    }

    /// [`Config::load`] with the `PGFERRY_*` variables given.
    fn load_from(
        file: Option<&Path>,
        overrides: Overrides,
        env: config::Map<String, String>,
    ) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::Invalid(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
        }
        // No try_parsing: it would turn a password "007" into the number 7.
        builder = builder.add_source(
            config::Environment::with_prefix("PGFERRY")
                .prefix_separator("_")
                .separator("__")
                .ignore_empty(true)
                .source(Some(env.clone())),
        );
        let mut cfg: Config = builder
            .build()
            .and_then(config::Config::try_deserialize)
            .map_err(|e| explain_load_error(e, &env))?;
        if overrides.source.is_some() {
            cfg.source = overrides.source;
        }
        if overrides.target.is_some() {
            cfg.target = overrides.target;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the values that the types alone do not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if self.copy.workers == 0 {
            problems.push("copy.workers must be at least 1");
        }
        if self.copy.max_parts == Some(0) {
            problems.push("copy.max_parts must be at least 1");
        }
        if self.sync.recopy_fraction.is_nan() || self.sync.recopy_fraction < 0.0 {
            problems.push("sync.recopy_fraction must be 0 (never) or more");
        }
        if self.sync.workers == 0 {
            problems.push("sync.workers must be at least 1");
        }
        if self.source_limits.max_connections < 2 {
            problems.push("source_limits.max_connections must be at least 2 (one control, one worker)");
        }
        if self.source_limits.lock_timeout_ms == 0 {
            problems.push("source_limits.lock_timeout_ms must be positive: 0 would let DDL wait forever and queue the application behind it");
        }
        if self.cutover.max_keys_under_fence < 0 {
            problems.push("cutover.max_keys_under_fence must be 0 or more");
        }
        if self.source_limits.trigger_lock_timeout_ms == 0 {
            problems.push("source_limits.trigger_lock_timeout_ms must be positive: 0 would let trigger DDL wait forever and queue the application behind it");
        }
        let metrics = self.metrics.address().err().map(|e| e.to_string());
        if let Some(m) = &metrics {
            problems.push(m);
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems.join("; ")))
        }
    }

    /// The source URL, or the error telling how to give it.
    pub fn source_url(&self) -> Result<&SecretString, ConfigError> {
        self.source.as_ref().ok_or(ConfigError::Missing {
            what: "source URL",
            how: "pass --source URL, set PGFERRY_SOURCE, or put source = \"...\" in the config file",
        })
    }

    /// The target URL, or the error telling how to give it.
    pub fn target_url(&self) -> Result<&SecretString, ConfigError> {
        self.target.as_ref().ok_or(ConfigError::Missing {
            what: "target URL",
            how: "pass --target URL, set PGFERRY_TARGET, or put target = \"...\" in the config file",
        })
    }

    /// Source workers available after the control connection is set aside.
    pub fn source_worker_budget(&self) -> usize {
        self.source_limits.max_connections.saturating_sub(1).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn write(text: &str) -> tempfile::NamedTempFile {
        use std::io::Write;
        let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn a_toml_error_keeps_its_place_and_loses_its_line() {
        let f = write("[cutover]\nswitch_command = 'x'\nsource = \"postgres://app:hunter2@db/app\n");
        let err = Config::load(Some(f.path()), Overrides::default()).unwrap_err();
        let text = crate::db::errors::report(&err);
        assert!(
            text.contains("not valid TOML") && text.contains("line 3"),
            "{text}"
        );
        assert!(!text.contains("hunter2"), "{text}");
    }

    #[test]
    fn an_unknown_key_names_its_variable_and_the_nearest_setting() {
        let env: config::Map<String, String> =
            [("PGFERRY_SOURCES".to_string(), "postgres://a@h/d".to_string())].into();
        let err = Config::load_from(None, Overrides::default(), env).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: environment variable PGFERRY_SOURCES is not a setting: did you mean PGFERRY_SOURCE?"
        );
        let env: config::Map<String, String> =
            [("PGFERRY_COPY__WORKRES".to_string(), "4".to_string())].into();
        let err = Config::load_from(None, Overrides::default(), env).unwrap_err();
        assert!(
            err.to_string().contains("PGFERRY_COPY__WORKRES")
                && err.to_string().contains("PGFERRY_COPY__WORKERS"),
            "{err}"
        );
        let f = write("[sync]\npoll_interval = 5\n");
        let err = Config::load_from(Some(f.path()), Overrides::default(), Default::default()).unwrap_err();
        assert!(
            err.to_string().contains("`poll_interval`") && err.to_string().contains("`poll_interval_ms`"),
            "{err}"
        );
    }

    #[test]
    fn defaults_then_file_then_overrides() {
        let f = write("source = \"postgres://a@h/db\"\n[copy]\nworkers = 3\n");
        let cfg = Config::load(
            Some(f.path()),
            Overrides {
                target: Some("postgres://t@h/db".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(cfg.copy.workers, 3);
        assert_eq!(cfg.sync.workers, 2);
        assert_eq!(cfg.cutover.verify, VerifyScope::Changed);
        assert_eq!(cfg.source.unwrap().expose_secret(), "postgres://a@h/db");
        assert_eq!(cfg.target.unwrap().expose_secret(), "postgres://t@h/db");
    }

    #[test]
    fn the_verification_scope_is_full_or_changed() {
        let f = write("[cutover]\nverify = \"full\"\n");
        let cfg = Config::load(Some(f.path()), Overrides::default()).unwrap();
        assert_eq!(cfg.cutover.verify, VerifyScope::Full);
        let f = write("[cutover]\nverify = \"some\"\n");
        assert!(Config::load(Some(f.path()), Overrides::default()).is_err());
    }

    #[test]
    fn materialized_views_are_refreshed_fenced_unless_after_the_switch() {
        let f = write("");
        let cfg = Config::load(Some(f.path()), Overrides::default()).unwrap();
        assert_eq!(cfg.cutover.materialized_views, MatviewRefresh::Fenced);
        let f = write("[cutover]\nmaterialized_views = \"after_switch\"\n");
        let cfg = Config::load(Some(f.path()), Overrides::default()).unwrap();
        assert_eq!(cfg.cutover.materialized_views, MatviewRefresh::AfterSwitch);
    }

    #[test]
    fn unknown_keys_are_errors() {
        let f = write("[copy]\nwrokers = 3\n");
        let err = Config::load(Some(f.path()), Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("did you mean `workers`"), "{err:?}");
    }

    #[test]
    fn bad_values_are_refused() {
        let f = write(
            "[copy]\nworkers = 0\n[sync]\nrecopy_fraction = -1.0\n[source_limits]\nlock_timeout_ms = 0\n",
        );
        let err = Config::load(Some(f.path()), Overrides::default()).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("copy.workers"), "{text}");
        assert!(text.contains("sync.recopy_fraction"), "{text}");
        assert!(text.contains("lock_timeout_ms"), "{text}");
    }

    #[test]
    fn lists_take_a_sequence_or_a_comma_separated_string() {
        let f = write("copy_only = [\"public.a\", \"s.b\"]\n");
        assert_eq!(
            Config::load(Some(f.path()), Overrides::default())
                .unwrap()
                .copy_only,
            ["public.a", "s.b"]
        );
        // What PGFERRY_COPY_ONLY=... arrives as.
        let f = write("copy_only = \"public.a, s.b,\"\n");
        assert_eq!(
            Config::load(Some(f.path()), Overrides::default())
                .unwrap()
                .copy_only,
            ["public.a", "s.b"]
        );
    }

    #[test]
    fn secrets_do_not_print() {
        let cfg = Config {
            source: Some("postgres://u:hunter2@h/db".into()),
            ..Default::default()
        };
        assert!(!format!("{cfg:?}").contains("hunter2"));
    }
}
