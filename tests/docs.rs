//! The documentation stays true to the code: every key of `config.toml`
//! (flattened to `section.key`, `section.sub.key`) is described in
//! docs/config.md, and every key a row of docs/config.md describes exists.

use std::collections::BTreeSet;
use std::path::Path;

use figment::providers::{Format, Toml};
use figment::value::{Dict, Value};
use figment::Figment;

fn read(rel: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn flatten(prefix: &str, dict: &Dict, out: &mut BTreeSet<String>) {
    for (k, v) in dict {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            Value::Dict(_, d) => flatten(&key, d, out),
            _ => {
                out.insert(key);
            }
        }
    }
}

/// Every leaf key of the repository's config.toml.
fn config_keys() -> BTreeSet<String> {
    let dict: Dict = Figment::from(Toml::string(&read("config.toml")))
        .extract()
        .expect("config.toml parses");
    let mut keys = BTreeSet::new();
    flatten("", &dict, &mut keys);
    keys
}

/// The keys in the first column of docs/config.md's tables (`| \`a.b\` |`).
fn documented_keys(doc: &str) -> BTreeSet<String> {
    doc.lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once('`').map(|(k, _)| k.to_owned()))
        .filter(|k| k.contains('.') && !k.contains(' '))
        .collect()
}

#[test]
fn every_config_key_is_documented() {
    let keys = config_keys();
    assert!(keys.len() > 50, "too few keys parsed: {keys:?}");
    assert!(keys.contains("store.mongodb.write_concern"));
    assert!(keys.contains("notify.smtp.host"));
    let documented = documented_keys(&read("docs/config.md"));
    let missing: Vec<_> = keys.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "config.toml keys without a row in docs/config.md: {missing:?}"
    );
    let unknown: Vec<_> = documented.difference(&keys).collect();
    assert!(
        unknown.is_empty(),
        "docs/config.md describes keys config.toml does not have: {unknown:?}"
    );
}

#[test]
fn the_embedded_defaults_are_config_toml() {
    assert_eq!(chatd::config::DEFAULTS, read("config.toml"));
}

/// README.md and docs/*.md.
fn doc_files() -> Vec<std::path::PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("README.md")];
    for e in std::fs::read_dir(root.join("docs")).expect("docs/") {
        let p = e.expect("docs entry").path();
        if p.extension().is_some_and(|x| x == "md") {
            files.push(p);
        }
    }
    files
}

#[test]
fn docs_link_only_to_files_that_exist() {
    let mut broken = Vec::new();
    for file in doc_files() {
        let text = std::fs::read_to_string(&file).expect("read doc");
        let dir = file.parent().expect("parent");
        for (i, _) in text.match_indices("](") {
            let rest = &text[i + 2..];
            let Some(end) = rest.find(')') else { continue };
            let target = rest[..end].split('#').next().unwrap_or_default();
            if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            if !dir.join(target).exists() {
                broken.push(format!("{}: {target}", file.display()));
            }
        }
        // Files outside the repository are no reference for a reader of it.
        for outside in ["DESIGN.md", "API.md", "the contract"] {
            // (store-*.md's "contract suite" is src/store/contract.rs.)
            let checked = outside != "the contract"
                || file.ends_with("README.md")
                || file.ends_with("protocol.md");
            if checked && text.contains(outside) {
                broken.push(format!("{}: mentions {outside:?}", file.display()));
            }
        }
    }
    assert!(broken.is_empty(), "{broken:#?}");
}
