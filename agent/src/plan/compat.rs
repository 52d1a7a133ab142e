//! What must agree between source and target: encoding, collation,
//! extensions.

use tokio_postgres::GenericClient;

use super::check::Findings;
use super::Severity;

/// Encoding, collation and ctype of the connected database.
async fn locale(c: &impl GenericClient) -> Result<(String, String, String), tokio_postgres::Error> {
    let r = c
        .query_one(
            "SELECT pg_encoding_to_char(encoding)::text, datcollate::text, datctype::text
               FROM pg_database WHERE datname = current_database()",
            &[],
        )
        .await?;
    Ok((r.get(0), r.get(1), r.get(2)))
}

/// Compares the two databases; adds what it finds.
pub(super) async fn compare(
    src: &impl GenericClient,
    tgt: &impl GenericClient,
    f: &mut Findings,
) -> Result<(), tokio_postgres::Error> {
    let (s, t) = (locale(src).await?, locale(tgt).await?);
    if s.0 != t.0 {
        f.add(
            Severity::Blocker,
            "target",
            format!("the target database's encoding is {}, the source's {}", t.0, s.0),
            format!("create the target database with ENCODING '{}'", s.0),
        );
    }
    if s.1 != t.1 || s.2 != t.2 {
        f.add(
            Severity::Warning,
            "target",
            format!(
                "collation differs: source {}/{}, target {}/{}; text sorts and compares differently, which can \
                 change index order and unique constraints on text",
                s.1, s.2, t.1, t.2
            ),
            format!("create the target database with LC_COLLATE '{}' LC_CTYPE '{}' if you can", s.1, s.2),
        );
    }
    let wanted = src
        .query(
            "SELECT extname::text FROM pg_extension WHERE extname <> 'plpgsql' ORDER BY 1",
            &[],
        )
        .await?;
    for r in wanted {
        let name: String = r.get(0);
        let row = tgt
            .query_opt(
                "SELECT installed_version IS NOT NULL,
                        coalesce((SELECT bool_or(trusted) FROM pg_available_extension_versions v WHERE v.name = a.name), false),
                        (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
                   FROM pg_available_extensions a WHERE name = $1",
                &[&name],
            )
            .await?;
        match row {
            None => f.add(
                Severity::Blocker,
                &name,
                "extension used by the source is not available on the target",
                "choose a target engine version that offers it, or drop it from the source",
            ),
            Some(r) if !r.get::<_, bool>(0) && !r.get::<_, bool>(1) && !r.get::<_, bool>(2) => f.add(
                Severity::Warning,
                &name,
                "extension is not trusted, so the target role may not be allowed to create it",
                "create it on the target beforehand as a privileged role (on RDS: rds_superuser members may)",
            ),
            Some(_) => {}
        }
    }
    Ok(())
}
