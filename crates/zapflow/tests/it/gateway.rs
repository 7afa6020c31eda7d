//! What webhook senders see: status codes, and one run per delivery.

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zapflow_proto::v1 as pb;
use zapflow_testkit::{Stack, StackOptions, test_store, with_key};

use crate::support::{count_runs, new_user, post_json, simple_zap};

async fn stack(body_limit: usize) -> Stack {
    let options = StackOptions {
        body_limit,
        ..StackOptions::default()
    };
    Stack::start(test_store().await, None, options).await
}

async fn post(
    url: &str,
    content_type: &str,
    body: impl Into<reqwest::Body>,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .post(url)
        .header("content-type", content_type)
        .body(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_wrong_url_is_the_same_404_and_creates_no_run() {
    let stack = stack(1024 * 1024).await;
    let key = new_user(&stack, "alice").await;
    let (zap, url) = simple_zap(&stack, &key).await;
    let (paused, paused_url) = simple_zap(&stack, &key).await;
    let (deleted, deleted_url) = simple_zap(&stack, &key).await;
    let mut client = stack.zap_client().await;
    client
        .pause_zap(with_key(&key, pb::PauseZapRequest { id: paused.id }))
        .await
        .unwrap();
    client
        .delete_zap(with_key(&key, pb::DeleteZapRequest { id: deleted.id }))
        .await
        .unwrap();
    let base = stack.http_url();
    let token = url.rsplit('/').next().unwrap();

    let wrong_urls = [
        format!("{base}/hooks/catch/{}/{token}", uuid::Uuid::new_v4()),
        format!("{base}/hooks/catch/{}/{token}x", zap.id),
        format!("{base}/hooks/catch/{}/short", zap.id),
        format!("{base}/hooks/catch/not-a-uuid/{token}"),
        paused_url,
        deleted_url,
    ];
    for wrong in &wrong_urls {
        let (status, body) = post_json(wrong, &json!({"n": 1})).await;
        assert_eq!(
            (status, body),
            (404, json!({"error": "not found"})),
            "{wrong}"
        );
    }
    assert_eq!(count_runs(&stack).await, 0);

    // Rotation: the old URL joins the 404s, the new one works.
    let rotated = client
        .rotate_webhook_token(with_key(
            &key,
            pb::RotateWebhookTokenRequest { id: zap.id.clone() },
        ))
        .await
        .unwrap()
        .into_inner()
        .webhook_url;
    assert_eq!(post_json(&url, &json!({})).await.0, 404);
    assert_eq!(post_json(&rotated, &json!({})).await.0, 202);
    assert_eq!(count_runs(&stack).await, 1);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_bodies_get_clear_errors_and_no_run() {
    let stack = stack(1024).await;
    let key = new_user(&stack, "alice").await;
    let (_, url) = simple_zap(&stack, &key).await;

    let (status, body) = post(&url, "application/json", "{\"n\": ", &[]).await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap().contains("not valid JSON"),
        "{body}"
    );

    let (status, body) = post(&url, "text/plain", "{}", &[]).await;
    assert_eq!(status, 415);
    assert!(
        body["error"].as_str().unwrap().contains("application/json"),
        "{body}"
    );

    let big = format!("{{\"pad\": \"{}\"}}", "x".repeat(2000));
    let (status, _) = post(&url, "application/json", big.clone(), &[]).await;
    assert_eq!(status, 413, "with Content-Length");

    // Chunked, without Content-Length: refused once the limit is crossed.
    let status = post_chunked(&stack, &url, big.as_bytes()).await;
    assert_eq!(status, 413, "chunked");

    let (status, _) = post(
        &url,
        "application/cloudevents+json; charset=utf-8",
        "{\"ok\": true}",
        &[],
    )
    .await;
    assert_eq!(status, 202, "+json content types are JSON");
    assert_eq!(count_runs(&stack).await, 1);
    stack.stop().await;
}

/// Sends `body` with `Transfer-Encoding: chunked` over a raw socket and
/// returns the status code.
async fn post_chunked(stack: &Stack, url: &str, body: &[u8]) -> u16 {
    let path = url.strip_prefix(&stack.http_url()).unwrap();
    let mut socket = tokio::net::TcpStream::connect(stack.http_address)
        .await
        .unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        stack.http_address
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    for chunk in body.chunks(256) {
        let framed = [format!("{:x}\r\n", chunk.len()).as_bytes(), chunk, b"\r\n"].concat();
        if socket.write_all(&framed).await.is_err() {
            break; // The server may answer and close before the end.
        }
    }
    let _ = socket.write_all(b"0\r\n\r\n").await;
    let mut answer = Vec::new();
    let _ = socket.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer);
    answer.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn repeated_idempotency_keys_make_one_run_also_concurrently() {
    let stack = stack(1024 * 1024).await;
    let key = new_user(&stack, "alice").await;
    let (_, url) = simple_zap(&stack, &key).await;

    let (first_status, first) = post(
        &url,
        "application/json",
        "{}",
        &[("idempotency-key", "order-1")],
    )
    .await;
    let (second_status, second) = post(
        &url,
        "application/json",
        "{}",
        &[("idempotency-key", "order-1")],
    )
    .await;
    assert_eq!((first_status, second_status), (202, 202));
    assert_eq!(first["run_id"], second["run_id"]);
    assert_eq!(
        (first["duplicate"].clone(), second["duplicate"].clone()),
        (json!(false), json!(true))
    );

    let concurrent = futures::future::join_all((0..20).map(|_| {
        let url = url.clone();
        async move { post(&url, "application/json", "{}", &[("webhook-id", "msg_2")]).await }
    }))
    .await;
    let run_ids: std::collections::HashSet<String> = concurrent
        .iter()
        .map(|(status, body)| {
            assert_eq!(*status, 202, "{body}");
            body["run_id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(run_ids.len(), 1, "one run for twenty concurrent deliveries");
    assert_eq!(
        concurrent
            .iter()
            .filter(|(_, body)| body["duplicate"] == json!(false))
            .count(),
        1
    );

    // Without a key, every delivery is a run of its own.
    post_json(&url, &json!({})).await;
    post_json(&url, &json!({})).await;
    assert_eq!(count_runs(&stack).await, 4);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn headers_and_query_are_kept_with_the_payload() {
    let stack = stack(1024 * 1024).await;
    let key = new_user(&stack, "alice").await;
    let (_, url) = simple_zap(&stack, &key).await;
    let (status, answer) = post(
        &format!("{url}?source=crm&id=7"),
        "application/json",
        "{\"n\": 1}",
        &[
            ("x-github-event", "push"),
            ("authorization", "Bearer secret"),
        ],
    )
    .await;
    assert_eq!(status, 202);
    let run_id: uuid::Uuid = answer["run_id"].as_str().unwrap().parse().unwrap();
    let run = stack.store.run(run_id).await.unwrap().unwrap();
    assert_eq!(run.trigger, json!({"n": 1}));
    assert_eq!(run.query, json!({"source": "crm", "id": "7"}));
    assert_eq!(run.headers["x-github-event"], "push");
    assert!(
        run.headers.get("authorization").is_none(),
        "credentials are not stored"
    );
    stack.stop().await;
}

mod signatures {
    use zapflow_core::webhook_signature::{Secret, sign};

    use super::*;

    /// Standard Webhooks headers for `body`, signed with `secret` at `at`.
    fn signed(secret: &str, id: &str, at: i64, body: &str) -> Vec<(String, String)> {
        let secret: Secret = secret.parse().unwrap();
        vec![
            ("webhook-id".into(), id.into()),
            ("webhook-timestamp".into(), at.to_string()),
            (
                "webhook-signature".into(),
                sign(&secret, id, at, body.as_bytes()),
            ),
        ]
    }

    async fn create_signed_zap(
        client: &mut zapflow_proto::v1::zap_service_client::ZapServiceClient<
            tonic::transport::Channel,
        >,
        key: &str,
    ) -> pb::CreateZapResponse {
        client
            .create_zap(with_key(
                key,
                pb::CreateZapRequest {
                    name: "signed".into(),
                    actions: vec![crate::support::email_action("a@example.com", "s", "b")],
                    require_signature: true,
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner()
    }

    async fn post_signed(url: &str, body: &str, headers: &[(String, String)]) -> (u16, Value) {
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        post(url, "application/json", body.to_owned(), &headers).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_zap_that_requires_signatures_accepts_only_valid_ones() {
        let stack = stack(1024 * 1024).await;
        let key = new_user(&stack, "alice").await;
        let mut client = stack.zap_client().await;
        let created = create_signed_zap(&mut client, &key).await;
        assert!(created.zap.as_ref().unwrap().signature_required);
        let secret = created.signing_secret;
        assert!(secret.starts_with("whsec_"), "{secret}");
        let url = created.webhook_url;
        let body = r#"{"order": 1}"#;
        let now = chrono_now();
        let other: String = Secret::generate().expose();

        let mut empty = signed(&secret, "msg_1", now, body);
        empty[2].1 = "v1,".into();
        let rejected = [
            ("unsigned", body, Vec::new()),
            ("wrong secret", body, signed(&other, "msg_1", now, body)),
            (
                "one byte changed",
                r#"{"order": 2}"#,
                signed(&secret, "msg_1", now, body),
            ),
            ("empty signature", body, empty),
            (
                "six minutes old",
                body,
                signed(&secret, "msg_1", now - 360, body),
            ),
            (
                "six minutes ahead",
                body,
                signed(&secret, "msg_1", now + 360, body),
            ),
        ];
        for (case, sent, headers) in &rejected {
            let (status, answer) = post_signed(&url, sent, headers).await;
            assert_eq!(status, 401, "{case}: {answer}");
            assert!(
                answer["error"]
                    .as_str()
                    .unwrap()
                    .starts_with("invalid webhook signature"),
                "{case}: {answer}"
            );
        }
        assert_eq!(count_runs(&stack).await, 0);

        let headers = signed(&secret, "msg_1", now, body);
        let (status, first) = post_signed(&url, body, &headers).await;
        assert_eq!(status, 202, "{first}");
        let (status, again) = post_signed(&url, body, &headers).await;
        assert_eq!(
            (status, &again["run_id"]),
            (202, &first["run_id"]),
            "webhook-id makes a retry idempotent"
        );

        // Rotation: the old secret stops working, the new one works.
        let rotated = client
            .rotate_signing_secret(with_key(
                &key,
                pb::RotateSigningSecretRequest {
                    id: created.zap.unwrap().id,
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .signing_secret;
        assert_eq!(
            post_signed(&url, body, &signed(&secret, "msg_2", now, body))
                .await
                .0,
            401
        );
        assert_eq!(
            post_signed(&url, body, &signed(&rotated, "msg_2", now, body))
                .await
                .0,
            202
        );
        assert_eq!(count_runs(&stack).await, 2);
        stack.stop().await;
    }

    /// The signed `webhook-id` is what makes a delivery new: resending a
    /// signed delivery with unsigned headers added changes nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_replayed_signed_delivery_never_makes_a_second_run() {
        let stack = stack(1024 * 1024).await;
        let key = new_user(&stack, "alice").await;
        let created = create_signed_zap(&mut stack.zap_client().await, &key).await;
        let body = r#"{"order": 1}"#;
        let headers = signed(&created.signing_secret, "msg_1", chrono_now(), body);
        let (status, first) = post_signed(&created.webhook_url, body, &headers).await;
        assert_eq!(status, 202, "{first}");
        for idempotency_key in ["k1", "k2"] {
            let mut replayed = headers.clone();
            replayed.push(("idempotency-key".into(), idempotency_key.into()));
            let (status, again) = post_signed(&created.webhook_url, body, &replayed).await;
            assert_eq!(status, 202, "{again}");
            assert_eq!(again["run_id"], first["run_id"], "{idempotency_key}");
            assert_eq!(again["duplicate"], true, "{idempotency_key}");
        }
        assert_eq!(count_runs(&stack).await, 1);
        stack.stop().await;
    }

    fn chrono_now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flooded_zap_gets_429_while_other_zaps_flow() {
    let options = StackOptions {
        per_zap_limit: Some(zapflow_gateway::RateLimit {
            per_second: 2.0,
            burst: 5,
        }),
        ..StackOptions::default()
    };
    let stack = Stack::start(test_store().await, None, options).await;
    let key = new_user(&stack, "alice").await;
    let (_, flooded) = simple_zap(&stack, &key).await;
    let (_, quiet) = simple_zap(&stack, &key).await;

    // A bounded flood: 40 requests, 10 at a time.
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..4 {
        let answers = futures::future::join_all((0..10).map(|_| {
            reqwest::Client::new()
                .post(&flooded)
                .header("content-type", "application/json")
                .body("{}")
                .send()
        }))
        .await;
        for answer in answers {
            let answer = answer.unwrap();
            if answer.status() == 429 {
                retry_after = answer
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().to_owned());
            }
            statuses.push(answer.status().as_u16());
        }
    }
    let accepted = statuses.iter().filter(|&&s| s == 202).count();
    assert!(
        (5..=8).contains(&accepted),
        "burst of 5 plus a little refill, got {accepted}: {statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|&&s| s == 429).count(),
        40 - accepted
    );
    let retry_after: u64 = retry_after
        .expect("429 carries Retry-After")
        .parse()
        .unwrap();
    assert!((1..=3).contains(&retry_after), "{retry_after}");

    assert_eq!(
        post_json(&quiet, &json!({})).await.0,
        202,
        "another zap is unaffected"
    );
    assert_eq!(
        count_runs(&stack).await as usize,
        accepted + 1,
        "refused deliveries made no run"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_source_address_is_limited_across_zaps() {
    let options = StackOptions {
        per_ip_limit: Some(zapflow_gateway::RateLimit {
            per_second: 1.0,
            burst: 3,
        }),
        ..StackOptions::default()
    };
    let stack = Stack::start(test_store().await, None, options).await;
    let key = new_user(&stack, "alice").await;
    let (_, first) = simple_zap(&stack, &key).await;
    let (_, second) = simple_zap(&stack, &key).await;
    let mut statuses = Vec::new();
    for url in [&first, &second, &first, &second, &first] {
        statuses.push(post_json(url, &json!({})).await.0);
    }
    assert_eq!(statuses[..3], [202, 202, 202]);
    assert_eq!(statuses[3..], [429, 429]);
    stack.stop().await;
}
