//! Every ZapService call needs a valid key and sees only its owner's data.

use serde_json::json;
use tonic::Code;
use zapflow_proto::v1 as pb;
use zapflow_proto::v1::zap_service_client::ZapServiceClient;
use zapflow_testkit::{Stack, StackOptions, test_store, with_key};

use crate::support::{email_action, new_user, post_json, simple_zap};

/// Calls every ZapService RPC that takes an id with `zap_id` / `run_id`,
/// authenticated with `key`; returns each call's name and status code.
async fn call_every_rpc(
    client: &mut ZapServiceClient<tonic::transport::Channel>,
    key: &str,
    zap_id: &str,
    run_id: &str,
) -> Vec<(&'static str, Code)> {
    let id = zap_id.to_owned();
    let actions = vec![email_action("a@example.com", "s", "b")];
    let code =
        |result: Result<(), tonic::Status>| result.err().map_or(Code::Ok, |status| status.code());
    vec![
        (
            "GetZap",
            code(
                client
                    .get_zap(with_key(
                        key,
                        pb::GetZapRequest {
                            id: id.clone(),
                            ..Default::default()
                        },
                    ))
                    .await
                    .map(drop),
            ),
        ),
        (
            "UpdateZap",
            code(
                client
                    .update_zap(with_key(
                        key,
                        pb::UpdateZapRequest {
                            id: id.clone(),
                            name: "x".into(),
                            actions,
                            ..Default::default()
                        },
                    ))
                    .await
                    .map(drop),
            ),
        ),
        (
            "PauseZap",
            code(
                client
                    .pause_zap(with_key(key, pb::PauseZapRequest { id: id.clone() }))
                    .await
                    .map(drop),
            ),
        ),
        (
            "ResumeZap",
            code(
                client
                    .resume_zap(with_key(key, pb::ResumeZapRequest { id: id.clone() }))
                    .await
                    .map(drop),
            ),
        ),
        (
            "RotateWebhookToken",
            code(
                client
                    .rotate_webhook_token(with_key(
                        key,
                        pb::RotateWebhookTokenRequest { id: id.clone() },
                    ))
                    .await
                    .map(drop),
            ),
        ),
        (
            "RotateSigningSecret",
            code(
                client
                    .rotate_signing_secret(with_key(
                        key,
                        pb::RotateSigningSecretRequest { id: id.clone() },
                    ))
                    .await
                    .map(drop),
            ),
        ),
        (
            "ListRuns",
            code(
                client
                    .list_runs(with_key(
                        key,
                        pb::ListRunsRequest {
                            zap_id: id.clone(),
                            ..Default::default()
                        },
                    ))
                    .await
                    .map(drop),
            ),
        ),
        (
            "GetRun",
            code(
                client
                    .get_run(with_key(
                        key,
                        pb::GetRunRequest {
                            id: run_id.to_owned(),
                        },
                    ))
                    .await
                    .map(drop),
            ),
        ),
        (
            "DeleteZap",
            code(
                client
                    .delete_zap(with_key(key, pb::DeleteZapRequest { id }))
                    .await
                    .map(drop),
            ),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_users_zaps_and_runs_are_not_found_and_stay_untouched() {
    let stack = Stack::start(test_store().await, None, StackOptions::default()).await;
    let alice = new_user(&stack, "alice").await;
    let bob = new_user(&stack, "bob").await;
    let (zap, webhook_url) = simple_zap(&stack, &alice).await;
    let (status, answer) = post_json(&webhook_url, &json!({"n": 1})).await;
    assert_eq!(status, 202);
    let run_id = answer["run_id"].as_str().unwrap();

    let mut client = stack.zap_client().await;
    for (rpc, code) in call_every_rpc(&mut client, &bob, &zap.id, run_id).await {
        assert_eq!(code, Code::NotFound, "{rpc} as another user");
    }
    let listed = client
        .list_zaps(with_key(&bob, pb::ListZapsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.zaps.is_empty());
    let runs = client
        .list_runs(with_key(&bob, pb::ListRunsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(runs.runs.is_empty());

    // Alice's zap is unchanged: same name, still active, old URL still works.
    let mine = client
        .get_zap(with_key(
            &alice,
            pb::GetZapRequest {
                id: zap.id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .zap
        .unwrap();
    assert_eq!(mine, zap);
    assert_eq!(post_json(&webhook_url, &json!({"n": 2})).await.0, 202);

    // And the owner gets every call through.
    for (rpc, code) in call_every_rpc(&mut client, &alice, &zap.id, run_id).await {
        assert_eq!(code, Code::Ok, "{rpc} as the owner");
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_rpc_without_a_valid_key_is_unauthenticated() {
    let stack = Stack::start(test_store().await, None, StackOptions::default()).await;
    let alice = new_user(&stack, "alice").await;
    let (zap, _) = simple_zap(&stack, &alice).await;
    let mut client = stack.zap_client().await;
    let forged = format!("{}x", &alice);
    let unknown = zapflow_core::secret::ApiKey::generate().to_string();

    for key in ["", "nonsense", forged.as_str(), unknown.as_str()] {
        for (rpc, code) in call_every_rpc(&mut client, key, &zap.id, &zap.id).await {
            assert_eq!(code, Code::Unauthenticated, "{rpc} with key {key:?}");
        }
        let code = |status: tonic::Status| status.code();
        let list = client
            .list_zaps(with_key(key, pb::ListZapsRequest::default()))
            .await;
        assert_eq!(list.map(drop).map_err(code), Err(Code::Unauthenticated));
        let types = client
            .list_action_types(with_key(key, pb::ListActionTypesRequest {}))
            .await;
        assert_eq!(types.map(drop).map_err(code), Err(Code::Unauthenticated));
        let create = client
            .create_zap(with_key(
                key,
                pb::CreateZapRequest {
                    name: "x".into(),
                    actions: vec![],
                    ..Default::default()
                },
            ))
            .await;
        assert_eq!(create.map(drop).map_err(code), Err(Code::Unauthenticated));
    }
    // No authorization header at all.
    let status = client
        .get_zap(pb::GetZapRequest {
            id: zap.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_zaps_are_rejected_naming_the_field() {
    let stack = Stack::start(test_store().await, None, StackOptions::default()).await;
    let key = new_user(&stack, "alice").await;
    let mut client = stack.zap_client().await;
    let unknown_type = pb::Action {
        r#type: "fax".into(),
        config: None,
        retry: None,
    };
    let cases = [
        ("", vec![email_action("a@example.com", "s", "b")], "name"),
        ("zap", vec![], "actions"),
        ("zap", vec![unknown_type], "actions[0].type"),
        (
            "zap",
            vec![email_action("not an address", "s", "b")],
            "actions[0].config.to",
        ),
        (
            "zap",
            vec![
                email_action("a@example.com", "s", "b"),
                email_action("a@example.com", "", "b"),
            ],
            "actions[1].config.subject",
        ),
    ];
    for (name, actions, field) in cases {
        let status = client
            .create_zap(with_key(
                &key,
                pb::CreateZapRequest {
                    name: name.into(),
                    actions,
                    ..Default::default()
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(
            status.message().starts_with(&format!("{field}: ")),
            "{field}: {}",
            status.message()
        );
    }

    let types = client
        .list_action_types(with_key(&key, pb::ListActionTypesRequest {}))
        .await
        .unwrap()
        .into_inner();
    let email = types
        .action_types
        .iter()
        .find(|t| t.r#type == "email")
        .unwrap();
    let required: Vec<_> = email
        .fields
        .iter()
        .filter(|f| f.required)
        .map(|f| f.name.as_str())
        .collect();
    assert_eq!(required, ["to", "subject", "body"]);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn zaps_page_through_in_creation_order() {
    let stack = Stack::start(test_store().await, None, StackOptions::default()).await;
    let key = new_user(&stack, "alice").await;
    let mut created = Vec::new();
    for _ in 0..5 {
        created.push(simple_zap(&stack, &key).await.0.id);
    }
    let mut client = stack.zap_client().await;
    let (mut seen, mut token) = (Vec::new(), String::new());
    loop {
        let page = client
            .list_zaps(with_key(
                &key,
                pb::ListZapsRequest {
                    page_size: 2,
                    page_token: token,
                },
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(page.zaps.len() <= 2);
        seen.extend(page.zaps.into_iter().map(|zap| zap.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, created);
    stack.stop().await;
}
