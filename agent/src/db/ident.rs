//! Identifier quoting: the one way a name reaches SQL text.
//!
//! Values are always bind parameters; identifiers cannot be, so every table,
//! column and schema name goes through [`Ident`] or [`QualifiedTable`], which
//! quote exactly as PostgreSQL's `quote_ident` with force-quoting.

use std::fmt;

use serde::Serialize;

/// A single SQL identifier, rendered double-quoted with embedded quotes doubled.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Ident(pub String);

impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"")?;
        f.write_str(&self.0.replace('"', "\"\""))?;
        f.write_str("\"")
    }
}

/// A schema-qualified table name, rendered as `"schema"."name"`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct QualifiedTable {
    /// The schema (namespace).
    pub schema: String,
    /// The relation name.
    pub name: String,
}

impl QualifiedTable {
    /// Builds a qualified name from its parts.
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            schema: schema.into(),
            name: name.into(),
        }
    }

    /// A readable form for reports and logs (unquoted, `schema.name`).
    pub fn display_name(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

impl fmt::Display for QualifiedTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", Ident(self.schema.clone()), Ident(self.name.clone()))
    }
}

/// Renders a comma-separated list of quoted column names, optionally prefixed
/// by a table alias (`t."a", t."b"`).
pub fn column_list(columns: &[String], alias: Option<&str>) -> String {
    columns
        .iter()
        .map(|c| match alias {
            Some(a) => format!("{a}.{}", Ident(c.clone())),
            None => Ident(c.clone()).to_string(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_everything_that_could_break_out() {
        let t = QualifiedTable::new("public", "\"; drop table x; --");
        assert_eq!(t.to_string(), r#""public"."""; drop table x; --""#);
        assert_eq!(Ident("Mixed Case".into()).to_string(), "\"Mixed Case\"");
        assert_eq!(Ident("ünï".into()).to_string(), "\"ünï\"");
    }

    #[test]
    fn column_lists() {
        let cols = vec!["a".to_string(), "b\"c".to_string()];
        assert_eq!(column_list(&cols, None), r#""a", "b""c""#);
        assert_eq!(column_list(&cols, Some("t")), r#"t."a", t."b""c""#);
    }
}
