//! `logcursor` as a process: the command with a clean environment, replicas
//! spawned from a config file, signals as an operator sends them, and exits
//! collected with a deadline.

use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

/// `logcursor ARGS --config CONFIG --replica-id REPLICA`, with a clean
/// environment (no DATABASE_URL, no OTLP export), info logs, piped output.
pub fn logcursor_cmd(args: &[&str], config: &std::path::Path, replica: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_logcursor"));
    c.args(args)
        .arg("--config")
        .arg(config)
        .arg("--replica-id")
        .arg(replica)
        .env_remove("DATABASE_URL")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    c
}

/// A `logcursor run` replica process with extra environment variables.
pub fn spawn_replica(config: &std::path::Path, replica: &str, envs: &[(&str, String)]) -> Child {
    let mut c = logcursor_cmd(&["run"], config, replica);
    c.envs(envs.iter().map(|(k, v)| (*k, v.as_str())));
    c.spawn().expect("start logcursor")
}

/// Waits for a child to exit, within `within`, collecting its output.
pub async fn finish(child: Child, within: Duration) -> std::process::Output {
    tokio::time::timeout(within, child.wait_with_output())
        .await
        .expect("process did not exit in time")
        .expect("wait for process")
}

/// SIGTERM to every replica, then each must exit 0 within 30 s; returns
/// their stderr, in order.
pub async fn stop_all(replicas: Vec<Child>) -> Vec<String> {
    for r in &replicas {
        signal(r, "TERM");
    }
    let mut logs = Vec::new();
    for r in replicas {
        let out = finish(r, Duration::from_secs(30)).await;
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{:?}: {stderr}", out.status);
        logs.push(stderr);
    }
    logs
}

/// Sends a signal by name (TERM, STOP, CONT) to a child, as an operator would.
pub fn signal(child: &Child, name: &str) {
    let pid = child.id().expect("running child");
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name} {pid}");
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
