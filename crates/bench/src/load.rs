//! The load: JSON webhooks POSTed by a fixed number of concurrent senders,
//! each on its own keep-alive connection.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use reqwest::StatusCode;
use reqwest::header::CONTENT_TYPE;

/// One step of the load: `requests` webhooks from `concurrency` senders.
#[derive(Debug, Clone, Copy)]
pub struct Phase {
    pub concurrency: usize,
    pub requests: u64,
}

impl Phase {
    /// One webhook.
    pub fn single() -> Self {
        Self {
            concurrency: 1,
            requests: 1,
        }
    }
}

impl FromStr for Phase {
    type Err = String;

    /// `concurrency:requests`, e.g. `16:3000`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (concurrency, requests) = text
            .split_once(':')
            .ok_or_else(|| format!("expected concurrency:requests, got {text:?}"))?;
        let phase = Self {
            concurrency: concurrency
                .trim()
                .parse()
                .map_err(|e| format!("concurrency {concurrency:?}: {e}"))?,
            requests: requests
                .trim()
                .parse()
                .map_err(|e| format!("requests {requests:?}: {e}"))?,
        };
        if phase.concurrency == 0 || phase.requests == 0 {
            return Err(format!(
                "concurrency and requests must be positive, got {text:?}"
            ));
        }
        Ok(phase)
    }
}

/// One webhook as sent.
#[derive(Debug, Clone)]
pub struct Sample {
    /// The number carried in the payload and, by the zap, in the subject.
    pub sequence: u64,
    pub sent_at: Instant,
    pub latency: Duration,
    /// The answer was 202 Accepted.
    pub accepted: bool,
}

/// What one phase of sending produced.
#[derive(Debug, Default)]
pub struct Sent {
    pub samples: Vec<Sample>,
    /// From the first request sent to the last answer received.
    pub elapsed: Duration,
    /// The first answer that was not a 202, or the first transport error.
    pub first_error: Option<String>,
}

/// A client whose pool keeps one connection per sender; never goes
/// through a proxy.
pub fn client(max_concurrency: usize) -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(max_concurrency)
        .timeout(Duration::from_secs(30))
        .build()
        .context("building the HTTP client")
}

/// Sends the phase's webhooks, numbered from `first_sequence`. Senders stop
/// taking new requests after `time_limit`.
pub async fn send(
    client: &reqwest::Client,
    url: &str,
    phase: Phase,
    first_sequence: u64,
    time_limit: Duration,
) -> Sent {
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut senders = tokio::task::JoinSet::new();
    for _ in 0..phase.concurrency {
        let (client, url, next) = (client.clone(), url.to_owned(), next.clone());
        senders.spawn(async move {
            let mut samples = Vec::new();
            let mut first_error = None;
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= phase.requests || started.elapsed() > time_limit {
                    break;
                }
                let sequence = first_sequence + index;
                let (sample, error) = post(&client, &url, sequence).await;
                samples.push(sample);
                first_error = first_error.or(error);
            }
            (samples, first_error)
        });
    }
    let mut sent = Sent::default();
    while let Some(done) = senders.join_next().await {
        let (samples, first_error) = done.expect("a sender panicked");
        sent.samples.extend(samples);
        sent.first_error = sent.first_error.take().or(first_error);
    }
    sent.elapsed = started.elapsed();
    sent.samples.sort_by_key(|sample| sample.sequence);
    sent
}

async fn post(client: &reqwest::Client, url: &str, sequence: u64) -> (Sample, Option<String>) {
    let body = format!(r#"{{"email":"bench@example.com","n":{sequence}}}"#);
    let sent_at = Instant::now();
    let answer = client
        .post(url)
        .header(CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await;
    // The body is read so the connection goes back to the pool.
    let error = match answer {
        Ok(response) => {
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            (status != StatusCode::ACCEPTED).then(|| format!("{status}: {text}"))
        }
        Err(error) => Some(error.to_string()),
    };
    let sample = Sample {
        sequence,
        sent_at,
        latency: sent_at.elapsed(),
        accepted: error.is_none(),
    };
    (sample, error)
}
