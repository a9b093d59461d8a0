//! Structural diff of two configs, for `meridian config diff` and for logging what a reload
//! changed. Regions and routes are matched by name and upstreams by address (not by position),
//! so inserting one entry does not report every later one as changed.

use std::collections::HashSet;
use std::fmt;

use serde_json::{Map, Value};

use crate::Config;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    Added,
    Removed,
    Changed,
}

/// One difference. `path` uses the validator's style with names for keyed tables:
/// `routes["api"].default_region`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub path: String,
    pub kind: ChangeKind,
    /// `"old" -> "new"` for a changed value, `added x` / `removed x` for a set member, the value
    /// for an added or removed field, empty for an added or removed region or route.
    pub detail: String,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = match self.kind {
            ChangeKind::Added => '+',
            ChangeKind::Removed => '-',
            ChangeKind::Changed => '~',
        };
        if self.detail.is_empty() {
            write!(f, "{sign} {}", self.path)
        } else {
            write!(f, "{sign} {}: {}", self.path, self.detail)
        }
    }
}

/// Every difference between `old` and `new`: fields in name order; entries of keyed tables in
/// their old order, then new entries.
pub fn diff(old: &Config, new: &Config) -> Vec<Change> {
    // Serializing plain data cannot fail; a Null on either side would still diff sensibly.
    let old = serde_json::to_value(old).unwrap_or(Value::Null);
    let new = serde_json::to_value(new).unwrap_or(Value::Null);
    let mut changes = Vec::new();
    walk("", &old, &new, &mut changes);
    changes
}

fn walk(path: &str, old: &Value, new: &Value, out: &mut Vec<Change>) {
    if old == new {
        return;
    }
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => walk_object(path, a, b, out),
        (Value::Array(a), Value::Array(b)) => walk_array(path, a, b, out),
        (Value::Null, value) => push(out, path, ChangeKind::Added, render(value)),
        (value, Value::Null) => push(out, path, ChangeKind::Removed, render(value)),
        (a, b) => push(
            out,
            path,
            ChangeKind::Changed,
            format!("{} -> {}", render(a), render(b)),
        ),
    }
}

/// Keys in sorted order, whatever the map type (serde_json's `preserve_order` may be on).
fn walk_object(
    path: &str,
    old: &Map<String, Value>,
    new: &Map<String, Value>,
    out: &mut Vec<Change>,
) {
    let mut keys: Vec<&String> = old.keys().chain(new.keys()).collect();
    keys.sort();
    keys.dedup();
    for key in keys {
        let child = field_path(path, key);
        match (old.get(key), new.get(key)) {
            (Some(a), Some(b)) => walk(&child, a, b, out),
            (Some(a), None) => push(out, &child, ChangeKind::Removed, render(a)),
            (None, Some(b)) => push(out, &child, ChangeKind::Added, render(b)),
            (None, None) => {}
        }
    }
}

fn walk_array(path: &str, old: &[Value], new: &[Value], out: &mut Vec<Change>) {
    if let Some(keys) = table_keys(old, new, "name") {
        // Regions, routes: whole entries appear and disappear.
        walk_keyed(path, old, new, keys, Style::Entry, out);
    } else if let Some(keys) = table_keys(old, new, "address") {
        // Upstreams: members of their region's set.
        walk_keyed(path, old, new, keys, Style::Member, out);
    } else if old.iter().chain(new).all(is_scalar) {
        walk_scalars(path, old, new, out);
    } else {
        for (i, (a, b)) in old.iter().zip(new).enumerate() {
            walk(&format!("{path}[{i}]"), a, b, out);
        }
        for (i, a) in old.iter().enumerate().skip(new.len()) {
            push(out, &format!("{path}[{i}]"), ChangeKind::Removed, render(a));
        }
        for (i, b) in new.iter().enumerate().skip(old.len()) {
            push(out, &format!("{path}[{i}]"), ChangeKind::Added, render(b));
        }
    }
}

#[derive(Clone, Copy)]
enum Style {
    /// `+ routes["api"]`
    Entry,
    /// `~ regions["us-east"].upstreams: added 127.1.2.3:7001`
    Member,
}

/// The `field` of every element of both arrays, if every element is a table with a unique string
/// `field` (otherwise matching by key would be ambiguous and the caller falls back to indexes).
fn table_keys<'a>(
    old: &'a [Value],
    new: &'a [Value],
    field: &str,
) -> Option<(Vec<&'a str>, Vec<&'a str>)> {
    let keys = |items: &'a [Value]| -> Option<Vec<&'a str>> {
        let keys: Vec<&str> = items
            .iter()
            .map(|item| item.get(field).and_then(Value::as_str))
            .collect::<Option<_>>()?;
        let unique: HashSet<&str> = keys.iter().copied().collect();
        (unique.len() == keys.len()).then_some(keys)
    };
    Some((keys(old)?, keys(new)?))
}

fn walk_keyed(
    path: &str,
    old: &[Value],
    new: &[Value],
    (old_keys, new_keys): (Vec<&str>, Vec<&str>),
    style: Style,
    out: &mut Vec<Change>,
) {
    let entry_path = |key: &str| format!("{path}[{key:?}]");
    for (a, key) in old.iter().zip(&old_keys) {
        match new_keys.iter().position(|k| k == key) {
            Some(j) => walk(&entry_path(key), a, &new[j], out),
            None => match style {
                Style::Entry => push(out, &entry_path(key), ChangeKind::Removed, String::new()),
                Style::Member => push(out, path, ChangeKind::Changed, format!("removed {key}")),
            },
        }
    }
    for key in new_keys.iter().filter(|k| !old_keys.contains(k)) {
        match style {
            Style::Entry => push(out, &entry_path(key), ChangeKind::Added, String::new()),
            Style::Member => push(out, path, ChangeKind::Changed, format!("added {key}")),
        }
    }
    let old_order: Vec<&&str> = old_keys.iter().filter(|k| new_keys.contains(k)).collect();
    let new_order: Vec<&&str> = new_keys.iter().filter(|k| old_keys.contains(k)).collect();
    if old_order != new_order {
        push(
            out,
            path,
            ChangeKind::Changed,
            format!("order {old_order:?} -> {new_order:?}"),
        );
    }
}

/// Lists of names, hosts, countries: report members added and removed, or a pure reordering.
fn walk_scalars(path: &str, old: &[Value], new: &[Value], out: &mut Vec<Change>) {
    let before = out.len();
    for b in new.iter().filter(|b| !old.contains(b)) {
        push(
            out,
            path,
            ChangeKind::Changed,
            format!("added {}", render(b)),
        );
    }
    for a in old.iter().filter(|a| !new.contains(a)) {
        push(
            out,
            path,
            ChangeKind::Changed,
            format!("removed {}", render(a)),
        );
    }
    if out.len() == before {
        let detail = format!("{} -> {}", render_list(old), render_list(new));
        push(out, path, ChangeKind::Changed, detail);
    }
}

fn is_scalar(value: &Value) -> bool {
    !matches!(value, Value::Array(_) | Value::Object(_))
}

fn field_path(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn render(value: &Value) -> String {
    value.to_string()
}

fn render_list(values: &[Value]) -> String {
    let items: Vec<String> = values.iter().map(render).collect();
    format!("[{}]", items.join(", "))
}

fn push(out: &mut Vec<Change>, path: &str, kind: ChangeKind, detail: String) {
    out.push(Change {
        path: path.to_owned(),
        kind,
        detail,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"schema = 1
[[regions]]
name = "us-east"
location = { lat = 38.9, lon = -77.0 }
upstreams = [{ address = "127.1.2.1:7001" }]
[[regions]]
name = "us-west"
location = { lat = 37.4, lon = -122.1 }
upstreams = [{ address = "127.1.9.1:7001" }]
[[routes]]
name = "api"
hosts = ["api.example.test"]
regions = "*"
default_region = "us-east"
"#;

    fn config(text: &str) -> Config {
        Config::from_toml_str(text).expect("test config is valid")
    }

    fn lines(old: &str, new: &str) -> Vec<String> {
        diff(&config(old), &config(new))
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn identical_configs_have_no_changes() {
        assert!(diff(&config(BASE), &config(BASE)).is_empty());
    }

    #[test]
    fn routes_and_regions_are_matched_by_name() {
        let new = r#"schema = 1
[[regions]]
name = "mx-central"
location = { lat = 20.59, lon = -100.39 }
upstreams = [{ address = "127.1.1.1:7001" }]
[[regions]]
name = "us-east"
location = { lat = 38.9, lon = -77.0 }
upstreams = [{ address = "127.1.2.1:7001" }]
[[routes]]
name = "api"
hosts = ["api.example.test"]
regions = "*"
default_region = "mx-central"
[[routes]]
name = "inference-eu"
hosts = ["llm.example.test"]
kind = "inference"
"#;
        assert_eq!(
            lines(BASE, new),
            [
                r#"- regions["us-west"]"#,
                r#"+ regions["mx-central"]"#,
                r#"~ routes["api"].default_region: "us-east" -> "mx-central""#,
                r#"+ routes["inference-eu"]"#,
            ]
        );
    }

    #[test]
    fn upstreams_are_a_set_keyed_by_address() {
        let new = BASE.replace(
            r#"upstreams = [{ address = "127.1.2.1:7001" }]"#,
            r#"upstreams = [{ address = "127.1.2.1:7001", weight = 5 }, { address = "127.1.2.3:7001" }]"#,
        );
        assert_eq!(
            lines(BASE, &new),
            [
                r#"~ regions["us-east"].upstreams["127.1.2.1:7001"].weight: 1 -> 5"#,
                r#"~ regions["us-east"].upstreams: added 127.1.2.3:7001"#,
            ]
        );
        assert_eq!(
            lines(&new, BASE),
            [
                r#"~ regions["us-east"].upstreams["127.1.2.1:7001"].weight: 5 -> 1"#,
                r#"~ regions["us-east"].upstreams: removed 127.1.2.3:7001"#,
            ]
        );
    }

    #[test]
    fn other_sections_compare_field_by_field() {
        let new = format!(
            "{}\n[edge]\npop = \"edge-9\"\n[edge.limits]\nmax_headers = 50\n[geoip]\ndatabase = \"/var/geo.mmdb\"\n",
            BASE.replace(
                r#"hosts = ["api.example.test"]"#,
                r#"hosts = ["api.example.test", "*.api.example.test"]"#
            )
            .replace(r#"regions = "*""#, r#"regions = ["us-east"]"#)
        );
        let changes = diff(&config(BASE), &config(&new));
        let rendered: Vec<String> = changes.iter().map(ToString::to_string).collect();
        assert_eq!(
            rendered,
            [
                r#"~ edge.limits.max_headers: 100 -> 50"#,
                r#"~ edge.pop: "edge-1" -> "edge-9""#,
                r#"+ geoip.database: "/var/geo.mmdb""#,
                r#"~ routes["api"].hosts: added "*.api.example.test""#,
                r#"~ routes["api"].regions: "*" -> ["us-east"]"#,
            ]
        );
        assert_eq!(changes[2].kind, ChangeKind::Added);
        assert_eq!(changes[2].path, "geoip.database");
    }

    #[test]
    fn reordering_and_unnamed_tables() {
        let swapped = r#"schema = 1
[[regions]]
name = "us-west"
location = { lat = 37.4, lon = -122.1 }
upstreams = [{ address = "127.1.9.1:7001" }]
[[regions]]
name = "us-east"
location = { lat = 38.9, lon = -77.0 }
upstreams = [{ address = "127.1.2.1:7001" }]
[[routes]]
name = "api"
hosts = ["api.example.test"]
regions = "*"
default_region = "us-east"
"#;
        assert_eq!(
            lines(BASE, swapped),
            [r#"~ regions: order ["us-east", "us-west"] -> ["us-west", "us-east"]"#]
        );
        let with_rule =
            format!("{BASE}[[residency]]\ncountries = [\"KR\"]\nregions = [\"us-east\"]\n");
        let changed_rule = with_rule.replace("\"KR\"", "\"JP\"");
        assert_eq!(
            lines(BASE, &with_rule),
            [r#"+ residency[0]: {"countries":["KR"],"regions":["us-east"],"strict":true}"#]
        );
        assert_eq!(
            lines(&with_rule, &changed_rule),
            [
                r#"~ residency[0].countries: added "JP""#,
                r#"~ residency[0].countries: removed "KR""#,
            ]
        );
    }
}
