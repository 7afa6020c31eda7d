//! The zap under test, created over gRPC like any user would.

use anyhow::{Context, Result};
use serde_json::json;
use tonic::Request;
use zapflow_proto::json::json_to_struct;
use zapflow_proto::v1::zap_service_client::ZapServiceClient;
use zapflow_proto::v1::{Action, CreateZapRequest};

/// The prefix of every subject; the rest is the webhook's sequence number.
pub const SUBJECT_PREFIX: &str = "bench ";

/// Creates a zap with one email action whose subject carries the webhook's
/// `n`, and returns its webhook URL.
pub async fn create(grpc_url: &str, api_key: &str) -> Result<String> {
    let mut client = ZapServiceClient::connect(grpc_url.to_owned())
        .await
        .with_context(|| format!("connecting to the API at {grpc_url}"))?;
    let config = json!({
        "to": "{{ trigger.email }}",
        "subject": format!("{SUBJECT_PREFIX}{{{{ trigger.n }}}}"),
        "body": "hello",
    });
    let mut request = Request::new(CreateZapRequest {
        name: "bench".into(),
        actions: vec![Action {
            r#type: "email".into(),
            config: config.as_object().map(json_to_struct),
            ..Action::default()
        }],
        ..CreateZapRequest::default()
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {api_key}").parse()?);
    let reply = client
        .create_zap(request)
        .await
        .context("CreateZap")?
        .into_inner();
    Ok(reply.webhook_url)
}

/// The webhook's sequence number in a subject written by [`create`]'s zap.
pub fn sequence_in_subject(subject: &str) -> Option<u64> {
    subject.strip_prefix(SUBJECT_PREFIX)?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_sequence_number_back_from_a_subject() {
        assert_eq!(sequence_in_subject("bench 42"), Some(42));
        assert_eq!(sequence_in_subject("other 42"), None);
        assert_eq!(sequence_in_subject("bench x"), None);
    }
}
