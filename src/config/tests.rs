use super::*;

const GOOD: &str = r#"
[database]
url = "postgres://logcursor:hunter2@localhost:5432/logcursor"
pool_size = 8

[[streams]]
name = "burns"
chain_id = 31337
rpc_urls = ["http://127.0.0.1:8545"]
addresses = ["0x5FbDB2315678afecb367f032d93F642f64180aa3"]
events = ["event Burned(address indexed from, uint256 amount)"]
start_block = 0
confirmations = 2
max_block_range = 2000
poll_interval = "1s"
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, "test.toml", &EnvOverrides::default())
}

fn keys(e: &ConfigError) -> Vec<&str> {
    e.problems.iter().map(|p| p.key.as_str()).collect()
}

#[test]
fn the_documented_example_parses_with_its_values() {
    let c = parse(GOOD).expect("valid");
    assert_eq!(c.database.settings.pool_size, 8);
    assert_eq!(c.database.settings.schema, "public", "the default schema");
    let s = &c.streams[0];
    assert_eq!(
        (
            s.name.as_str(),
            s.chain_id,
            s.start_block.get(),
            s.confirmations,
            s.max_block_range
        ),
        ("burns", 31337, 0, 2, 2000)
    );
    assert_eq!(s.poll_interval, Duration::from_secs(1));
    assert_eq!(s.addresses[0].to_string(), "0x5fbdb2315678afecb367f032d93f642f64180aa3");
}

#[test]
fn every_problem_is_reported_at_once_naming_its_key() {
    let text = r#"
[database]
url = "postgres://localhost/db"
pool_size = 0
colour = "blue"

[service]
shutdown_grace = "soon"

[[streams]]
name = "bad name!"
chain_id = "one"
rpc_urls = ["ftp://x", "http://ok"]
addresses = ["0x12"]
events = ["event Broken("]
confirmations = -1
max_block_range = 0
poll_interval = "0s"
extra = 1

[[streams]]
name = "b"
chain_id = 1
rpc_urls = []
addresses = ["0x5fbdb2315678afecb367f032d93f642f64180aa3"]
events = ["event Burned(address indexed from, uint256 amount)"]
"#;
    let e = parse(text).expect_err("invalid");
    let got = keys(&e);
    for want in [
        "database.pool_size",
        "database.colour",
        "service.shutdown_grace",
        "streams[0].name",
        "streams[0].chain_id",
        "streams[0].rpc_urls[0]",
        "streams[0].addresses[0]",
        "streams[0].events[0]",
        "streams[0].confirmations",
        "streams[0].max_block_range",
        "streams[0].poll_interval",
        "streams[0].extra",
        "streams[1].rpc_urls",
    ] {
        assert!(got.contains(&want), "missing {want} in {got:?}");
    }
    let unknown = e
        .problems
        .iter()
        .find(|p| p.key == "database.colour")
        .map(|p| p.message.as_str());
    assert_eq!(unknown, Some("unknown key"));
    let text = e.to_string();
    assert!(text.contains("streams[0].chain_id"), "{text}");
}

#[test]
fn unknown_top_level_keys_and_missing_sections_are_errors() {
    let e = parse("[[streams]]\nname = \"x\"\nsurprise = true\n[other]\n").expect_err("invalid");
    let got = keys(&e);
    for want in [
        "other",
        "database.url",
        "streams[0].surprise",
        "streams[0].chain_id",
        "streams[0].rpc_urls",
        "streams[0].addresses",
        "streams[0].events",
    ] {
        assert!(got.contains(&want), "missing {want} in {got:?}");
    }
    assert!(keys(&parse("").expect_err("empty")).contains(&"streams"));
}

#[test]
fn database_url_comes_from_the_environment_over_the_file() {
    let env = EnvOverrides {
        database_url: Some("postgres://env-host/envdb".into()),
        ..Default::default()
    };
    let c = Config::parse(GOOD, "t", &env).expect("valid");
    assert_eq!(c.database.settings.url.expose(), "postgres://env-host/envdb");
    let without_url = GOOD.replace("url = \"postgres://logcursor:hunter2@localhost:5432/logcursor\"", "");
    assert!(Config::parse(&without_url, "t", &env).is_ok());
    assert!(keys(&parse(&without_url).expect_err("no url")).contains(&"database.url"));
}

#[test]
fn secrets_never_appear_in_problems() {
    let text = GOOD
        .replace("http://127.0.0.1:8545", "wss://node.example/v2/APIKEY123")
        .replace("pool_size = 8", "pool_size = 8\nurl2 = 1");
    let e = parse(&text).expect_err("invalid");
    let shown = e.to_string();
    assert!(!shown.contains("APIKEY123"), "{shown}");
    assert!(!shown.contains("hunter2"), "{shown}");
}

#[test]
fn timeout_combinations_that_break_a_bound_are_refused() {
    let text = GOOD
        .replace(
            "pool_size = 8",
            "pool_size = 8\nlock_timeout = \"40s\"\nstatement_timeout = \"30s\"\nidle_in_transaction_timeout = \"100ms\"",
        )
        .replace(
            "poll_interval = \"1s\"",
            "poll_interval = \"1s\"\nrpc_timeout = \"10s\"\nrpc_budget = \"5s\"",
        );
    let e = parse(&text).expect_err("invalid");
    let got = keys(&e);
    assert!(got.contains(&"database.lock_timeout"), "{got:?}");
    assert!(got.contains(&"database.idle_in_transaction_timeout"), "{got:?}");
    assert!(got.contains(&"streams[0].rpc_budget"), "{got:?}");
    // A slow provider no longer has to fit the idle bound: the tick's
    // heartbeat keeps its session busy while it waits (I6), and rpc_budget
    // bounds the wait instead.
    let slow = GOOD.replace(
        "poll_interval = \"1s\"",
        "poll_interval = \"1s\"\nrpc_timeout = \"30s\"\nrpc_attempts = 3",
    );
    let c = parse(&slow).expect("valid");
    assert_eq!(
        c.database.limits.idle_in_transaction_timeout,
        Duration::from_secs(15),
        "the default bound"
    );
}

#[test]
fn defaults_are_inherited_by_every_stream_and_a_stream_overrides_them() {
    let second = GOOD
        .split("[[streams]]")
        .nth(1)
        .expect("stream table")
        .replace("\"burns\"", "\"minted\"")
        .replace("Burned(address indexed from, uint256 amount)", "Minted(uint256 amount)")
        .replace("confirmations = 2\n", "");
    let text = format!("{GOOD}\n[[streams]]{second}")
        .replace("confirmations = 2\n", "")
        .replace(
            "[database]",
            "[defaults]\nconfirmations = 12\nrpc_budget = \"20s\"\n\n[database]",
        );
    let text = text.replacen("max_block_range = 2000", "max_block_range = 2000\nconfirmations = 3", 1);
    let c = parse(&text).expect("valid");
    assert_eq!(c.streams[0].confirmations, 3, "the stream's own value wins");
    assert_eq!(c.streams[1].confirmations, 12, "inherited");
    assert_eq!(c.streams[1].rpc_budget, Duration::from_secs(20));
    let bad = text.replace("[defaults]", "[defaults]\nname = \"x\"\ncolour = 1");
    let e = parse(&bad).expect_err("invalid");
    assert_eq!(keys(&e), ["defaults.colour", "defaults.name"]);
}

#[test]
fn environment_references_fill_any_value_and_a_missing_one_names_key_and_variable() {
    let text = GOOD
        .replace(
            "postgres://logcursor:hunter2@localhost:5432/logcursor",
            "postgres://logcursor:${APP_DB_PASSWORD}@${APP_DB_HOST:-localhost}:5432/logcursor",
        )
        .replace(
            "0x5FbDB2315678afecb367f032d93F642f64180aa3",
            "${APP_BURN_CONTRACT_ADDRESS}",
        )
        .replace("chain_id = 31337", "chain_id = \"${APP_CHAIN_ID}\"");
    let vars = |pairs: &[(&str, &str)]| EnvOverrides {
        vars: Some(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
        ..Default::default()
    };
    let env = vars(&[
        ("APP_DB_PASSWORD", "s3cret"),
        (
            "APP_BURN_CONTRACT_ADDRESS",
            "0x5fbdb2315678afecb367f032d93f642f64180aa3",
        ),
        ("APP_CHAIN_ID", "31337"),
    ]);
    let c = Config::parse(&text, "t", &env).expect("valid");
    assert_eq!(
        c.database.settings.url.expose(),
        "postgres://logcursor:s3cret@localhost:5432/logcursor"
    );
    assert_eq!(c.streams[0].chain_id, 31337, "a whole reference is read as a number");
    let e = Config::parse(&text, "t", &vars(&[("APP_DB_PASSWORD", "s3cret")])).expect_err("missing");
    let shown = e.to_string();
    let got = keys(&e);
    assert!(got.contains(&"streams[0].addresses[0]"), "{shown}");
    assert!(got.contains(&"streams[0].chain_id"), "{shown}");
    assert!(
        !got.contains(&"database.url"),
        "a default fills a missing variable: {shown}"
    );
    assert!(shown.contains("APP_BURN_CONTRACT_ADDRESS is not set"), "{shown}");
    assert!(!shown.contains("s3cret"), "a value never appears in a problem: {shown}");
}

#[test]
fn streams_must_have_unique_names_and_not_share_an_event() {
    let second = GOOD.split("[[streams]]").nth(1).expect("stream table");
    let text = format!("{GOOD}\n[[streams]]{second}");
    let e = parse(&text).expect_err("invalid");
    let got = keys(&e);
    assert!(got.contains(&"streams[1].name"), "{got:?}");
    assert!(got.contains(&"streams[1].addresses"), "{got:?}");
    // Another name and another event on the same contract is fine.
    let other = second
        .replace("\"burns\"", "\"minted\"")
        .replace("Burned(address indexed from, uint256 amount)", "Minted(uint256 amount)");
    parse(&format!("{GOOD}\n[[streams]]{other}")).expect("valid");
}

#[test]
fn one_endpoint_has_one_rate_limit_whichever_stream_names_it() {
    let limited = |rate: &str| {
        format!(r#"rpc_urls = [{{ url = "http://127.0.0.1:8545/KEY-123", max_requests_per_second = {rate} }}]"#)
    };
    let first = GOOD.replace(r#"rpc_urls = ["http://127.0.0.1:8545"]"#, &limited("25"));
    let second = first
        .split("[[streams]]")
        .nth(1)
        .expect("stream table")
        .replace("\"burns\"", "\"minted\"")
        .replace("Burned(address indexed from, uint256 amount)", "Minted(uint256 amount)");
    parse(&format!("{first}\n[[streams]]{second}")).expect("the same limit twice is fine");
    let other = second.replace("max_requests_per_second = 25", "max_requests_per_second = 50");
    let e = parse(&format!("{first}\n[[streams]]{other}")).expect_err("two limits for one URL");
    assert_eq!(keys(&e), vec!["streams[1].rpc_urls"]);
    let text = e.to_string();
    assert!(text.contains("50") && text.contains("25"), "{text}");
    assert!(!text.contains("KEY-123"), "the URL is shown redacted: {text}");
}

#[test]
fn ws_urls_are_derived_from_rpc_urls_or_listed_and_checked() {
    let derive = GOOD.replace(
        r#"rpc_urls = ["http://127.0.0.1:8545"]"#,
        r#"rpc_urls = ["http://127.0.0.1:8545", "https://eth.example/v2/KEY123"]
ws_urls = "derive"
ws_poll_interval = "10s""#,
    );
    let s = &parse(&derive).expect("valid").streams[0];
    let urls: Vec<&str> = s.ws.iter().map(|u| u.expose()).collect();
    assert_eq!(urls, ["ws://127.0.0.1:8545/", "wss://eth.example/v2/KEY123"]);
    assert_eq!(s.ws_poll_interval, Duration::from_secs(10));
    let default: Vec<String> = parse(GOOD).expect("valid").streams[0]
        .ws
        .iter()
        .map(|u| u.expose().to_string())
        .collect();
    assert_eq!(
        default,
        ["ws://127.0.0.1:8545/"],
        "push by default, derived from the HTTP URL"
    );
    let off = GOOD.replace(r#"poll_interval = "1s""#, "poll_interval = \"1s\"\nws_urls = \"off\"");
    assert!(
        parse(&off).expect("valid").streams[0].ws.is_empty(),
        "off: polling only"
    );

    let bad = GOOD.replace(
        r#"poll_interval = "1s""#,
        r#"poll_interval = "1s"
ws_urls = ["http://node.example/KEY123", "wss://ok.example"]"#,
    );
    let e = parse(&bad).expect_err("an http URL is not a WebSocket");
    assert_eq!(keys(&e), ["streams[0].ws_urls[0]"]);
    assert!(!e.to_string().contains("KEY123"), "{e}");
    let other = GOOD.replace(r#"poll_interval = "1s""#, "poll_interval = \"1s\"\nws_urls = 3");
    assert_eq!(keys(&parse(&other).expect_err("a number")), ["streams[0].ws_urls"]);
}

/// The ```toml block under "## Configuration" in README.md.
fn readme_configuration() -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README.md");
    let section = &readme[readme.find("## Configuration").expect("a Configuration section")..];
    let start = section.find("```toml\n").expect("a toml block") + "```toml\n".len();
    section[start..][..section[start..].find("```").expect("the block's end")].to_string()
}

#[test]
fn the_readme_reference_configuration_parses_with_the_binarys_own_parser() {
    let text = readme_configuration();
    // No ${VAR} of the test's process leaks in, and no DATABASE_URL override.
    let env = EnvOverrides {
        vars: Some(std::collections::HashMap::new()),
        ..EnvOverrides::default()
    };
    let c = Config::parse(&text, "README.md", &env).unwrap_or_else(|e| panic!("the README's configuration: {e}"));
    assert_eq!(c.database.settings.schema, "public");
    assert_eq!(c.database.limits.idle_in_transaction_timeout, Duration::from_secs(15));
    assert_eq!(c.telemetry.max_lag_blocks, None, "the lag gate is off unless set");
    let s = &c.streams[0];
    assert_eq!(s.name.as_str(), "burns");
    assert_eq!(s.max_logs_per_tick, 50_000);
    assert_eq!(s.rpc_budget, Duration::from_secs(60));
    assert_eq!(s.on_handler_error, OnFailure::DeadLetter);
    assert_eq!(s.handler_function, None);
}

#[test]
fn the_readme_reference_configuration_shows_every_key() {
    let text = readme_configuration();
    let shown = |key: &str| {
        text.contains(&format!("[[streams.{key}]]"))
            || text.lines().any(|l| {
                let l = l.trim_start().trim_start_matches('#').trim_start();
                l.strip_prefix(key)
                    .is_some_and(|rest| rest.trim_start().starts_with('='))
            })
    };
    let tables = ["[database]", "[service]", "[telemetry]", "[defaults]", "[[streams]]"];
    let missing_tables: Vec<&str> = tables.into_iter().filter(|t| !text.contains(t)).collect();
    assert!(
        missing_tables.is_empty(),
        "tables missing from the README: {missing_tables:?}"
    );
    let database = [
        "url",
        "url_file",
        "password_file",
        "sslmode",
        "sslrootcert",
        "schema",
        "pool_size",
        "connect_timeout",
        "checkout_timeout",
        "connect_retry_for",
        "lock_timeout",
        "statement_timeout",
        "idle_in_transaction_timeout",
    ];
    let others = [
        "shutdown_grace",
        "http_listen",
        "max_lag_blocks",
        // [[streams.webhooks]]
        "secret_file",
        "max_attempts",
        "timeout",
        "batch_size",
        "ordered",
        "backoff",
        "backoff_max",
        "keep_delivered",
    ];
    let missing: Vec<&&str> = database
        .iter()
        .chain(others.iter())
        .chain(stream::KEYS.iter())
        .filter(|k| !shown(k))
        .collect();
    assert!(
        missing.is_empty(),
        "keys the code reads but the README's configuration does not show: {missing:?}"
    );
}
