//! Production infrastructure: TLS to PostgreSQL (a cluster started here with
//! a certificate from a CA made here), PgBouncer in transaction mode, a
//! least-privilege runtime role, secrets read from files.

use std::path::{Path, PathBuf};
use std::process::Command as StdCommand;
use std::time::Duration;

use logcursor::app::{App, AppError, BuildOptions};
use logcursor::config::Config;
use logcursor::store::StoreError;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tokio_util::sync::CancellationToken;

use crate::support::*;

fn is_root() -> bool {
    StdCommand::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// Runs a PostgreSQL (or PgBouncer) binary, as the `postgres` OS user when
/// root: both refuse to run as root.
fn run_as_owner(program: &Path, args: &[&str]) -> std::process::Output {
    let mut c = if is_root() {
        let mut c = StdCommand::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        StdCommand::new(program)
    };
    c.args(args).output().expect("run server binary")
}

/// A directory the `postgres` OS user owns.
fn owned_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix("lc-prod").tempdir().expect("tempdir");
    if is_root() {
        assert!(StdCommand::new("chown")
            .args(["postgres:postgres"])
            .arg(dir.path())
            .status()
            .expect("chown")
            .success());
    }
    dir
}

fn write_owned(path: &Path, content: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, content).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    if is_root() {
        assert!(StdCommand::new("chown")
            .arg("postgres:postgres")
            .arg(path)
            .status()
            .expect("chown")
            .success());
    }
}

/// A certificate authority made for one test.
struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let pem = params.self_signed(&key).expect("self-signed").pem();
    Ca { params, key, pem }
}

/// A server certificate for `names`, signed by `ca`: (cert PEM, key PEM).
fn server_cert(ca: &Ca, names: &[&str]) -> (String, String) {
    let key = KeyPair::generate().expect("key");
    let params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).expect("params");
    let issuer = Issuer::from_params(&ca.params, &ca.key);
    (
        params.signed_by(&key, &issuer).expect("sign").pem(),
        key.serialize_pem(),
    )
}

/// A PostgreSQL cluster of this test's own, stopped on drop.
struct PgServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

impl PgServer {
    fn start(tls: Option<(String, String)>) -> PgServer {
        let bin = PathBuf::from(
            std::env::var("LOGCURSOR_TEST_PG_BIN").expect("LOGCURSOR_TEST_PG_BIN: run through scripts/test"),
        );
        let dir = owned_dir();
        let data = dir.path().join("data");
        let out = run_as_owner(
            &bin.join("initdb"),
            &[
                "-D",
                data.to_str().expect("path"),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
            ],
        );
        assert!(out.status.success(), "initdb: {}", text(&out.stderr));
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let mut conf = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nfsync = off\n",
            dir.path().display()
        );
        if let Some((cert, key)) = tls {
            write_owned(&data.join("server.crt"), &cert, 0o644);
            write_owned(&data.join("server.key"), &key, 0o600);
            conf.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        }
        let conf_path = data.join("postgresql.auto.conf");
        write_owned(&conf_path, &conf, 0o600);
        let log = dir.path().join("server.log");
        let out = run_as_owner(
            &bin.join("pg_ctl"),
            &[
                "-D",
                data.to_str().expect("path"),
                "-l",
                log.to_str().expect("path"),
                "-w",
                "start",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        PgServer { dir, bin, port }
    }

    fn url(&self, db: &str, query: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}{query}", self.port)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = run_as_owner(
            &self.bin.join("pg_ctl"),
            &["-D", data.to_str().unwrap_or(""), "-m", "immediate", "stop"],
        );
    }
}

async fn build_with(cfg: &Config, replica: &str, migrate: bool) -> Result<App, AppError> {
    App::build(cfg, replica, BuildOptions { migrate }, &CancellationToken::new()).await
}

fn error_of(r: Result<App, AppError>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_verify_full_ingests_and_a_wrong_ca_a_wrong_host_or_no_tls_fail_clearly() {
    let (good, bad) = (ca("good test CA"), ca("other test CA"));
    let certs = owned_dir();
    let (good_pem, bad_pem) = (certs.path().join("good.pem"), certs.path().join("bad.pem"));
    std::fs::write(&good_pem, &good.pem).expect("write");
    std::fs::write(&bad_pem, &bad.pem).expect("write");
    let server = PgServer::start(Some(server_cert(&good, &["localhost", "127.0.0.1"])));
    let admin = connect(&server.url("postgres", "?sslmode=disable")).await;
    admin.batch_execute("CREATE DATABASE lc").await.expect("create db");

    let w = World::new().await;
    w.emit_burns(5, |_| 2).await;
    // The world's chain and contract, with the database at `url`.
    let on = |url: String| {
        TestConfig::new(&url, &w.anvil.url, &w.emitter)
            .database_toml("connect_retry_for = \"1s\"")
            .build()
    };

    let full = on(server.url(
        "lc",
        &format!("?sslmode=verify-full&sslrootcert={}", good_pem.display()),
    ));
    let app = build_with(&full, "tls", true).await.unwrap_or_else(|e| panic!("{e}"));
    app.tick_until_idle().await;
    let db = logcursor::store::pool::Database::new(&full.database.settings, "tls-check").expect("pool");
    let client = db.get().await.expect("connection");
    let encrypted: bool = client
        .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
        .await
        .expect("pg_stat_ssl")
        .get(0);
    assert!(encrypted, "the session is encrypted");
    let pg = connect(&server.url("lc", "?sslmode=disable")).await;
    assert_eq!(count_events(&pg).await, 10);

    let host = format!("127.0.0.1:{}", server.port);
    let msg = error_of(
        build_with(
            &on(server.url("lc", &format!("?sslmode=verify-full&sslrootcert={}", bad_pem.display()))),
            "r",
            true,
        )
        .await,
    );
    assert!(msg.contains(&host) && msg.contains("UnknownIssuer"), "wrong CA: {msg}");

    let misnamed = PgServer::start(Some(server_cert(&good, &["db.example.invalid"])));
    connect(&misnamed.url("postgres", "?sslmode=disable"))
        .await
        .batch_execute("CREATE DATABASE lc")
        .await
        .expect("db");
    let misnamed_with =
        |sslmode: &str| on(misnamed.url("lc", &format!("?sslmode={sslmode}&sslrootcert={}", good_pem.display())));
    let msg = error_of(build_with(&misnamed_with("verify-full"), "r", true).await);
    assert!(
        msg.contains(&format!("127.0.0.1:{}", misnamed.port)) && msg.contains("not valid for name"),
        "wrong host name: {msg}"
    );
    // verify-ca checks the chain only: the same server is accepted.
    build_with(&misnamed_with("verify-ca"), "r", true)
        .await
        .unwrap_or_else(|e| panic!("verify-ca: {e}"));

    let plain = &w.db; // the suite's cluster runs without TLS
    let required = on(format!("{}?sslmode=require", plain.url));
    let msg = error_of(build_with(&required, "r", true).await);
    assert!(
        msg.contains("127.0.0.1") && msg.contains("TLS"),
        "require without TLS: {msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn through_pgbouncer_in_transaction_mode_three_replicas_store_every_event_once() {
    let Ok(pgbouncer) = std::env::var("LOGCURSOR_TEST_PGBOUNCER") else {
        eprintln!("SKIPPED: pgbouncer is not installed (scripts/test installs the Debian package pgbouncer)");
        return;
    };
    let w = World::new().await;
    let target = url::Url::parse(&w.db.url).expect("url");
    let dir = owned_dir();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let ini = dir.path().join("pgbouncer.ini");
    write_owned(
        &ini,
        &format!(
            "[databases]\n* = host=127.0.0.1 port={} user=postgres\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
             unix_socket_dir =\nauth_type = any\npool_mode = transaction\nmax_client_conn = 200\ndefault_pool_size = 4\n\
             ignore_startup_parameters = extra_float_digits,options\nlogfile = {}\npidfile = {}\n",
            target.port().expect("port"),
            dir.path().join("pgbouncer.log").display(),
            dir.path().join("pgbouncer.pid").display(),
        ),
        0o644,
    );
    let out = run_as_owner(Path::new(&pgbouncer), &["-d", ini.to_str().expect("path")]);
    assert!(out.status.success(), "pgbouncer: {}", text(&out.stderr));
    struct Stop(PathBuf);
    impl Drop for Stop {
        fn drop(&mut self) {
            if let Ok(pid) = std::fs::read_to_string(&self.0) {
                let _ = StdCommand::new("kill").arg(pid.trim()).status();
            }
        }
    }
    let _stop = Stop(dir.path().join("pgbouncer.pid"));

    w.emit_burns(60, |i| i % 3 + 1).await;
    let head = w.chain.block_number().await;
    let bounced = format!("postgres://postgres@127.0.0.1:{port}{}", target.path());
    let cfg = w
        .config()
        .database_url(&bounced)
        .stream_toml("max_block_range = 4")
        .file();
    let replicas: Vec<tokio::process::Child> = ["b1", "b2", "b3"]
        .iter()
        .map(|r| spawn_replica(cfg.path(), r, &[]))
        .collect();
    let pg = w.pg().await;
    wait_for("the cursor at the head", Duration::from_secs(60), || async {
        (cursor_of(&pg, "burns").await == Some(head)).then_some(())
    })
    .await;
    for stderr in stop_all(replicas).await {
        for bad in ["42P05", "26000", "prepared statement"] {
            assert!(!stderr.contains(bad), "{bad} in the logs:\n{stderr}");
        }
    }
    w.assert_stored_up_to(&pg, head).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_role_without_ddl_ingests_and_a_missing_grant_is_named() {
    let w = World::new().await;
    let admin = w.pg().await;
    let roles = ExampleRoles::create(&w.db, "public").await;
    let (owner, app_role) = (roles.owner.clone(), roles.app.clone());
    let as_role = |role: &str| roles.url_as(role);

    let owner_client = connect(&as_role(&owner)).await;
    migrate_as(&as_role(&owner), "owner").await;
    owner_client.batch_execute(&roles.grants).await.expect("grants");

    w.emit_burns(10, |_| 2).await;
    let runtime = w.config().database_url(&as_role(&app_role)).build();
    let app = build_with(&runtime, "least-privilege", false)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    app.tick_until_idle().await;
    w.assert_stored_equals_chain(&admin).await;
    let app_client = connect(&as_role(&app_role)).await;
    let ddl = app_client
        .batch_execute("CREATE TABLE sneaky (i int)")
        .await
        .expect_err("no DDL");
    assert_eq!(ddl.code().map(|c| c.code()), Some("42501"));

    owner_client
        .batch_execute(&format!("REVOKE INSERT ON events FROM {app_role}"))
        .await
        .expect("revoke");
    let err = build_with(&runtime, "least-privilege", false)
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(&err, AppError::Store(StoreError::Privileges { missing, .. }) if missing == &["INSERT on events".to_string()]),
        "{err}"
    );
    assert!(err.to_string().contains("INSERT on events"), "{err}");

    let empty = TestDb::new().await;
    let unmigrated = w.config().database_url(&empty.url).build();
    let msg = error_of(build_with(&unmigrated, "r", false).await);
    assert!(msg.contains("logcursor migrate"), "{msg}");
}

/// `cfg`'s text without `[database] url` (a config that names the URL
/// only by `url_file`).
fn without_database_url(cfg: TestConfig) -> String {
    cfg.database_unset(&["url"]).toml()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_read_from_files_work_and_never_reach_a_log_line() {
    let w = World::new().await;
    w.emit_burns(8, |_| 2).await;
    let head = w.chain.block_number().await;
    let secrets = tempfile::tempdir().expect("dir");
    let (url_file, password_file, rpc_file) = (
        secrets.path().join("db-url"),
        secrets.path().join("db-password"),
        secrets.path().join("rpc-url"),
    );
    std::fs::write(
        &url_file,
        format!("  {}\n", w.db.url.replacen("postgres@", "postgres:urlsecret@", 1)),
    )
    .expect("write");
    std::fs::write(&password_file, "filesecret\n").expect("write");
    std::fs::write(&rpc_file, format!("{}/?apikey=RPCSECRET\n", w.anvil.url)).expect("write");
    let toml = without_database_url(
        w.config()
            .database_toml(&format!(
                "url_file = \"{}\"\npassword_file = \"{}\"",
                url_file.display(),
                password_file.display()
            ))
            .stream_toml(&format!("rpc_urls = [{{ url_file = \"{}\" }}]", rpc_file.display())),
    );
    assert!(toml.contains("url_file") && !toml.contains(&w.db.url), "{toml}");
    let cfg = write_config(&toml);
    let child = spawn_replica(cfg.path(), "secretive", &[("RUST_LOG", "debug".to_string())]);
    let pg = w.pg().await;
    wait_for("the cursor at the head", Duration::from_secs(60), || async {
        (cursor_of(&pg, "burns").await == Some(head)).then_some(())
    })
    .await;
    signal(&child, "TERM");
    let out = finish(child, Duration::from_secs(30)).await;
    let logs = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{logs}");
    w.assert_stored_up_to(&pg, head).await;
    for secret in ["urlsecret", "filesecret", "RPCSECRET"] {
        assert!(!logs.contains(secret), "{secret} leaked into the logs");
    }
    assert!(logs.lines().count() > 5, "debug logs were written: {logs}");

    // A file that cannot be read is a config error naming the key and the path.
    let missing = toml.replace(&password_file.display().to_string(), "/nonexistent/secret");
    let e = logcursor::config::Config::parse(&missing, "t", &Default::default()).expect_err("invalid");
    let shown = e.to_string();
    assert!(
        shown.contains("database.password_file") && shown.contains("/nonexistent/secret"),
        "{shown}"
    );
}
