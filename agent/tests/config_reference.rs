//! The configuration reference stays in sync with the config types.
//!
//! Every key the config types accept is discovered from the types
//! themselves (every table refuses unknown keys and names the ones it
//! expects), and each must be documented in `config/outpost.toml` under its
//! section; every section must be named in README's configuration chapter.
//! A key added to the types without documentation fails this test.

use std::collections::BTreeSet;
use std::path::Path;

use outpost::config::Config;

const PROBE: &str = "zzz_not_a_key";

/// The keys a table at `path` accepts, or `None` when `path` is not a table.
/// `path` is a list of (key, is_array_of_tables).
fn expected_keys(dir: &Path, path: &[(String, bool)]) -> Option<Vec<String>> {
    let mut text = String::new();
    // Header lines for every level, each with the fields earlier levels
    // need (none: the probe key comes first and fails first).
    let mut prefix = String::new();
    for (i, (key, array)) in path.iter().enumerate() {
        if !prefix.is_empty() {
            prefix.push('.');
        }
        prefix.push_str(key);
        if i + 1 == path.len() {
            if *array {
                text.push_str(&format!("[[{prefix}]]\n"));
            } else {
                text.push_str(&format!("[{prefix}]\n"));
            }
        } else if *array {
            text.push_str(&format!("[[{prefix}]]\n"));
        }
    }
    text.push_str(&format!("{PROBE} = 1\n"));
    let file = dir.join("probe.toml");
    std::fs::write(&file, &text).expect("write probe");
    let err = match Config::load(&file) {
        Ok(_) => return None,
        Err(e) => e.to_string(),
    };
    // Only a table refuses an unknown *field*; enums refuse variants.
    let line = err
        .lines()
        .find(|l| l.contains(PROBE) && l.contains("unknown field"))?;
    let tail = line.split("expected ").nth(1)?;
    let tail = tail.strip_prefix("one of ").unwrap_or(tail);
    let keys: Vec<String> = tail
        .split(", ")
        .flat_map(|k| k.split(" or "))
        .filter_map(|k| {
            let k = k.trim().trim_end_matches('.');
            k.strip_prefix('`')?.strip_suffix('`').map(str::to_string)
        })
        .collect();
    (!keys.is_empty()).then_some(keys)
}

/// Walks the config types; returns every key as a path of names.
fn all_keys(dir: &Path) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut stack: Vec<Vec<(String, bool)>> = vec![vec![]];
    let root = expected_keys(dir, &[]).expect("the root table names its sections");
    assert!(root.len() >= 5, "root sections: {root:?}");
    stack.clear();
    for k in root {
        stack.push(vec![(k, false)]);
    }
    while let Some(path) = stack.pop() {
        let names: Vec<String> = path.iter().map(|(k, _)| k.clone()).collect();
        out.push(names.clone());
        // A table, an array of tables, or a value.
        let mut found = None;
        for array in [false, true] {
            let mut p = path.clone();
            if let Some(last) = p.last_mut() {
                last.1 = array;
            }
            if let Some(keys) = expected_keys(dir, &p) {
                found = Some((p, keys));
                break;
            }
        }
        if let Some((p, keys)) = found {
            for k in keys {
                let mut child = p.clone();
                child.push((k, false));
                stack.push(child);
            }
        }
    }
    out.sort();
    out
}

/// The text of each section of the documented example, by header name
/// (`[a.b]`, `[[a]]` and their commented-out forms), with "" for the top.
fn sections(doc: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = vec![(String::new(), String::new())];
    for line in doc.lines() {
        let t = line.trim_start_matches('#').trim();
        if t.starts_with('[') && t.ends_with(']') && !t.contains('=') && !t.contains(' ') {
            let name = t.trim_matches(|c| c == '[' || c == ']').to_string();
            out.push((name, String::new()));
            continue;
        }
        if let Some(last) = out.last_mut() {
            last.1.push_str(line);
            last.1.push('\n');
        }
    }
    out
}

fn documents(text: &str, key: &str) -> bool {
    text.match_indices(key).any(|(i, _)| {
        let before = text[..i].chars().last();
        let after = text[i + key.len()..].trim_start();
        !before.is_some_and(|c| c.is_alphanumeric() || c == '_') && after.starts_with('=')
    })
}

#[test]
fn every_config_key_is_documented() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = all_keys(dir.path());
    assert!(keys.len() > 40, "too few keys discovered: {keys:?}");

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let doc =
        std::fs::read_to_string(root.join("config/outpost.toml")).expect("config/outpost.toml");
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let secs = sections(&doc);

    let mut missing = BTreeSet::new();
    for path in &keys {
        if path.len() == 1 {
            // A section: documented when the example has it, and README
            // names it in its configuration chapter.
            let name = &path[0];
            if !secs.iter().any(|(s, _)| s == name) {
                missing.insert(format!("[{name}] has no section in config/outpost.toml"));
            }
            if !readme.contains(&format!("[{name}]")) && !readme.contains(&format!("[[{name}]]")) {
                missing.insert(format!("[{name}] is not named in README.md"));
            }
            continue;
        }
        // A key: documented in its section, or in the section of a parent
        // table it is written inline in (`probe = { http = ... }`).
        let key = path.last().expect("non-empty");
        let own_section = secs.iter().any(|(s, _)| *s == path.join("."));
        let documented = own_section
            || (1..path.len()).rev().any(|n| {
                let section = path[..n].join(".");
                secs.iter()
                    .filter(|(s, _)| *s == section)
                    .any(|(_, text)| documents(text, key))
            });
        if !documented {
            missing.insert(format!(
                "{} is not documented in config/outpost.toml",
                path.join(".")
            ));
        }
    }
    assert!(
        missing.is_empty(),
        "the configuration reference is out of sync with the config types:\n{}",
        missing.into_iter().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn the_walk_finds_known_keys() {
    // The walk itself works: keys known to exist are found, nested ones too.
    let dir = tempfile::tempdir().expect("tempdir");
    let keys: Vec<String> = all_keys(dir.path())
        .into_iter()
        .map(|p| p.join("."))
        .collect();
    for k in [
        "agent.node_id",
        "target.probe.http",
        "rule.cooldown",
        "guard.protected_units",
        "mqtt.url",
        "fleet.trusted_keys",
    ] {
        assert!(keys.iter().any(|x| x == k), "{k} not found in {keys:?}");
    }
}
