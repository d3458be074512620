//! One throwaway cluster per test process, a fresh database per test cloned from a template that
//! holds the CarBot legacy schema and data.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use bluegreen::pg::cluster::Cluster;
use sqlx::{Connection, PgConnection};
use tokio::sync::OnceCell;

static CLUSTER: OnceLock<Cluster> = OnceLock::new();
static CARBOT_TEMPLATE: OnceCell<()> = OnceCell::const_new();

pub const CARBOT_LEADS: u32 = 2000;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(|| Cluster::start().expect("starting a throwaway PostgreSQL"))
}

pub async fn connect(url: &str) -> PgConnection {
    PgConnection::connect(url).await.expect("connect")
}

/// Run a multi-statement SQL text.
pub async fn exec(conn: &mut PgConnection, sql: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(conn)
        .await
        .unwrap_or_else(|e| panic!("{e}\nin:\n{}", &sql[..sql.len().min(400)]));
}

/// Load the CarBot legacy schema and `leads` generated rows into the database at `url`.
pub async fn load_carbot(url: &str, leads: u32) {
    let mut c = connect(url).await;
    let dir = root().join("examples/carbot");
    exec(
        &mut c,
        &std::fs::read_to_string(dir.join("legacy.sql")).unwrap(),
    )
    .await;
    let gen_sql = format!(
        "SET carbot.leads = '{leads}';\n{}",
        std::fs::read_to_string(dir.join("generate.sql")).unwrap()
    );
    exec(&mut c, &gen_sql).await;
}

/// A new empty database.
pub async fn empty_db(name: &str) -> String {
    let cl = cluster();
    let mut admin = connect(&cl.url("postgres")).await;
    exec(&mut admin, &format!("DROP DATABASE IF EXISTS \"{name}\"")).await;
    exec(&mut admin, &format!("CREATE DATABASE \"{name}\"")).await;
    cl.url(name)
}

/// A new database holding the CarBot legacy data (cloned from a template built once).
pub async fn carbot_db(name: &str) -> String {
    let cl = cluster();
    CARBOT_TEMPLATE
        .get_or_init(|| async {
            let url = empty_db("carbot_template").await;
            load_carbot(&url, CARBOT_LEADS).await;
        })
        .await;
    let mut admin = connect(&cl.url("postgres")).await;
    exec(&mut admin, &format!("DROP DATABASE IF EXISTS \"{name}\"")).await;
    exec(
        &mut admin,
        &format!("CREATE DATABASE \"{name}\" TEMPLATE carbot_template"),
    )
    .await;
    cl.url(name)
}

/// The bluegreen binary, with the database URL set.
pub fn bluegreen(url: &str) -> assert_cmd::Command {
    let mut cmd = assert_cmd::Command::cargo_bin("bluegreen").unwrap();
    cmd.current_dir(root())
        .env("DATABASE_URL", url)
        .env_remove("RUST_LOG");
    cmd
}

/// Everything a command could leave behind: schemas, relations, functions, triggers, sequence
/// positions. Two equal snapshots mean nothing was written.
pub async fn fingerprint(url: &str) -> Vec<String> {
    let mut c = connect(url).await;
    sqlx::query_scalar::<_, String>(
        "SELECT 'schema ' || nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%'
         UNION ALL SELECT 'rel ' || c.oid::regclass::text || ' ' || c.relkind::text FROM pg_class c
           JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
         UNION ALL SELECT 'trigger ' || tgname FROM pg_trigger WHERE NOT tgisinternal
         UNION ALL SELECT 'function ' || p.oid::regprocedure::text FROM pg_proc p
           JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
         UNION ALL SELECT 'seq ' || schemaname || '.' || sequencename || ' ' || coalesce(last_value, 0) FROM pg_sequences
         UNION ALL SELECT 'setting ' || array_to_string(setconfig, ',') FROM pg_db_role_setting
         ORDER BY 1",
    )
    .fetch_all(&mut c)
    .await
    .unwrap()
}

pub fn rel(p: &Path) -> String {
    p.strip_prefix(root()).unwrap_or(p).display().to_string()
}
