//! Roles on the target, recreated from the source's
//! `pg_dumpall --roles-only --no-role-passwords` when asked
//! (`schema.recreate_roles`).
//!
//! Roles the target already has are left alone; superuser roles are not
//! recreated (a managed target refuses them); REPLICATION and BYPASSRLS are
//! dropped from the attributes for the same reason. Passwords never leave the
//! source, so every recreated login role is reported as needing one.
//! Statements are the server-generated SQL of pg_dumpall, run one by one; a
//! failure is reported, not fatal.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use crate::db::Migration;
use crate::schema::PgTools;

/// What happened to the source's roles.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RoleReport {
    /// Roles created on the target.
    pub created: Vec<String>,
    /// Created login roles: set their passwords before the switch.
    pub need_password: Vec<String>,
    /// What was not done, and why.
    pub skipped: Vec<String>,
}

fn unquote(name: &str) -> String {
    match name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
        Some(inner) => inner.replace("\"\"", "\""),
        None => name.to_string(),
    }
}

/// Creates the source's roles that the target lacks.
pub async fn recreate(m: &Migration) -> Result<RoleReport, crate::Error> {
    let tools = PgTools::locate(m.cfg.pg_bin_dir.as_deref()).await?;
    let sql = tools.roles_sql(&m.source).await?;
    let target = m.target_conn().await?;
    let existing: HashSet<String> = target
        .query("SELECT rolname::text FROM pg_roles", &[])
        .await
        .map_err(crate::db::errors::StatementFailed::target)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let attrs: HashMap<&str, &str> = sql
        .lines()
        .filter_map(|l| {
            l.strip_prefix("ALTER ROLE ")?
                .strip_suffix(';')?
                .split_once(" WITH ")
        })
        .collect();
    let mut report = RoleReport::default();
    let mut created: HashSet<String> = HashSet::new();
    for line in sql.lines().map(str::trim) {
        let statement = if let Some(name) = line
            .strip_prefix("CREATE ROLE ")
            .and_then(|n| n.strip_suffix(';'))
        {
            let plain = unquote(name);
            if existing.contains(&plain) {
                continue;
            }
            let tokens: Vec<&str> = attrs
                .get(name)
                .map(|a| a.split_whitespace().collect())
                .unwrap_or_default();
            if tokens.contains(&"SUPERUSER") {
                report.skipped.push(format!(
                    "{plain}: a superuser on the source; create it by hand if it is needed"
                ));
                continue;
            }
            let kept: Vec<&str> = tokens
                .into_iter()
                .filter(|t| !matches!(*t, "REPLICATION" | "BYPASSRLS"))
                .collect();
            if kept.contains(&"LOGIN") {
                report.need_password.push(plain.clone());
            }
            created.insert(name.to_string());
            report.created.push(plain);
            format!("CREATE ROLE {name} WITH {}", kept.join(" "))
        } else if line.starts_with("GRANT ") {
            // Role memberships; the grantor may not exist (or be a superuser).
            match line.find(" GRANTED BY ") {
                Some(i) => line[..i].to_string(),
                None => line.trim_end_matches(';').to_string(),
            }
        } else if let Some(rest) = line
            .strip_prefix("ALTER ROLE ")
            .or_else(|| line.strip_prefix("COMMENT ON ROLE "))
        {
            // Role settings and comments, for the roles created here only.
            let name = rest.split_whitespace().next().unwrap_or_default();
            if rest.contains(" WITH ") || !created.contains(name) {
                continue;
            }
            line.trim_end_matches(';').to_string()
        } else {
            continue;
        };
        if let Err(e) = target.batch_execute(&statement).await {
            let why = crate::db::errors::db_message(&e);
            report.skipped.push(format!("{statement}: {why}"));
        }
    }
    tracing::info!(
        created = report.created.len(),
        skipped = report.skipped.len(),
        "Roles recreated on the target"
    );
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unquotes_role_names() {
        assert_eq!(unquote("app"), "app");
        assert_eq!(unquote("\"Odd \"\"Role\"\"\""), "Odd \"Role\"");
    }
}
