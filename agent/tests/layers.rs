//! The crate's modules and the `crate::` paths between them: no import
//! cycle, and nothing below imports anything above (docs/design.md,
//! "Layout").

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The layers, bottom up (docs/design.md, "Layout"). A module imports only
/// from layers below its own; in a layer marked ordered (the sequences and
/// the interfaces, which compose one another) it may also import the
/// modules listed before it there. Every module is in exactly one layer.
const LAYERS: &[(&str, bool, &[&str])] = &[
    (
        "foundation",
        false,
        &[
            "config",
            "failpoint",
            "parallel",
            "progress",
            "scratch",
            "telemetry",
        ],
    ),
    ("db", false, &["db"]),
    ("error", false, &["error"]),
    ("control", false, &["control"]),
    ("mechanics", false, &["ddl", "rows", "schema"]),
    ("catalog", false, &["plan"]),
    ("parts", false, &["extension_config", "roles", "verify"]),
    ("capabilities", false, &["capture", "cleanup", "copy", "drain"]),
    (
        "sequences",
        true,
        &["follow", "sync", "fallback", "cutover", "migrate"],
    ),
    ("interfaces", true, &["sandbox", "rds", "status", "demo", "cli"]),
];

/// Top-level module → the top-level modules its files name with `crate::`,
/// outside comments and unit tests.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(&src).expect("under src");
            let top = rel
                .components()
                .next()
                .expect("a component")
                .as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_string();
            if top == "lib" || top == "main" {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("read a module");
            // Unit tests may reach anywhere.
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            let edges = graph.entry(top.clone()).or_default();
            let code: String = code
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n");
            for name in root_names(&code) {
                // The crate root's re-exports name their modules.
                let name = match name.as_str() {
                    "Error" | "ExitCode" => "error".to_string(),
                    "Migration" => "db".to_string(),
                    _ => name,
                };
                if name != top {
                    edges.insert(name);
                }
            }
        }
    }
    graph
}

/// The names `code` takes from the crate root: `crate::a::...`, and each
/// of `crate::{a, b::c}`.
fn root_names(code: &str) -> Vec<String> {
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut names = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            names.extend(group.split(',').map(ident));
        } else {
            names.push(ident(rest));
        }
    }
    names.retain(|n| !n.is_empty() && n != "self");
    names
}

/// The modules that are in a cycle (strongly connected components of more
/// than one module), by Tarjan's algorithm.
fn in_cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<BTreeSet<String>> {
    struct Walk<'a> {
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        next: usize,
        found: Vec<BTreeSet<String>>,
    }
    impl<'a> Walk<'a> {
        fn visit(&mut self, v: &'a str) {
            self.index.insert(v, self.next);
            self.low.insert(v, self.next);
            self.next += 1;
            self.stack.push(v);
            for w in self.graph.get(v).into_iter().flatten() {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let lw = self.low[w];
                    let lv = self.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(lw);
                } else if self.stack.contains(&w) {
                    let iw = self.index[w];
                    let lv = self.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = BTreeSet::new();
                while let Some(w) = self.stack.pop() {
                    component.insert(w.to_string());
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    self.found.push(component);
                }
            }
        }
    }
    let mut walk = Walk {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        next: 0,
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !walk.index.contains_key(v.as_str()) {
            walk.visit(v);
        }
    }
    walk.found
}

#[test]
fn no_import_cycle() {
    let graph = imports();
    assert!(
        graph.contains_key("drain") && graph["drain"].contains("db"),
        "the module graph was read: {graph:?}"
    );
    let cycles = in_cycles(&graph);
    assert!(cycles.is_empty(), "modules in an import cycle: {cycles:?}");
}

/// Layer index and place in it, per module.
fn places() -> BTreeMap<&'static str, (usize, usize)> {
    let mut at = BTreeMap::new();
    for (layer, (_, _, modules)) in LAYERS.iter().enumerate() {
        for (i, m) in modules.iter().enumerate() {
            assert!(at.insert(*m, (layer, i)).is_none(), "{m} is in two layers");
        }
    }
    at
}

/// The imports that break the layering.
fn upward(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let at = places();
    let mut wrong = Vec::new();
    for (from, tos) in graph {
        let Some(&(lf, pf)) = at.get(from.as_str()) else {
            wrong.push(format!(
                "{from} is in no layer: add it to LAYERS and to docs/design.md"
            ));
            continue;
        };
        for to in tos {
            let Some(&(lt, pt)) = at.get(to.as_str()) else {
                continue; // reported as its own module, or not a module
            };
            let ordered = LAYERS[lf].1;
            let fine = lt < lf || (lt == lf && ordered && pt < pf);
            if !fine {
                wrong.push(format!(
                    "{from} ({}) imports {to} ({})",
                    LAYERS[lf].0, LAYERS[lt].0
                ));
            }
        }
    }
    wrong
}

#[test]
fn nothing_below_imports_anything_above() {
    let graph = imports();
    let wrong = upward(&graph);
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_layer_check_finds_an_import_upward_or_sideways() {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    graph.insert("db".into(), ["cli".to_string()].into());
    graph.insert("capture".into(), ["copy".to_string()].into());
    graph.insert("cutover".into(), ["sync".to_string()].into());
    graph.insert("sync".into(), ["cutover".to_string()].into());
    graph.insert("newcomer".into(), BTreeSet::new());
    let wrong = upward(&graph);
    assert_eq!(
        wrong,
        vec![
            "capture (capabilities) imports copy (capabilities)".to_string(),
            "db (db) imports cli (interfaces)".to_string(),
            "newcomer is in no layer: add it to LAYERS and to docs/design.md".to_string(),
            "sync (sequences) imports cutover (sequences)".to_string(),
        ]
    );
}

#[test]
fn grouped_imports_count() {
    assert_eq!(
        root_names("use crate::{drain, sync::follow};\nlet e: crate::Error = crate::db::x();"),
        vec!["drain", "sync", "Error", "db"]
    );
}

#[test]
fn the_cycle_check_finds_a_cycle() {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    graph.insert("a".into(), ["b".to_string()].into());
    graph.insert("b".into(), ["c".to_string()].into());
    graph.insert("c".into(), ["a".to_string()].into());
    graph.insert("d".into(), ["a".to_string()].into());
    let cycles = in_cycles(&graph);
    assert_eq!(
        cycles,
        vec![["a", "b", "c"].iter().map(|s| s.to_string()).collect()]
    );
}
