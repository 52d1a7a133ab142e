//! What libpq users rely on beyond the URL, applied as libpq applies it, so
//! that pgferry's own sessions and its `pg_dump`/`pg_restore` children
//! authenticate the same way.
//!
//! A parameter missing from the URL comes, in this order, from the service
//! named by `service=` or `PGSERVICE` (in `PGSERVICEFILE` or
//! `~/.pg_service.conf`, then `PGSYSCONFDIR/pg_service.conf` or
//! `/etc/postgresql-common/pg_service.conf`), from the environment
//! (`PGHOST`, `PGPORT`, `PGUSER`, `PGDATABASE`, `PGPASSWORD`, `PGSSLMODE`,
//! `PGSSLROOTCERT`), and from libpq's defaults (the socket directory, the
//! operating-system user). A password still missing is looked up in the
//! password file (`PGPASSFILE` or `~/.pgpass`), which, as libpq does, is
//! ignored when others may read it. The result is a URL with those
//! parameters in its query; it is a secret like the URL it came from.

use std::path::{Path, PathBuf};

/// Where libpq's environment is read from: the process's, or a test's.
pub trait Environment {
    /// The variable's value, if set and not empty.
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Environment for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

/// libpq's socket directory on Debian and its derivatives.
const DEFAULT_SOCKET_DIR: &str = "/var/run/postgresql";

/// The parameters filled from outside the URL, by name.
const FILLED: &[(&str, &str)] = &[
    ("host", "PGHOST"),
    ("port", "PGPORT"),
    ("user", "PGUSER"),
    ("dbname", "PGDATABASE"),
    ("password", "PGPASSWORD"),
    ("sslmode", "PGSSLMODE"),
    ("sslrootcert", "PGSSLROOTCERT"),
];

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Fills in what the URL leaves out (see the module's doc). The errors name
/// files and services, never a value.
pub fn with_defaults(url: &str, env: &impl Environment) -> Result<String, String> {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut service = None;
    let mut kept: Vec<&str> = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("service", v)) => service = Some(crate::db::tls::decode(v)),
            _ => kept.push(pair),
        }
    }
    let in_query = |key: &str| {
        kept.iter()
            .any(|p| p.split_once('=').map_or(*p, |(k, _)| k) == key)
    };
    // What the URL itself names: parsed by the driver, TLS parameters aside.
    let rest = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    let Ok((driver_url, _)) = crate::db::tls::split_url(&rest) else {
        return Ok(rest);
    };
    let Ok(cfg) = driver_url.parse::<tokio_postgres::Config>() else {
        // The caller reports what is wrong with it.
        return Ok(rest);
    };
    let missing = |key: &str| match key {
        "host" => cfg.get_hosts().is_empty(),
        "port" => cfg.get_ports().is_empty(),
        "user" => cfg.get_user().is_none(),
        "dbname" => cfg.get_dbname().is_none(),
        "password" => cfg.get_password().is_none(),
        other => !in_query(other),
    };
    let service = service.or_else(|| env.var("PGSERVICE"));
    let from_service = match &service {
        Some(name) => service_entries(name, env)?,
        None => Vec::new(),
    };
    let mut added: Vec<(String, String)> = Vec::new();
    for (key, var) in FILLED {
        if !missing(key) {
            continue;
        }
        let value = from_service
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .or_else(|| env.var(var));
        if let Some(v) = value {
            added.push((key.to_string(), v));
        }
    }
    let host = cfg
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .or_else(|| added_value(&added, "host"));
    if host.is_none() {
        added.push(("host".into(), DEFAULT_SOCKET_DIR.into()));
    }
    let user = match cfg
        .get_user()
        .map(str::to_string)
        .or_else(|| added_value(&added, "user"))
    {
        Some(u) => u,
        None => match env.var("USER").or_else(|| env.var("LOGNAME")) {
            Some(u) => {
                added.push(("user".into(), u.clone()));
                u
            }
            None => String::new(),
        },
    };
    if missing("password") && added_value(&added, "password").is_none() {
        let host = host.unwrap_or_else(|| DEFAULT_SOCKET_DIR.into());
        let port = cfg
            .get_ports()
            .first()
            .map(u16::to_string)
            .or_else(|| added_value(&added, "port"))
            .unwrap_or_else(|| "5432".into());
        let dbname = cfg
            .get_dbname()
            .map(str::to_string)
            .or_else(|| added_value(&added, "dbname"))
            .unwrap_or_else(|| user.clone());
        if let Some(p) = password_file(env).and_then(|f| password_from_file(&f, &host, &port, &dbname, &user))
        {
            added.push(("password".into(), p));
        }
    }
    if added.is_empty() {
        return Ok(rest);
    }
    let extra: Vec<String> = added.iter().map(|(k, v)| format!("{k}={}", encode(v))).collect();
    let sep = if rest.contains('?') { "&" } else { "?" };
    Ok(format!("{rest}{sep}{}", extra.join("&")))
}

fn added_value(added: &[(String, String)], key: &str) -> Option<String> {
    added.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
}

fn home(env: &impl Environment) -> Option<PathBuf> {
    env.var("HOME").map(PathBuf::from)
}

/// The password file libpq would read, if it may be read: owned by whoever
/// runs pgferry and unreadable to others (libpq ignores it otherwise).
fn password_file(env: &impl Environment) -> Option<PathBuf> {
    let path = env
        .var("PGPASSFILE")
        .map(PathBuf::from)
        .or_else(|| home(env).map(|h| h.join(".pgpass")))?;
    let meta = std::fs::metadata(&path).ok()?;
    use std::os::unix::fs::PermissionsExt;
    if !meta.is_file() {
        return None;
    }
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(
            file = %path.display(),
            "The password file is readable by others and is ignored, as libpq ignores it: chmod 0600 it"
        );
        return None;
    }
    Some(path)
}

/// Splits a password-file line at unescaped colons, unescaping `\:` and `\\`.
fn fields(line: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    out.last_mut().expect("one field at least").push(n);
                }
            }
            ':' => out.push(String::new()),
            c => out.last_mut().expect("one field at least").push(c),
        }
    }
    out
}

/// The first matching line's password (`host:port:database:user:password`,
/// `*` matching anything). A Unix socket in the default directory matches
/// `localhost`, as in libpq.
fn password_from_file(path: &Path, host: &str, port: &str, dbname: &str, user: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let host = if host == DEFAULT_SOCKET_DIR || host.is_empty() {
        "localhost"
    } else {
        host
    };
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .map(fields)
        .filter(|f| f.len() >= 5)
        .find(|f| {
            let m = |pattern: &str, value: &str| pattern == "*" || pattern == value;
            m(&f[0], host) && m(&f[1], port) && m(&f[2], dbname) && m(&f[3], user)
        })
        .map(|f| f[4..].join(":"))
}

/// The keywords of service `name`, from the first service file that has it.
fn service_entries(name: &str, env: &impl Environment) -> Result<Vec<(String, String)>, String> {
    let user_file = env
        .var("PGSERVICEFILE")
        .map(PathBuf::from)
        .or_else(|| home(env).map(|h| h.join(".pg_service.conf")));
    let system_file = env
        .var("PGSYSCONFDIR")
        .map(|d| PathBuf::from(d).join("pg_service.conf"))
        .unwrap_or_else(|| PathBuf::from("/etc/postgresql-common/pg_service.conf"));
    let files: Vec<PathBuf> = user_file.into_iter().chain([system_file]).collect();
    for file in &files {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        if let Some(entries) = service_in(&text, name) {
            return Ok(entries);
        }
    }
    Err(format!(
        "service {name:?} is not defined in {}",
        files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(" or ")
    ))
}

/// The `key=value` lines of section `[name]` of a service file.
fn service_in(text: &str, name: &str) -> Option<Vec<(String, String)>> {
    let mut in_section = false;
    let mut found = None::<Vec<(String, String)>>;
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_section = section.trim() == name;
            if in_section && found.is_none() {
                found = Some(Vec::new());
            }
            continue;
        }
        if in_section {
            if let (Some(entries), Some((k, v))) = (found.as_mut(), line.split_once('=')) {
                entries.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::os::unix::fs::PermissionsExt;

    struct Vars(HashMap<&'static str, String>);

    impl Environment for Vars {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).cloned()
        }
    }

    fn vars(pairs: &[(&'static str, &str)]) -> Vars {
        Vars(pairs.iter().map(|(k, v)| (*k, v.to_string())).collect())
    }

    fn query_of(url: &str) -> HashMap<String, String> {
        url.split_once('?')
            .map(|(_, q)| q)
            .unwrap_or("")
            .split('&')
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (k.to_string(), crate::db::tls::decode(v)))
            .collect()
    }

    #[test]
    fn a_complete_url_is_left_alone() {
        let url = "postgres://u:p@h:5432/db?sslmode=require";
        let env = vars(&[("PGPASSWORD", "other"), ("PGHOST", "x"), ("PGSSLMODE", "disable")]);
        assert_eq!(with_defaults(url, &env).unwrap(), url);
    }

    #[test]
    fn the_environment_fills_what_the_url_leaves_out() {
        let env = vars(&[
            ("PGHOST", "db.internal"),
            ("PGPORT", "6543"),
            ("PGPASSWORD", "s3cret:/@"),
            ("PGSSLMODE", "verify-full"),
            ("PGSSLROOTCERT", "/etc/ca.pem"),
        ]);
        let url = with_defaults("postgres://app@/appdb", &env).unwrap();
        let q = query_of(&url);
        assert_eq!(q["host"], "db.internal");
        assert_eq!(q["port"], "6543");
        assert_eq!(q["password"], "s3cret:/@");
        assert_eq!(q["sslmode"], "verify-full");
        assert_eq!(q["sslrootcert"], "/etc/ca.pem");
        assert!(!q.contains_key("user") && !q.contains_key("dbname"));
        let cfg: tokio_postgres::Config = crate::db::tls::split_url(&url).unwrap().0.parse().unwrap();
        assert_eq!(cfg.get_password(), Some(&b"s3cret:/@"[..]));
    }

    #[test]
    fn a_service_beats_the_environment_and_loses_to_the_url() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("services");
        std::fs::write(
            &file,
            "# ours\n[other]\nhost=wrong\n[prod]\nhost=svc.internal\nport=7000\ndbname=svcdb\nuser=svcuser\nsslmode=require\n",
        )
        .unwrap();
        let env = vars(&[
            ("PGSERVICEFILE", file.to_str().unwrap()),
            ("PGHOST", "env.internal"),
            ("PGUSER", "envuser"),
        ]);
        let url = with_defaults("postgres://urluser@/?service=prod", &env).unwrap();
        let q = query_of(&url);
        assert_eq!(q["host"], "svc.internal");
        assert_eq!(q["port"], "7000");
        assert_eq!(q["dbname"], "svcdb");
        assert_eq!(q["sslmode"], "require");
        assert!(!q.contains_key("user"), "the URL's user wins: {url}");
        assert!(!q.contains_key("service"), "{url}");
        // A URL that is nothing but the service.
        let env2 = vars(&[("PGSERVICEFILE", file.to_str().unwrap())]);
        let q = query_of(&with_defaults("postgres:///?service=prod", &env2).unwrap());
        assert_eq!(
            (q["host"].as_str(), q["user"].as_str()),
            ("svc.internal", "svcuser")
        );
        let env = vars(&[("PGSERVICEFILE", file.to_str().unwrap()), ("PGSERVICE", "nope")]);
        let err = with_defaults("postgres://u@h/db", &env).unwrap_err();
        assert!(err.contains("\"nope\"") && err.contains("services"), "{err}");
    }

    #[test]
    fn the_password_file_is_read_as_libpq_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pgpass");
        std::fs::write(
            &file,
            "# comment\nother:5432:*:app:no\nlocalhost:5432:appdb:app:sock\ndb.internal:*:*:app:pa\\:ss\\\\word\n",
        )
        .unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let env = vars(&[("PGPASSFILE", file.to_str().unwrap())]);
        let q = query_of(&with_defaults("postgres://app@db.internal:6000/appdb", &env).unwrap());
        assert_eq!(q["password"], "pa:ss\\word");
        let q = query_of(&with_defaults("postgres://app@/appdb", &env).unwrap());
        assert_eq!(q["password"], "sock", "the default socket matches localhost");
        assert_eq!(q["host"], DEFAULT_SOCKET_DIR);
        let q = query_of(&with_defaults("postgres://nobody@db.internal/appdb", &env).unwrap());
        assert!(!q.contains_key("password"));
        // Readable by others: ignored, as libpq ignores it.
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let q = query_of(&with_defaults("postgres://app@db.internal/appdb", &env).unwrap());
        assert!(!q.contains_key("password"));
    }
}
