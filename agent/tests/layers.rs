//! The crate's modules and the `crate::` paths between them: no module may
//! join an import cycle. Today one cycle remains, tied mostly by `error`
//! (which wraps every phase's error while the phases call back into it)
//! and `migration`; its members are listed below and the list may only
//! shrink: a module outside it that joins a cycle fails this test, and so
//! does a listed module that has left every cycle (take it off the list).
//! docs/design.md ("Layout") says where the shape is headed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The members of today's one cycle.
const IN_TODAYS_CYCLE: &[&str] = &[
    "capture",
    "cleanup",
    "copy",
    "cutover",
    "drain",
    "drift",
    "endpoint",
    "error",
    "extension_config",
    "large_objects",
    "migration",
    "plan",
    "rds",
    "retry",
    "roles",
    "sandbox",
    "schema",
    "state",
    "telemetry",
    "throttle",
    "verify",
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
            for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
                for (at, _) in line.match_indices("crate::") {
                    let name: String = line[at + "crate::".len()..]
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() && name != top && name.chars().next().is_some_and(char::is_lowercase)
                    {
                        edges.insert(name);
                    }
                }
            }
        }
    }
    graph
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
fn no_module_joins_an_import_cycle() {
    let graph = imports();
    assert!(
        graph.contains_key("drain"),
        "the module graph was read: {graph:?}"
    );
    let cycles = in_cycles(&graph);
    let listed: BTreeSet<String> = IN_TODAYS_CYCLE.iter().map(|s| s.to_string()).collect();
    let mut problems = Vec::new();
    for cycle in &cycles {
        let new: Vec<&String> = cycle.difference(&listed).collect();
        if !new.is_empty() {
            problems.push(format!("{new:?} joined an import cycle: {cycle:?}"));
        }
    }
    let still: BTreeSet<&String> = cycles.iter().flatten().collect();
    let left: Vec<&String> = listed.iter().filter(|m| !still.contains(m)).collect();
    if !left.is_empty() {
        problems.push(format!(
            "{left:?} left every cycle: take them off IN_TODAYS_CYCLE"
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
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
