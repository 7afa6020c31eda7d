//! What zapflow's tests stand on: real services, each test with its own data.
//!
//! - PostgreSQL: a fresh database per test (`ZAPFLOW_TEST_DATABASE_URL`,
//!   default `postgres://postgres@127.0.0.1:5432`).
//! - A Kafka-protocol broker: fresh topic and group names per test
//!   (`ZAPFLOW_TEST_KAFKA_BROKERS`, default `127.0.0.1:19092`).
//! - SMTP: [`SmtpSink`], a real SMTP server on a loopback port.
//!
//! A service that cannot be reached fails the test with how to start it.

mod broker;
mod smtp;
mod stack;

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use sqlx::Connection;
use zapflow_bus::BusSettings;
use zapflow_store::Store;

pub use broker::PrivateBroker;
pub use smtp::{Mail, SmtpSink};
pub use stack::{Stack, StackOptions, with_key};

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// A loopback address nothing listens on right now, for a process started
/// next to bind. Its port lies below the range the kernel gives outgoing
/// connections (`ip_local_port_range`): a port from that range, let go until
/// the process binds it, may meanwhile become the local end of a connection
/// to PostgreSQL or the broker. Another program could still take it; the
/// process would then fail to start, loudly.
pub fn free_address() -> SocketAddr {
    const FIRST: u32 = 10_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let span = ephemeral.saturating_sub(FIRST);
    // Where this process starts looking, so that processes running at once
    // look in different places; then one port after the other.
    let seed = std::process::id().wrapping_mul(7_919);
    for _ in 0..span {
        let port = FIRST + seed.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let Ok(port) = u16::try_from(port) else { break };
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)) {
            return listener.local_addr().expect("a bound listener's address");
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("finding a free loopback port")
}

/// A short random suffix for names that must not collide across tests.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// A migrated, empty database of this test's own.
pub async fn test_store() -> Store {
    let url = test_database_url().await;
    let store = Store::open(&url, 20).await.expect("database URL");
    store.migrate().await.expect("migrating the test database");
    store
}

/// The URL of a new, empty PostgreSQL database of this test's own (not
/// migrated: for tests that run `zapflow migrate` as users do).
pub async fn test_database_url() -> String {
    let server = env_or(
        "ZAPFLOW_TEST_DATABASE_URL",
        "postgres://postgres@127.0.0.1:5432",
    );
    let name = unique("zapflow_test").replace('-', "_");
    let mut admin = sqlx::PgConnection::connect(&format!("{server}/postgres"))
        .await
        .unwrap_or_else(|error| {
            panic!(
                "cannot reach PostgreSQL at {server} ({error}). Start it with \
                 `pg_ctlcluster --skip-systemctl-redirect 15 main start` or point \
                 ZAPFLOW_TEST_DATABASE_URL at a server (user with CREATEDB)."
            )
        });
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .expect("creating the test database");
    format!("{server}/{name}")
}

/// A SQLite database of a test's own.
pub struct SqliteTestStore {
    pub store: Store,
    /// Its file, for tests that open it again or beside the store.
    pub path: PathBuf,
}

/// A migrated, empty SQLite database in a file of this test's own (kept
/// under the system's temporary directory).
pub async fn test_sqlite_store() -> SqliteTestStore {
    let path = std::env::temp_dir().join(format!("{}.db", unique("zapflow-test")));
    let store = Store::open_file(&path)
        .await
        .expect("creating the SQLite database");
    store
        .migrate()
        .await
        .expect("migrating the SQLite database");
    SqliteTestStore { store, path }
}

/// Topic and group names of this test's own on the test broker, with the
/// topics created.
pub async fn test_bus(partitions: i32) -> BusSettings {
    let brokers = env_or("ZAPFLOW_TEST_KAFKA_BROKERS", "127.0.0.1:19092");
    let bus = BusSettings {
        brokers: brokers.clone(),
        events_topic: unique("zap-events"),
        dead_letter_topic: unique("zap-events-dlq"),
        partitions,
    };
    let reachable = tokio::time::timeout(Duration::from_secs(10), bus.ping()).await;
    if !matches!(reachable, Ok(Ok(()))) {
        panic!(
            "cannot reach a Kafka-protocol broker at {brokers}. Start one with \
             `bash scripts/start-broker.sh` (tansu on 127.0.0.1:19092) or point \
             ZAPFLOW_TEST_KAFKA_BROKERS at one."
        );
    }
    bus.ensure_topics().await.expect("creating test topics");
    bus
}

/// Polls `check` until it returns `Some`, or panics after `timeout` with
/// `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_addresses_differ_and_lie_below_the_range_of_outgoing_connections() {
        let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
        let ephemeral: u16 = range.split_whitespace().next().unwrap().parse().unwrap();
        let ports: Vec<u16> = (0..3).map(|_| free_address().port()).collect();
        assert!(ports.iter().all(|&port| port < ephemeral), "{ports:?}");
        assert!(ports[0] != ports[1] && ports[1] != ports[2], "{ports:?}");
        for port in ports {
            TcpListener::bind(("127.0.0.1", port)).expect("still free");
        }
    }
}
