//! `pgferry rds`: create, describe, wait for, snapshot and delete the target
//! RDS instance with aws-sdk-rds.
//!
//! Credentials and region follow the AWS SDK's standard chain (environment,
//! profile, web identity, ECS, IMDS); `AWS_ENDPOINT_URL` points it elsewhere
//! (a local moto_server in the tests). The master password comes from an
//! environment variable or a file, never from argv, and is never printed.

use std::path::PathBuf;
use std::time::Duration;

use aws_sdk_rds::types::Tag;
use aws_sdk_rds::Client;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

/// `pgferry rds ...`.
#[derive(Debug, Clone, clap::Args)]
pub struct RdsArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: RdsAction,
}

/// The `rds` actions.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum RdsAction {
    /// Create the target instance (gp3, encrypted, not public).
    Create(Box<CreateArgs>),
    /// Show an instance's status, endpoint and settings.
    Describe {
        /// Instance identifier.
        #[arg(long)]
        id: String,
    },
    /// Wait until the instance is available, then show its endpoint.
    Wait {
        /// Instance identifier.
        #[arg(long)]
        id: String,
        /// Give up after this long.
        #[arg(long, default_value_t = 3600)]
        timeout_secs: u64,
    },
    /// Take a manual snapshot (before the cutover, say).
    Snapshot {
        /// Instance identifier.
        #[arg(long)]
        id: String,
        /// Snapshot identifier; default `<id>-pgferry-<unix time>`.
        #[arg(long)]
        snapshot_id: Option<String>,
    },
    /// Delete the instance.
    Delete {
        /// Instance identifier.
        #[arg(long)]
        id: String,
        /// Keep a final snapshot with this identifier.
        #[arg(long, conflicts_with = "skip_final_snapshot")]
        final_snapshot_id: Option<String>,
        /// Delete without a final snapshot.
        #[arg(long)]
        skip_final_snapshot: bool,
    },
}

/// `rds create` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct CreateArgs {
    /// Instance identifier.
    #[arg(long)]
    pub id: String,
    /// Instance class; default: from the source's size, like `check` suggests.
    #[arg(long)]
    pub class: Option<String>,
    /// Allocated storage in GB; default: twice the source's data, at least 20.
    #[arg(long)]
    pub storage_gb: Option<i32>,
    /// PostgreSQL engine version; default: the source's major version.
    #[arg(long)]
    pub engine_version: Option<String>,
    /// Standby in a second availability zone.
    #[arg(long)]
    pub multi_az: bool,
    /// Master user name.
    #[arg(long, default_value = "rds_master")]
    pub master_user: String,
    /// Environment variable holding the master password.
    #[arg(long, default_value = "PGFERRY_RDS_MASTER_PASSWORD")]
    pub master_password_env: String,
    /// File holding the master password (instead of the environment).
    #[arg(long)]
    pub master_password_file: Option<PathBuf>,
    /// Database to create on the instance.
    #[arg(long)]
    pub db_name: Option<String>,
    /// DB subnet group.
    #[arg(long)]
    pub subnet_group: Option<String>,
    /// VPC security group id (repeatable).
    #[arg(long = "security-group")]
    pub security_groups: Vec<String>,
    /// Tag `key=value` (repeatable).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
}

/// RDS failures.
#[derive(Debug, thiserror::Error)]
pub enum RdsError {
    /// A call to the RDS API failed.
    #[error("RDS {call} failed")]
    Api {
        /// Which call.
        call: &'static str,
        /// The SDK's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Input that cannot work.
    #[error("{0}")]
    Invalid(String),
    /// The instance is not there.
    #[error("no RDS instance {0}")]
    NotFound(String),
}

impl crate::error::Failure for RdsError {
    fn exit_code(&self) -> crate::error::ExitCode {
        match self {
            RdsError::Invalid(_) => crate::error::ExitCode::Usage,
            _ => crate::error::ExitCode::Runtime,
        }
    }
}

fn api<E: std::error::Error + Send + Sync + 'static>(call: &'static str) -> impl FnOnce(E) -> RdsError {
    move |e| RdsError::Api {
        call,
        source: Box::new(e),
    }
}

/// What pgferry reports about an instance.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceInfo {
    /// Identifier.
    pub id: String,
    /// `creating`, `available`, ...
    pub status: Option<String>,
    /// `host:port`, once known.
    pub endpoint: Option<String>,
    /// Instance class.
    pub class: Option<String>,
    /// Allocated storage.
    pub storage_gb: Option<i32>,
    /// Storage type.
    pub storage_type: Option<String>,
    /// Engine version.
    pub engine_version: Option<String>,
    /// Multi-AZ.
    pub multi_az: Option<bool>,
    /// Tags.
    pub tags: Vec<(String, String)>,
    /// Manual snapshots of the instance.
    pub snapshots: Vec<String>,
}

/// Builds the SDK client: standard credential and region chain, rustls.
async fn client() -> Client {
    use aws_smithy_http_client::tls;
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring))
        .build_https();
    let cfg = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(http)
        .load()
        .await;
    Client::new(&cfg)
}

fn password(args: &CreateArgs) -> Result<SecretString, RdsError> {
    let raw = match &args.master_password_file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| RdsError::Invalid(format!("cannot read the master password file {}: {e}", path.display())))?
            .trim_end_matches(['\n', '\r'])
            .to_string(),
        None => std::env::var(&args.master_password_env).map_err(|_| {
            RdsError::Invalid(format!(
                "set the master password in ${} (or pass --master-password-file); it is never taken from the command line",
                args.master_password_env
            ))
        })?,
    };
    if raw.len() < 8 || raw.contains(['/', '"', '@', ' ']) {
        return Err(RdsError::Invalid(
            "the master password must have at least 8 characters and no '/', '\"', '@' or space (RDS rules)"
                .into(),
        ));
    }
    Ok(raw.into())
}

fn parse_tags(tags: &[String]) -> Result<Vec<Tag>, RdsError> {
    tags.iter()
        .map(|t| {
            let (k, v) = t
                .split_once('=')
                .ok_or_else(|| RdsError::Invalid(format!("tag {t:?} is not key=value")))?;
            Ok(Tag::builder().key(k).value(v).build())
        })
        .collect()
}

/// Defaults taken from the source: its major version and the storage the
/// sizing advice gives for it.
pub struct SourceDefaults {
    /// e.g. "15".
    pub engine_version: String,
    /// Twice the data, at least 20.
    pub storage_gb: i32,
    /// The class `check` suggests.
    pub class: &'static str,
}

/// Reads the defaults from the source, when one is configured.
pub async fn source_defaults(source: &crate::db::endpoint::Endpoint) -> Result<SourceDefaults, crate::Error> {
    let c = source.connect().await?;
    let row = c
        .query_one(
            "SELECT current_setting('server_version_num')::int4 / 10000, pg_database_size(current_database())",
            &[],
        )
        .await
        .map_err(crate::db::errors::StatementFailed::source)?;
    let (major, bytes): (i32, i64) = (row.get(0), row.get(1));
    Ok(SourceDefaults {
        engine_version: major.to_string(),
        storage_gb: crate::plan::recommended_storage_gb(bytes) as i32,
        class: crate::plan::suggested_instance_class(bytes),
    })
}

/// Runs an `rds` action.
pub async fn run(args: &RdsArgs, defaults: Option<SourceDefaults>) -> Result<InstanceInfo, crate::Error> {
    let client = client().await;
    match &args.action {
        RdsAction::Create(a) => {
            let password = password(a)?;
            let class = a.class.clone().or(defaults.as_ref().map(|d| d.class.to_string()));
            let storage = a.storage_gb.or(defaults.as_ref().map(|d| d.storage_gb));
            let version = a
                .engine_version
                .clone()
                .or(defaults.as_ref().map(|d| d.engine_version.clone()));
            let (Some(class), Some(storage), Some(version)) = (class, storage, version) else {
                return Err(RdsError::Invalid(
                    "give --class, --storage-gb and --engine-version, or a --source to derive them from"
                        .into(),
                )
                .into());
            };
            client
                .create_db_instance()
                .db_instance_identifier(&a.id)
                .db_instance_class(class)
                .engine("postgres")
                .engine_version(version)
                .allocated_storage(storage)
                .storage_type("gp3")
                .storage_encrypted(true)
                .publicly_accessible(false)
                .multi_az(a.multi_az)
                .master_username(&a.master_user)
                .master_user_password(password.expose_secret())
                .set_db_name(a.db_name.clone())
                .set_db_subnet_group_name(a.subnet_group.clone())
                .set_vpc_security_group_ids(
                    (!a.security_groups.is_empty()).then(|| a.security_groups.clone()),
                )
                .set_tags(Some(parse_tags(&a.tags)?))
                .send()
                .await
                .map_err(api("CreateDBInstance"))?;
            tracing::info!(id = %a.id, "RDS instance requested");
            Ok(describe(&client, &a.id).await?)
        }
        RdsAction::Describe { id } => Ok(describe(&client, id).await?),
        RdsAction::Wait { id, timeout_secs } => {
            let deadline = std::time::Instant::now() + Duration::from_secs(*timeout_secs);
            loop {
                let info = describe(&client, id).await?;
                if info.status.as_deref() == Some("available") && info.endpoint.is_some() {
                    return Ok(info);
                }
                if std::time::Instant::now() >= deadline {
                    return Err(RdsError::Invalid(format!(
                        "{id} is still {} after {timeout_secs} s",
                        info.status.unwrap_or_default()
                    ))
                    .into());
                }
                tracing::info!(
                    id,
                    status = info.status.as_deref().unwrap_or("?"),
                    "Waiting for the instance"
                );
                tokio::time::sleep(Duration::from_secs(15)).await;
            }
        }
        RdsAction::Snapshot { id, snapshot_id } => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let sid = snapshot_id
                .clone()
                .unwrap_or_else(|| format!("{id}-pgferry-{now}"));
            client
                .create_db_snapshot()
                .db_instance_identifier(id)
                .db_snapshot_identifier(&sid)
                .send()
                .await
                .map_err(api("CreateDBSnapshot"))?;
            tracing::info!(id, snapshot = %sid, "Snapshot requested");
            Ok(describe(&client, id).await?)
        }
        RdsAction::Delete {
            id,
            final_snapshot_id,
            skip_final_snapshot,
        } => {
            if final_snapshot_id.is_none() && !skip_final_snapshot {
                return Err(RdsError::Invalid(
                    "say --final-snapshot-id NAME to keep a final snapshot, or --skip-final-snapshot".into(),
                )
                .into());
            }
            let info = describe(&client, id).await?;
            client
                .delete_db_instance()
                .db_instance_identifier(id)
                .skip_final_snapshot(*skip_final_snapshot)
                .set_final_db_snapshot_identifier(final_snapshot_id.clone())
                .send()
                .await
                .map_err(api("DeleteDBInstance"))?;
            tracing::info!(id, "RDS instance deletion requested");
            Ok(info)
        }
    }
}

async fn describe(client: &Client, id: &str) -> Result<InstanceInfo, RdsError> {
    let out = client
        .describe_db_instances()
        .db_instance_identifier(id)
        .send()
        .await
        .map_err(|e| match e.as_service_error() {
            Some(s) if s.is_db_instance_not_found_fault() => RdsError::NotFound(id.to_string()),
            _ => api("DescribeDBInstances")(e),
        })?;
    let db = out
        .db_instances()
        .first()
        .ok_or_else(|| RdsError::NotFound(id.to_string()))?;
    let snapshots = client
        .describe_db_snapshots()
        .db_instance_identifier(id)
        .snapshot_type("manual")
        .send()
        .await
        .map_err(api("DescribeDBSnapshots"))?
        .db_snapshots()
        .iter()
        .filter_map(|s| s.db_snapshot_identifier().map(str::to_string))
        .collect();
    Ok(InstanceInfo {
        id: id.to_string(),
        status: db.db_instance_status().map(str::to_string),
        endpoint: db
            .endpoint()
            .and_then(|e| Some(format!("{}:{}", e.address()?, e.port().unwrap_or(5432)))),
        class: db.db_instance_class().map(str::to_string),
        storage_gb: db.allocated_storage(),
        storage_type: db.storage_type().map(str::to_string),
        engine_version: db.engine_version().map(str::to_string),
        multi_az: db.multi_az(),
        tags: db
            .tag_list()
            .iter()
            .filter_map(|t| Some((t.key()?.to_string(), t.value()?.to_string())))
            .collect(),
        snapshots,
    })
}

impl InstanceInfo {
    /// The report as an operator reads it.
    pub fn render(&self) -> String {
        format!(
            "{}: {} {} {} GB {} postgres {} multi-az={} endpoint {}\nsnapshots: {}\n",
            self.id,
            self.status.as_deref().unwrap_or("?"),
            self.class.as_deref().unwrap_or("?"),
            self.storage_gb.unwrap_or_default(),
            self.storage_type.as_deref().unwrap_or("?"),
            self.engine_version.as_deref().unwrap_or("?"),
            self.multi_az.unwrap_or(false),
            self.endpoint.as_deref().unwrap_or("(not yet)"),
            if self.snapshots.is_empty() {
                "none".into()
            } else {
                self.snapshots.join(", ")
            }
        )
    }
}
