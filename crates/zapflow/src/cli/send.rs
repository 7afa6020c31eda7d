//! `zapflow send`: a webhook delivery, as any sender would make it, signed
//! when given the zap's secret.

use anyhow::{Context, bail};
use clap::Args;
use zapflow_core::webhook_signature::{self, Secret};

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  zapflow send http://127.0.0.1:8080/hooks/catch/0190.../abc... --data '{\"n\": 1}'
  zapflow send \"$URL\" --data @payload.json --secret whsec_...
  zapflow send \"$URL\" --data @payload.json --header 'Idempotency-Key: order-42'")]
pub struct Send {
    /// The zap's webhook URL.
    url: String,
    /// The JSON body: inline, `@FILE`, or `@-` for standard input.
    #[arg(short, long)]
    data: String,
    /// The zap's signing secret (whsec_...): adds Standard Webhooks headers.
    #[arg(long, env = "ZAPFLOW_WEBHOOK_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// An extra header, `Name: value`; repeatable.
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
}

/// A `--data` argument's text: inline, `@FILE`, or `@-` for standard input.
pub fn read_body(data: &str) -> anyhow::Result<String> {
    Ok(match data.strip_prefix('@') {
        Some("-") => std::io::read_to_string(std::io::stdin()).context("reading standard input")?,
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?,
        None => data.to_owned(),
    })
}

impl Send {
    pub async fn run(&self) -> anyhow::Result<()> {
        let body = read_body(&self.data)?;
        serde_json::from_str::<serde_json::Value>(&body)
            .context("the body is not JSON (zapflow webhooks take JSON)")?;
        let mut request = reqwest::Client::new()
            .post(&self.url)
            .header("content-type", "application/json");
        for header in &self.headers {
            let Some((name, value)) = header.split_once(':') else {
                bail!("{header:?} is not a header; write `Name: value`");
            };
            request = request.header(name.trim(), value.trim());
        }
        if let Some(secret) = &self.secret {
            let secret = Secret::parse(secret.trim())
                .map_err(|error| anyhow::anyhow!("--secret: {error}"))?;
            let id = format!("msg_{}", uuid::Uuid::new_v4().simple());
            let timestamp = chrono::Utc::now().timestamp();
            let signature = webhook_signature::sign(&secret, &id, timestamp, body.as_bytes());
            request = request
                .header("webhook-id", id)
                .header("webhook-timestamp", timestamp.to_string())
                .header("webhook-signature", signature);
        }
        let response = request
            .body(body)
            .send()
            .await
            .with_context(|| format!("posting to {}", self.url))?;
        let status = response.status();
        let answer = response.text().await.unwrap_or_default();
        println!("{answer}");
        if !status.is_success() {
            bail!("the webhook answered {status}");
        }
        Ok(())
    }
}
