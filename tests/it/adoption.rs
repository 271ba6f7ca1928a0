//! Fitting into an application's own database: a schema of its own, typed
//! views per event, block time on every row.

use sha3::Digest as _;

use crate::abi::{address, boolean, int, uint, Arg};
use crate::support::*;

const RICH: &str = "event Rich(address indexed to, int256 indexed delta, uint256 id, int64 small, bytes32 tag, bool flag, string note, bytes blob, uint256[] list, (uint256,address) pair)";
const LABELED: &str = "event Labeled(string indexed label, bytes indexed blob, string text, uint8 small, int256 delta)";
const RICH_FN: &str = "rich(address,int256,uint256,int64,bytes32,bool,string,bytes,uint256[],(uint256,address))";
const LABEL_FN: &str = "label(string,bytes,string,uint8,int256)";

fn keccak(bytes: &[u8]) -> Vec<u8> {
    sha3::Keccak256::digest(bytes).to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_views_read_every_abi_type_the_contract_emits_as_the_json_does_with_block_times() {
    let w = World::new().await;
    let (chain, emitter) = (&w.chain, &w.emitter);
    let to = format!("0x{}", "ab".repeat(20));
    let pair_b = format!("0x{}", "cd".repeat(20));
    chain
        .call(
            emitter,
            RICH_FN,
            &[
                address(&to),
                int(-5),
                uint(42),
                int(-7),
                Arg::Word([0x11; 32]),
                boolean(true),
                Arg::Bytes("héllo".as_bytes().to_vec()),
                Arg::Bytes(vec![0xde, 0xad]),
                Arg::Words(vec![crate::abi::word_u(1), crate::abi::word_u(2)]),
                uint(3),
                address(&pair_b),
            ],
        )
        .await;
    chain
        .call(
            emitter,
            LABEL_FN,
            &[
                Arg::Bytes(b"tag-1".to_vec()),
                Arg::Bytes(vec![1, 2, 3]),
                Arg::Bytes("ok ✓".as_bytes().to_vec()),
                uint(7),
                int(-12_345_678_901_234_567_890),
            ],
        )
        .await;
    let events = format!("events = [\"{RICH}\", \"{LABELED}\"]");
    let app = w.config().stream_toml(&events).replica("r").await;
    app.tick_until_idle().await;
    let pg = w.pg().await;

    let r = pg
        .query_one(
            "SELECT \"to\", delta::text, id::text, small::text, tag, flag, note, blob, list, pair,
                    address, block_number, extract(epoch FROM block_timestamp)::int8, event_id
               FROM burns_rich",
            &[],
        )
        .await
        .expect("burns_rich");
    assert_eq!(r.get::<_, String>(0), to);
    assert_eq!(r.get::<_, String>(1), "-5", "int256, a negative one");
    assert_eq!(r.get::<_, String>(2), "42");
    assert_eq!(r.get::<_, String>(3), "-7");
    assert_eq!(r.get::<_, Vec<u8>>(4), vec![0x11; 32], "bytes32 as bytea");
    assert!(r.get::<_, bool>(5));
    assert_eq!(r.get::<_, String>(6), "héllo", "string exactly as emitted");
    assert_eq!(r.get::<_, Vec<u8>>(7), vec![0xde, 0xad]);
    assert_eq!(r.get::<_, serde_json::Value>(8), serde_json::json!(["1", "2"]));
    assert_eq!(r.get::<_, serde_json::Value>(9), serde_json::json!(["3", pair_b]));
    assert_eq!(r.get::<_, String>(10), emitter.to_lowercase(), "the emitting contract");
    let block: i64 = r.get(11);
    assert_eq!(
        r.get::<_, i64>(12),
        chain.block_time(block).await,
        "block time from the chain"
    );

    let l = pg
        .query_one(
            "SELECT label, blob, text, small::text, delta::text, extract(epoch FROM block_timestamp)::int8, block_number
               FROM burns_labeled",
            &[],
        )
        .await
        .expect("burns_labeled");
    assert_eq!(
        l.get::<_, Vec<u8>>(0),
        keccak(b"tag-1"),
        "an indexed string is its topic"
    );
    assert_eq!(
        l.get::<_, Vec<u8>>(1),
        keccak(&[1, 2, 3]),
        "an indexed bytes is its topic"
    );
    assert_eq!(l.get::<_, String>(2), "ok ✓");
    assert_eq!(l.get::<_, String>(3), "7");
    assert_eq!(l.get::<_, String>(4), "-12345678901234567890");
    assert_eq!(l.get::<_, i64>(5), chain.block_time(l.get(6)).await);

    // The views read what the JSON holds, for every column.
    let same: bool = pg
        .query_one(
            "SELECT bool_and(v.delta = (e.params->>'delta')::numeric AND v.note = e.params->>'note'
                             AND v.list = e.params->'list' AND v.flag = (e.params->'flag')::boolean)
               FROM burns_rich v JOIN events e ON e.id = v.event_id",
            &[],
        )
        .await
        .expect("compare")
        .get(0);
    assert!(same);

    // Changing the stream's events replaces its views; events stay as they are.
    let before: i64 = pg
        .query_one("SELECT count(*) FROM events", &[])
        .await
        .expect("n")
        .get(0);
    let only_rich = format!("events = [\"{RICH}\"]");
    w.config().stream_toml(&only_rich).replica("r2").await;
    let views: Vec<String> = pg
        .query(
            "SELECT table_name::text FROM information_schema.views WHERE table_schema = 'public' ORDER BY 1",
            &[],
        )
        .await
        .expect("views")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(views, vec!["burns_rich".to_string()]);
    let after: i64 = pg
        .query_one("SELECT count(*) FROM events", &[])
        .await
        .expect("n")
        .get(0);
    assert_eq!(before, after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_deployments_in_two_schemas_share_a_database_each_exactly_once_without_seeing_each_other() {
    let w = World::new().await;
    w.emit_burns(10, |i| i % 3 + 1).await;
    for schema in ["app_a", "app_b"] {
        let app = w
            .config()
            .database_toml(&format!("schema = \"{schema}\""))
            .replica(schema)
            .await;
        app.tick_until_idle().await;
        app.tick_until_idle().await;
    }
    let pg = w.pg().await;
    let head = w.chain.block_number().await;
    let on_chain: Vec<LogKey> = w.chain.burned_logs(&w.emitter, head).await.into_iter().collect();
    for schema in ["app_a", "app_b"] {
        pg.batch_execute(&format!("SET search_path TO {schema}"))
            .await
            .expect("path");
        let mut stored = stored_logs(&pg).await;
        stored.sort();
        assert_eq!(stored, on_chain, "{schema}: every event exactly once");
        assert_eq!(cursor_of(&pg, "burns").await, Some(head));
    }
    let in_public: bool = pg
        .query_one(
            "SELECT to_regclass('public.events') IS NULL AND to_regclass('public.block_cursors') IS NULL",
            &[],
        )
        .await
        .expect("q")
        .get(0);
    assert!(in_public, "nothing was created in public");
    let objects: Vec<(String, i64)> = pg
        .query(
            "SELECT n.nspname::text, count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname IN ('app_a', 'app_b') GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await
        .expect("q")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(objects.len(), 2);
    assert_eq!(
        objects[0].1, objects[1].1,
        "each schema holds the same set of objects: {objects:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runtime_role_of_the_roles_example_works_in_a_schema_of_its_own() {
    let db = TestDb::new().await;
    let admin = db.client().await;
    let roles = ExampleRoles::create(&db, "ledger").await;
    migrate_in(&roles.url_as(&roles.owner), "ledger", "owner").await;
    connect(&roles.url_as(&roles.owner))
        .await
        .batch_execute(&roles.grants)
        .await
        .expect("grants");

    let anvil = Anvil::start().await;
    let chain = Chain::new(&anvil.url).await;
    let emitter = chain.deploy_emitter().await;
    chain.emit_burns(&emitter, 6, |_| 2).await;
    let runtime = TestConfig::new(&roles.url_as(&roles.app), &anvil.url, &emitter)
        .database_toml("schema = \"ledger\"")
        .build();
    let app = logcursor::app::App::build(
        &runtime,
        "least-privilege",
        logcursor::app::BuildOptions { migrate: false },
        &tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    app.tick_until_idle().await;
    admin.batch_execute("SET search_path TO ledger").await.expect("path");
    assert_stored_equals_chain(&admin, &chain, &emitter).await;
}
