//! `${VAR}` and `${VAR:-default}` in any string value of the file, so that a
//! deployment's own environment variables (`APP_RPC_URL`,
//! `APP_BURN_CONTRACT_ADDRESS`, …) configure logcursor without a templating
//! step.
//!
//! - `${VAR}`: the variable's value; unset is a configuration error naming
//!   the key and the variable.
//! - `${VAR:-default}`: the default when the variable is unset or empty.
//! - `$${` is a literal `${`.
//! - A value that is exactly one reference (`"${START_BLOCK:-0}"`) is read
//!   as an integer, float or boolean when the result looks like one, so
//!   numeric keys can come from the environment too.
//!
//! Values read this way follow their key's rules: URLs and passwords are
//! secrets whatever their source, and no problem message repeats a
//! variable's value.

use super::Problem;

/// Expands every string of `table` (keys are left alone), recording a
/// problem for each reference that cannot be resolved. `lookup` reads a
/// variable (the process environment, or a test's map).
pub(super) fn expand(table: &mut toml::Table, lookup: &dyn Fn(&str) -> Option<String>, problems: &mut Vec<Problem>) {
    for (key, value) in table.iter_mut() {
        expand_value(value, key, lookup, problems);
    }
}

fn expand_value(
    value: &mut toml::Value,
    path: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    problems: &mut Vec<Problem>,
) {
    match value {
        toml::Value::String(s) => {
            if !s.contains('$') {
                return;
            }
            match expand_str(s, lookup) {
                Ok((text, whole)) => {
                    *value = if whole { typed(text) } else { toml::Value::String(text) };
                }
                Err(message) => problems.push(Problem {
                    key: path.to_string(),
                    message,
                }),
            }
        }
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                expand_value(item, &format!("{path}[{i}]"), lookup, problems);
            }
        }
        toml::Value::Table(t) => {
            for (k, v) in t.iter_mut() {
                expand_value(v, &format!("{path}.{k}"), lookup, problems);
            }
        }
        _ => {}
    }
}

/// The expanded text, and whether the whole text was one reference.
fn expand_str(s: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<(String, bool), String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    let mut references = 0;
    let mut literal = false;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        if let Some(after) = rest.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
            literal = true;
        } else if let Some(after) = rest.strip_prefix("${") {
            let end = after
                .find('}')
                .ok_or_else(|| "a ${ without its closing } (write $${ for a literal ${)".to_string())?;
            let inner = &after[..end];
            let (name, default) = match inner.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (inner, None),
            };
            if !is_variable_name(name) {
                return Err(format!(
                    "${{{name}}} is not a variable reference: names are letters, digits and _"
                ));
            }
            let found = lookup(name).filter(|v| default.is_none() || !v.is_empty());
            match (found, default) {
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => {
                    return Err(format!(
                        "environment variable {name} is not set (give a default with ${{{name}:-default}})"
                    ))
                }
            }
            references += 1;
            rest = &after[end + 1..];
        } else {
            out.push('$');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    let whole = references == 1 && !literal && s.starts_with("${") && s.ends_with('}') && s.matches("${").count() == 1;
    Ok((out, whole))
}

fn is_variable_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A whole-reference value as the type it looks like.
fn typed(text: String) -> toml::Value {
    if let Ok(i) = text.parse::<i64>() {
        toml::Value::Integer(i)
    } else if let Ok(b) = text.parse::<bool>() {
        toml::Value::Boolean(b)
    } else if text.contains('.') && text.parse::<f64>().is_ok() {
        toml::Value::Float(text.parse().unwrap_or_default())
    } else {
        toml::Value::String(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn run(text: &str, vars: &[(&str, &str)]) -> (toml::Table, Vec<Problem>) {
        let vars: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut table: toml::Table = text.parse().expect("toml");
        let mut problems = Vec::new();
        expand(&mut table, &|k| vars.get(k).cloned(), &mut problems);
        (table, problems)
    }

    #[test]
    fn references_defaults_and_literals_expand_in_every_string() {
        let (t, problems) = run(
            r#"
            url = "postgres://${DB_HOST}:${DB_PORT:-5432}/db"
            start = "${START:-17}"
            on = "${FLAG}"
            note = "costs $$5 and $${HOME}"
            [[s]]
            list = ["${A}", "x${A}y"]
            "#,
            &[("DB_HOST", "db.internal"), ("FLAG", "true"), ("A", "aa")],
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(t["url"].as_str(), Some("postgres://db.internal:5432/db"));
        assert_eq!(
            t["start"].as_integer(),
            Some(17),
            "a whole reference that looks like a number is one"
        );
        assert_eq!(t["on"].as_bool(), Some(true));
        assert_eq!(t["note"].as_str(), Some("costs $$5 and ${HOME}"));
        let list = t["s"].as_array().and_then(|a| a[0]["list"].as_array()).expect("list");
        assert_eq!(list[0].as_str(), Some("aa"));
        assert_eq!(list[1].as_str(), Some("xaay"));
    }

    #[test]
    fn an_unset_variable_without_a_default_names_the_key_and_the_variable() {
        let (_, problems) = run(
            "[database]\nurl = \"${SECRET_DB_URL}\"\n[[streams]]\nrpc_urls = [\"${RPC}\"]",
            &[],
        );
        let got: Vec<(&str, &str)> = problems.iter().map(|p| (p.key.as_str(), p.message.as_str())).collect();
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].0, "database.url");
        assert!(got[0].1.contains("SECRET_DB_URL is not set"), "{got:?}");
        assert_eq!(got[1].0, "streams[0].rpc_urls[0]");
    }

    #[test]
    fn an_empty_variable_takes_the_default_and_a_bad_reference_is_reported() {
        let (t, problems) = run(
            "a = \"${E:-d}\"\nb = \"${E}\"\nc = \"${1X}\"\nd = \"${OPEN\"",
            &[("E", "")],
        );
        assert_eq!(t["a"].as_str(), Some("d"));
        assert_eq!(t["b"].as_str(), Some(""));
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, vec!["c", "d"]);
    }
}
