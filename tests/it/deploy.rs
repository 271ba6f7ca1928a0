//! The deploy manifests cannot be applied here (no cluster, no Docker
//! engine), so they are checked by construction: every YAML file parses, the
//! config they ship passes the binary's own validation, and the Deployment
//! has what operating N replicas needs.

use std::path::{Path, PathBuf};

use logcursor::config::{Config, EnvOverrides};
use serde_yaml::Value;

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read deploy dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            out.extend(yaml_files(&path));
        } else if matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            out.push(path);
        }
    }
    out
}

fn documents() -> Vec<(PathBuf, Value)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let mut docs = Vec::new();
    for path in yaml_files(&root) {
        let text = std::fs::read_to_string(&path).expect("read yaml");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let mut v: Value = serde_yaml::with::singleton_map_recursive::deserialize(doc)
                .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()));
            v.apply_merge()
                .unwrap_or_else(|e| panic!("{}: merge keys: {e}", path.display()));
            docs.push((path.clone(), v));
        }
    }
    docs
}

fn kind<'a>(docs: &'a [(PathBuf, Value)], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|(_, d)| d["kind"] == kind).map(|(_, d)| d).collect()
}

#[test]
fn the_kubernetes_manifests_parse_and_ship_a_valid_config_for_three_graceful_replicas() {
    let docs = documents();
    assert!(docs.len() >= 4, "found {} YAML documents", docs.len());

    let maps = kind(&docs, "ConfigMap");
    let toml = maps[0]["data"]["logcursor.toml"]
        .as_str()
        .expect("logcursor.toml in the ConfigMap");
    let env = EnvOverrides {
        database_url: Some("postgres://u@db:5432/logcursor".into()),
        ..Default::default()
    };
    let config = Config::parse(toml, "deploy/kubernetes/configmap.yaml", &env).unwrap_or_else(|e| panic!("{e}"));

    let deployment = kind(&docs, "Deployment")[0];
    assert_eq!(deployment["spec"]["replicas"], 3);
    let pod = &deployment["spec"]["template"]["spec"];
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    let needed = config.service.shutdown_grace + config.database.limits.lock_timeout;
    assert!(
        grace > needed.as_secs(),
        "grace {grace}s must exceed shutdown_grace + lock_timeout ({needed:?})"
    );
    let container = &pod["containers"][0];
    assert!(container["image"].as_str().is_some_and(|i| i.starts_with("logcursor")));
    assert_eq!(container["args"][0], "run");
    let env_names: Vec<&str> = container["env"]
        .as_sequence()
        .expect("env")
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    for name in ["LOGCURSOR_CONFIG", "DATABASE_URL", "LOGCURSOR_REPLICA_ID"] {
        assert!(env_names.contains(&name), "{name} missing from {env_names:?}");
    }
    let db_url = container["env"]
        .as_sequence()
        .and_then(|s| s.iter().find(|e| e["name"] == "DATABASE_URL"))
        .expect("DATABASE_URL");
    assert!(
        db_url["valueFrom"]["secretKeyRef"]["name"].is_string(),
        "DATABASE_URL comes from a Secret"
    );
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/livez");
    assert!(
        container["resources"]["limits"]["memory"].is_string() && container["resources"]["requests"]["cpu"].is_string()
    );
    assert_eq!(deployment["spec"]["strategy"]["type"], "RollingUpdate");
    let service = kind(&docs, "Service")[0];
    assert_eq!(service["spec"]["ports"][0]["port"], 9464);
    let pdb = kind(&docs, "PodDisruptionBudget")[0];
    assert!(pdb["spec"]["minAvailable"]
        .as_u64()
        .is_some_and(|n| (1..3).contains(&n)));
    let sc = &container["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
}

#[test]
fn the_compose_stack_wires_three_replicas_to_postgres_anvil_and_the_collector() {
    let docs = documents();
    let compose = docs
        .iter()
        .find(|(p, _)| p.ends_with("compose/docker-compose.yaml"))
        .map(|(_, d)| d)
        .expect("deploy/compose/docker-compose.yaml");
    let services = &compose["services"];
    for name in ["postgres", "anvil", "otel-collector", "jaeger"] {
        assert!(services[name].is_mapping(), "service {name}");
    }
    let replicas: Vec<&str> = ["replica-1", "replica-2", "replica-3"]
        .into_iter()
        .filter(|r| services[*r].is_mapping())
        .collect();
    assert_eq!(replicas.len(), 3);
    for r in replicas {
        let svc = &services[r];
        assert_eq!(svc["image"], "logcursor:latest", "{r}");
        assert_eq!(svc["command"][0], "run", "{r}");
        assert_eq!(svc["stop_grace_period"], "40s", "{r}");
        let env = &svc["environment"];
        for var in [
            "LOGCURSOR_CONFIG",
            "DATABASE_URL",
            "LOGCURSOR_REPLICA_ID",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ] {
            assert!(env[var].is_string(), "{r} lacks {var}");
        }
        assert_eq!(env["LOGCURSOR_REPLICA_ID"], r);
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/compose");
    let toml = std::fs::read_to_string(dir.join("logcursor.toml")).expect("compose logcursor.toml");
    let env = EnvOverrides {
        database_url: Some("postgres://logcursor:logcursor@postgres:5432/logcursor".into()),
        ..Default::default()
    };
    Config::parse(&toml, "deploy/compose/logcursor.toml", &env).unwrap_or_else(|e| panic!("{e}"));
    let collector = docs
        .iter()
        .find(|(p, _)| p.ends_with("compose/otel-collector.yaml"))
        .map(|(_, d)| d)
        .expect("otel-collector.yaml");
    assert!(collector["service"]["pipelines"]["traces"]["exporters"]
        .as_sequence()
        .is_some_and(|e| !e.is_empty()));
}

#[test]
fn the_dockerfile_builds_the_binary_and_runs_it_unprivileged() {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile")).expect("Dockerfile");
    let stages = text.lines().filter(|l| l.starts_with("FROM ")).count();
    assert!(stages >= 2, "multi-stage");
    assert!(text.contains("cargo build --release --locked"));
    assert!(
        text.contains("COPY sql sql"),
        "migrations are compiled in (include_str!)"
    );
    let user = text.lines().rev().find(|l| l.starts_with("USER ")).expect("USER");
    assert!(!user.contains("root") && !user.contains(" 0"), "{user}");
    assert!(text.contains("ENTRYPOINT [\"/usr/local/bin/logcursor\"]"));
}

fn vars(pairs: &[(&str, &str)]) -> EnvOverrides {
    EnvOverrides {
        vars: Some(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
        ..Default::default()
    }
}

#[test]
fn the_environment_only_config_runs_from_variables_and_names_a_missing_one() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let toml = std::fs::read_to_string(root.join("deploy/env/logcursor.toml")).expect("env config");
    let set = [
        ("APP_DATABASE_URL", "postgres://app:pw@db:5432/app"),
        ("APP_CHAIN_ID", "1"),
        ("APP_RPC_URL", "https://rpc.example/v2/KEY"),
        (
            "APP_BURN_CONTRACT_ADDRESS",
            "0x5fbdb2315678afecb367f032d93f642f64180aa3",
        ),
        ("APP_START_BLOCK", "19000000"),
    ];
    let c = Config::parse(&toml, "deploy/env/logcursor.toml", &vars(&set)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.database.settings.schema, "logcursor");
    assert_eq!(c.streams[0].chain_id, 1);
    assert_eq!(c.streams[0].start_block.get(), 19_000_000);
    assert_eq!(c.streams[0].finality, logcursor::config::Finality::Finalized);
    let e = Config::parse(&toml, "t", &vars(&set[..3])).expect_err("a variable is missing");
    let shown = e.to_string();
    assert!(shown.contains("APP_BURN_CONTRACT_ADDRESS is not set"), "{shown}");
    assert!(!shown.contains("KEY") && !shown.contains(":pw@"), "{shown}");
    // The image ships it.
    let docker = std::fs::read_to_string(root.join("Dockerfile")).expect("Dockerfile");
    assert!(docker.contains("COPY deploy/env/logcursor.toml /etc/logcursor/env.toml"));
    let ignore = std::fs::read_to_string(root.join(".dockerignore")).expect(".dockerignore");
    assert!(
        ignore.contains("!deploy/env/logcursor.toml"),
        "the build context keeps it"
    );
}

#[test]
fn the_ecs_example_runs_two_replicas_that_drain_on_stop_configured_from_the_environment() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/ecs");
    let read = |f: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(root.join(f)).expect("read")).expect("json")
    };
    let (task, service) = (read("task-definition.json"), read("service.json"));
    assert_eq!(service["desiredCount"], 2);
    let c = &task["containerDefinitions"][0];
    assert_eq!(c["command"][0], "run");
    let env: Vec<&str> = c["environment"]
        .as_array()
        .expect("environment")
        .iter()
        .filter_map(|e| e["name"].as_str())
        .chain(
            c["secrets"]
                .as_array()
                .expect("secrets")
                .iter()
                .filter_map(|e| e["name"].as_str()),
        )
        .collect();
    let toml = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/env/logcursor.toml"))
        .expect("env config");
    // Every variable the config needs without a default is set by the task.
    for needed in [
        "APP_DATABASE_URL",
        "APP_CHAIN_ID",
        "APP_RPC_URL",
        "APP_BURN_CONTRACT_ADDRESS",
    ] {
        assert!(
            toml.contains(&format!("${{{needed}}}")),
            "{needed} is read by the config"
        );
        assert!(env.contains(&needed), "{needed} set by the task: {env:?}");
    }
    let secrets: Vec<&str> = c["secrets"]
        .as_array()
        .expect("secrets")
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert!(
        secrets.contains(&"APP_DATABASE_URL") && secrets.contains(&"APP_RPC_URL"),
        "credentials from a secret store"
    );
    let set: Vec<(&str, &str)> = vec![
        ("APP_DATABASE_URL", "postgres://u@db/app"),
        ("APP_RPC_URL", "https://rpc.example"),
        ("APP_CHAIN_ID", "1"),
        (
            "APP_BURN_CONTRACT_ADDRESS",
            "0x5fbdb2315678afecb367f032d93f642f64180aa3",
        ),
    ];
    let cfg = Config::parse(&toml, "env", &vars(&set)).unwrap_or_else(|e| panic!("{e}"));
    let needed = cfg.service.shutdown_grace + cfg.database.limits.lock_timeout;
    assert!(
        c["stopTimeout"].as_u64().is_some_and(|s| s > needed.as_secs()),
        "stopTimeout covers the drain"
    );
    assert_eq!(c["readonlyRootFilesystem"], true);
}

#[test]
fn the_payment_grade_example_config_is_valid_and_says_what_it_promises() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples/payments.toml");
    let text = std::fs::read_to_string(&path).expect("payments.toml");
    let dir = tempfile::tempdir().expect("dir");
    let mut text = text;
    for secret in [
        "database-url",
        "rpc-primary",
        "rpc-fallback",
        "payments-webhook-url",
        "payments-webhook-secret",
    ] {
        let file = dir.path().join(secret);
        let value = match secret {
            "database-url" => "postgres://u@db/app",
            "payments-webhook-secret" => "whsec",
            _ => "https://example.com/x",
        };
        std::fs::write(&file, value).expect("write");
        text = text.replace(&format!("/run/secrets/{secret}"), &file.display().to_string());
    }
    let c = Config::parse(&text, "payments.toml", &EnvOverrides::default()).unwrap_or_else(|e| panic!("{e}"));
    let s = &c.streams[0];
    assert_eq!(s.finality, logcursor::config::Finality::Finalized);
    assert_eq!(s.on_deep_reorg, logcursor::config::DeepReorgPolicy::Halt);
    assert_eq!(s.on_bad_event, logcursor::write::OnFailure::Halt);
    assert_eq!(s.webhooks.len(), 1);
}
