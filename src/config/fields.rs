//! Reading one TOML table key by key: every missing, mistyped, out-of-range
//! or unknown key becomes a [`Problem`] naming it, and reading goes on, so
//! that one run reports everything wrong with a file.

use std::collections::HashSet;
use std::time::Duration;

use serde::de::DeserializeOwned;

use super::Problem;
use crate::redact::Secret;

/// Reads the keys of one TOML table, recording a [`Problem`] for each
/// missing, mistyped or unknown key instead of stopping at the first.
pub(super) struct Fields<'a> {
    table: &'a toml::Table,
    prefix: String,
    problems: &'a mut Vec<Problem>,
    /// Keys read so far; whatever else the table holds is unknown.
    known: HashSet<&'static str>,
}

impl<'a> Fields<'a> {
    pub(super) fn new(table: &'a toml::Table, prefix: &str, problems: &'a mut Vec<Problem>) -> Self {
        Self {
            table,
            prefix: prefix.to_string(),
            problems,
            known: HashSet::new(),
        }
    }

    pub(super) fn key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.prefix)
        }
    }

    pub(super) fn problem(&mut self, key: &str, message: String) {
        let key = self.key(key);
        self.problems.push(Problem { key, message });
    }

    pub(super) fn optional<T: DeserializeOwned>(&mut self, key: &'static str) -> Option<T> {
        self.known.insert(key);
        let value = self.table.get(key)?.clone();
        let kind = value.type_str();
        match T::deserialize(value) {
            Ok(v) => Some(v),
            Err(e) => {
                let msg = e.message().to_string();
                self.problem(key, format!("wrong type ({kind}): {msg}"));
                None
            }
        }
    }

    pub(super) fn required<T: DeserializeOwned>(&mut self, key: &'static str) -> Option<T> {
        if !self.table.contains_key(key) {
            self.known.insert(key);
            self.problem(key, "required".into());
            return None;
        }
        self.optional(key)
    }

    /// A duration such as "1s", "250ms", "2m"; `default` when absent.
    pub(super) fn duration(&mut self, key: &'static str, default: &str) -> Option<Duration> {
        let text = self.optional::<String>(key).unwrap_or_else(|| default.to_string());
        match humantime::parse_duration(&text) {
            Ok(d) => Some(d),
            Err(e) => {
                self.problem(key, format!("not a duration like \"1s\" or \"250ms\": {e}"));
                None
            }
        }
    }

    /// An integer within `range`; `default` when absent (`None`: required).
    pub(super) fn int_in(
        &mut self,
        key: &'static str,
        default: Option<i64>,
        range: std::ops::RangeInclusive<i64>,
    ) -> Option<u64> {
        let v = match default {
            Some(d) => self
                .optional::<i64>(key)
                .or(if self.table.contains_key(key) { None } else { Some(d) })?,
            None => self.required::<i64>(key)?,
        };
        if !range.contains(&v) {
            self.problem(
                key,
                format!("must be between {} and {}, got {v}", range.start(), range.end()),
            );
            return None;
        }
        u64::try_from(v).ok()
    }

    pub(super) fn positive_duration(&mut self, key: &'static str, default: &str) -> Option<Duration> {
        let d = self.duration(key, default)?;
        if d.is_zero() {
            self.problem(key, "must be greater than zero".into());
            return None;
        }
        Some(d)
    }

    /// A required, non-empty list whose items each pass `item`; every bad
    /// item is reported with its index.
    pub(super) fn list<T, R>(
        &mut self,
        key: &'static str,
        what: &str,
        item: impl Fn(T) -> Result<R, String>,
    ) -> Option<Vec<R>>
    where
        T: DeserializeOwned,
    {
        let raw: Vec<T> = self.required(key)?;
        if raw.is_empty() {
            self.problem(key, format!("must list {what}"));
            return None;
        }
        let mut out = Vec::with_capacity(raw.len());
        let mut ok = true;
        for (j, v) in raw.into_iter().enumerate() {
            match item(v) {
                Ok(r) => out.push(r),
                Err(msg) => {
                    self.problem(&format!("{key}[{j}]"), msg);
                    ok = false;
                }
            }
        }
        ok.then_some(out)
    }

    /// The trimmed content of the file named by `key` (orchestrators mount
    /// secrets as files). Problems name the key and the path, never the content.
    pub(super) fn secret_file(&mut self, key: &'static str) -> Option<Secret> {
        let path: String = self.optional(key)?;
        match read_secret(&path) {
            Ok(s) => Some(s),
            Err(e) => {
                self.problem(key, e);
                None
            }
        }
    }

    /// One of `choices` (by name); `default` when absent.
    pub(super) fn choice<T: Copy>(&mut self, key: &'static str, default: &str, choices: &[(&str, T)]) -> Option<T> {
        let text = self.optional::<String>(key).unwrap_or_else(|| default.to_string());
        let found = choices.iter().find(|(name, _)| *name == text).map(|(_, v)| *v);
        if found.is_none() {
            let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
            self.problem(key, format!("must be one of {names:?}, got {text:?}"));
        }
        found
    }

    pub(super) fn table(&mut self, key: &'static str) -> Option<toml::Table> {
        self.optional(key)
    }

    pub(super) fn array_of_tables(&mut self, key: &'static str) -> Option<Vec<toml::Table>> {
        self.optional(key)
    }

    /// Records every key that was never asked for.
    pub(super) fn finish(self) {
        let unknown: Vec<String> = self
            .table
            .keys()
            .filter(|k| !self.known.contains(k.as_str()))
            .map(|k| {
                if self.prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{}.{k}", self.prefix)
                }
            })
            .collect();
        for key in unknown {
            self.problems.push(Problem {
                key,
                message: "unknown key".into(),
            });
        }
    }
}

/// The trimmed content of a secret file.
pub(super) fn read_secret(path: &str) -> Result<Secret, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(format!("{path} is empty"));
    }
    Ok(Secret::new(trimmed))
}
