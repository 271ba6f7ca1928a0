//! The replica processes of a chaos run: `logcursor run`, each with its own
//! HTTP port and log file; killed (SIGKILL, restarted shortly after),
//! frozen (SIGSTOP, then SIGCONT), and at the end stopped with SIGTERM.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use rand::Rng;
use tokio::process::Child;
use tokio::time::Instant;

use super::Tally;
use crate::support::{logcursor_cmd, signal};

enum State {
    Running(Child),
    /// SIGSTOPped until then.
    Frozen(Child, Instant),
    /// Killed; started again then.
    Down(Instant),
}

struct Replica {
    name: String,
    port: u16,
    /// Starts so far: each start has its own replica id (`name-start`).
    starts: u32,
    state: State,
}

pub struct Replicas {
    config: PathBuf,
    logs: PathBuf,
    all: Vec<Replica>,
}

fn spawn(config: &Path, logs: &Path, replica: &mut Replica) -> Child {
    replica.starts += 1;
    let id = format!("{}-{}", replica.name, replica.starts);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(logs.join(format!("{}.log", replica.name)))
        .expect("replica log");
    let mut cmd = logcursor_cmd(&["run"], config, &id);
    cmd.env("LOGCURSOR_HTTP_LISTEN", format!("127.0.0.1:{}", replica.port))
        .stdout(Stdio::from(log.try_clone().expect("log")))
        .stderr(Stdio::from(log));
    cmd.spawn().expect("start logcursor")
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

impl Replicas {
    pub fn start(n: usize, config: &Path, logs: &Path) -> Replicas {
        let mut r = Replicas {
            config: config.to_path_buf(),
            logs: logs.to_path_buf(),
            all: Vec::new(),
        };
        for i in 0..n {
            let mut replica = Replica {
                name: format!("r{i}"),
                port: free_port(),
                starts: 0,
                state: State::Down(Instant::now()),
            };
            let child = spawn(config, logs, &mut replica);
            replica.state = State::Running(child);
            r.all.push(replica);
        }
        r
    }

    fn running(&self) -> Vec<usize> {
        (0..self.all.len())
            .filter(|i| matches!(self.all[*i].state, State::Running(_)))
            .collect()
    }

    /// SIGKILLs a running replica; it is started again 0.2-3 s later.
    pub async fn kill_one(&mut self, rng: &mut impl Rng, tally: &Tally) {
        let running = self.running();
        if running.is_empty() {
            return;
        }
        let i = running[rng.gen_range(0..running.len())];
        let back = Instant::now() + Duration::from_millis(rng.gen_range(200..3_000));
        if let State::Running(mut child) = std::mem::replace(&mut self.all[i].state, State::Down(back)) {
            let _ = child.start_kill();
            let _ = child.wait().await;
            tally.add("replica: SIGKILL", 1);
        }
    }

    /// SIGSTOPs a running replica for 1-20 s (past the 15 s idle bound at times).
    pub fn freeze_one(&mut self, rng: &mut impl Rng, tally: &Tally) {
        let running = self.running();
        if running.is_empty() {
            return;
        }
        let i = running[rng.gen_range(0..running.len())];
        let until = Instant::now() + Duration::from_millis(rng.gen_range(1_000..20_000));
        if let State::Running(child) = std::mem::replace(&mut self.all[i].state, State::Down(until)) {
            signal(&child, "STOP");
            tally.add("replica: SIGSTOP", 1);
            self.all[i].state = State::Frozen(child, until);
        }
    }

    /// Thaws frozen replicas and restarts killed ones whose time has come
    /// (all of them with `all`).
    pub fn wake(&mut self, all: bool) {
        let now = Instant::now();
        let (config, logs) = (&self.config, &self.logs);
        for r in &mut self.all {
            let due = match &r.state {
                State::Frozen(_, until) | State::Down(until) => all || *until <= now,
                State::Running(_) => false,
            };
            if !due {
                continue;
            }
            r.state = match std::mem::replace(&mut r.state, State::Down(now)) {
                State::Frozen(child, _) => {
                    signal(&child, "CONT");
                    State::Running(child)
                }
                State::Down(_) => State::Running(spawn(config, logs, r)),
                running => running,
            };
        }
    }

    /// A replica that exited by itself is a failure: (name, status).
    pub fn exited(&mut self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for r in &mut self.all {
            if let State::Running(child) = &mut r.state {
                if let Ok(Some(status)) = child.try_wait() {
                    out.push((r.name.clone(), status.to_string()));
                    r.state = State::Down(Instant::now());
                }
            }
        }
        out
    }

    /// How many times replicas were started, in all.
    pub fn starts(&self) -> u32 {
        self.all.iter().map(|r| r.starts).sum()
    }

    /// SIGTERM to every replica (all running by now); each exit code.
    pub async fn terminate(self) -> Vec<(String, Option<i32>)> {
        let mut children = Vec::new();
        for r in self.all {
            if let State::Running(child) = r.state {
                signal(&child, "TERM");
                children.push((r.name, child));
            }
        }
        let mut out = Vec::new();
        for (name, mut child) in children {
            let code = match tokio::time::timeout(Duration::from_secs(40), child.wait()).await {
                Ok(Ok(status)) => status.code(),
                _ => {
                    let _ = child.start_kill();
                    None
                }
            };
            out.push((name, code));
        }
        out
    }
}
