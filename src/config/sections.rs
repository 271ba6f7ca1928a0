//! The `[database]`, `[service]` and `[telemetry]` tables.

use super::fields::Fields;
use super::{DatabaseConfig, EnvOverrides, Problem, ServiceConfig, TelemetryConfig};
use crate::redact::Secret;
use crate::store::pool::{DbSettings, TxLimits};

fn schema_name(name: &str) -> Result<String, String> {
    let mut chars = name.chars();
    let ok = name.len() <= 63
        && chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok && !name.starts_with("pg_") {
        Ok(name.to_string())
    } else {
        Err(format!(
            "must be 1-63 characters of [a-z0-9_], starting with a letter or _, and not pg_…; got {name:?}"
        ))
    }
}

pub(super) fn parse_database(
    table: Option<&toml::Table>,
    env: &EnvOverrides,
    problems: &mut Vec<Problem>,
) -> Option<DatabaseConfig> {
    let empty = toml::Table::new();
    let mut f = Fields::new(table.unwrap_or(&empty), "database", problems);
    let file_url: Option<String> = f.optional("url");
    let url_file = f.secret_file("url_file");
    let password = f.secret_file("password_file");
    let sslmode = f.optional::<String>("sslmode").and_then(|m| match m.parse() {
        Ok(mode) => Some(mode),
        Err(e) => {
            f.problem("sslmode", e);
            None
        }
    });
    let sslrootcert: Option<String> = f.optional("sslrootcert");
    let schema = f.optional::<String>("schema").unwrap_or_else(|| "public".into());
    let schema = match schema_name(&schema) {
        Ok(s) => Some(s),
        Err(e) => {
            f.problem("schema", e);
            None
        }
    };
    let pool_size = f.int_in("pool_size", Some(4), 1..=1000);
    let connect_timeout = f.duration("connect_timeout", "5s");
    let checkout_timeout = f.positive_duration("checkout_timeout", "5s");
    let connect_retry_for = f.duration("connect_retry_for", "60s");
    let lock_timeout = f.duration("lock_timeout", "5s");
    let statement_timeout = f.duration("statement_timeout", "30s");
    let idle = f.duration("idle_in_transaction_timeout", "15s");
    let url = match env
        .database_url
        .clone()
        .or(url_file.map(|s| s.expose().to_string()))
        .or(file_url)
    {
        None => {
            f.problem("url", "required (or url_file, or set DATABASE_URL)".into());
            None
        }
        Some(u) => match crate::store::tls::split_url(&u)
            .and_then(|(rest, _)| rest.parse::<tokio_postgres::Config>().map_err(|e| e.to_string()))
        {
            Ok(_) => Some(Secret::new(u)),
            Err(e) => {
                // The parsers' messages never echo the URL, so no secret leaks.
                f.problem("url", format!("not a valid PostgreSQL URL: {e}"));
                None
            }
        },
    };
    f.finish();
    Some(DatabaseConfig {
        settings: DbSettings {
            url: url?,
            password,
            sslmode,
            sslrootcert: sslrootcert.map(std::path::PathBuf::from),
            schema: schema?,
            pool_size: usize::try_from(pool_size?).ok()?,
            connect_timeout: connect_timeout?,
            checkout_timeout: checkout_timeout?,
        },
        connect_retry_for: connect_retry_for?,
        limits: TxLimits {
            lock_timeout: lock_timeout?,
            statement_timeout: statement_timeout?,
            idle_in_transaction_timeout: idle?,
        },
    })
}

pub(super) fn parse_service(table: Option<&toml::Table>, problems: &mut Vec<Problem>) -> Option<ServiceConfig> {
    let empty = toml::Table::new();
    let mut f = Fields::new(table.unwrap_or(&empty), "service", problems);
    let shutdown_grace = f.duration("shutdown_grace", "20s");
    f.finish();
    Some(ServiceConfig {
        shutdown_grace: shutdown_grace?,
    })
}

pub(super) fn parse_telemetry(
    table: Option<&toml::Table>,
    env: &EnvOverrides,
    problems: &mut Vec<Problem>,
) -> Option<TelemetryConfig> {
    let empty = toml::Table::new();
    let mut f = Fields::new(table.unwrap_or(&empty), "telemetry", problems);
    let in_file = f.optional::<String>("http_listen");
    let listen = env
        .http_listen
        .clone()
        .or(in_file)
        .unwrap_or_else(|| "0.0.0.0:9464".into());
    let http_listen = if listen.is_empty() {
        Some(None)
    } else {
        match listen.parse() {
            Ok(a) => Some(Some(a)),
            Err(_) => {
                f.problem(
                    "http_listen",
                    format!("not an address like \"0.0.0.0:9464\": {listen:?}"),
                );
                None
            }
        }
    };
    let max_lag_blocks = if f.optional::<toml::Value>("max_lag_blocks").is_some() {
        f.int_in("max_lag_blocks", None, 0..=i64::MAX).map(Some)
    } else {
        Some(None)
    };
    f.finish();
    Some(TelemetryConfig {
        http_listen: http_listen?,
        max_lag_blocks: max_lag_blocks?,
    })
}
