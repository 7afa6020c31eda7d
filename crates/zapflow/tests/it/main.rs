//! Integration tests against real PostgreSQL, a Kafka-protocol broker and
//! an SMTP server on loopback. See crates/testkit for how to reach them.

/// Each scenario (an async fn taking a `Deployment`) as two tests: on the
/// embedded SQLite file and on PostgreSQL alone, the deployments whose
/// workers take work from the outbox. Both must behave alike.
macro_rules! on_outbox_deployments {
    ($($scenario:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $scenario() {
                    super::$scenario(crate::support::Deployment::Embedded).await;
                }
            )*
        }
        mod postgres_only {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $scenario() {
                    super::$scenario(crate::support::Deployment::PostgresOnly).await;
                }
            )*
        }
    };
}

mod api;
mod cli;
mod crash;
mod crash_points;
mod dead_letters;
mod end_to_end;
mod flow;
mod gateway;
mod isolation;
mod limits;
mod membership;
mod names;
mod observability;
mod processor;
mod recording;
mod replay;
mod restart;
mod retries;
mod schedules;
mod store;
mod support;
mod tail;
mod tenancy;
mod wakeups;
mod worker;
mod zap_cache;
