//! Zap names are unique per user, so that files and commands can name zaps;
//! and runs can be listed by status and time.

use serde_json::json;
use tonic::Code;
use zapflow_proto::v1 as pb;
use zapflow_testkit::{StackOptions, with_key};

use crate::support::{Deployment, deliver, email_action, new_user, stack_of, wait_for_run};

on_outbox_deployments!(
    a_name_stands_for_one_live_zap_of_its_owner,
    runs_are_listed_by_status_and_creation_time
);

fn create(name: &str) -> pb::CreateZapRequest {
    pb::CreateZapRequest {
        name: name.into(),
        actions: vec![email_action("to@example.com", "s", "b")],
        ..Default::default()
    }
}

async fn a_name_stands_for_one_live_zap_of_its_owner(deployment: Deployment) {
    let stack = stack_of(deployment, StackOptions::default()).await;
    let (ada, bob) = (new_user(&stack, "ada").await, new_user(&stack, "bob").await);
    let mut client = stack.zap_client().await;

    let first = client
        .create_zap(with_key(&ada, create("Orders")))
        .await
        .unwrap()
        .into_inner()
        .zap
        .unwrap();
    let again = client
        .create_zap(with_key(&ada, create("Orders")))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists);
    assert_eq!(
        again.message(),
        "a zap named \"Orders\" already exists; choose another name, or update that zap"
    );
    // Another user's names are theirs.
    client
        .create_zap(with_key(&bob, create("Orders")))
        .await
        .unwrap();

    // GetZap by name, as the caller's own.
    let by_name = |key: &str, name: &str| {
        with_key(
            key,
            pb::GetZapRequest {
                name: name.into(),
                ..Default::default()
            },
        )
    };
    let found = client
        .get_zap(by_name(&ada, "Orders"))
        .await
        .unwrap()
        .into_inner()
        .zap
        .unwrap();
    assert_eq!(found.id, first.id);
    let missing = client.get_zap(by_name(&ada, "Invoices")).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    // Renaming onto a taken name is refused too.
    let other = client
        .create_zap(with_key(&ada, create("Invoices")))
        .await
        .unwrap()
        .into_inner()
        .zap
        .unwrap();
    let rename = client
        .update_zap(with_key(
            &ada,
            pb::UpdateZapRequest {
                id: other.id.clone(),
                name: "Orders".into(),
                actions: vec![email_action("to@example.com", "s", "b")],
                require_signature: None,
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(rename.code(), Code::AlreadyExists);

    // UpdateZap turns signatures on (a secret, once) and off.
    let update = |require_signature| {
        with_key(
            &ada,
            pb::UpdateZapRequest {
                id: other.id.clone(),
                name: "Invoices".into(),
                actions: vec![email_action("to@example.com", "s", "b")],
                require_signature,
                ..Default::default()
            },
        )
    };
    let signed = client
        .update_zap(update(Some(true)))
        .await
        .unwrap()
        .into_inner();
    assert!(signed.signing_secret.starts_with("whsec_"));
    assert!(signed.zap.unwrap().signature_required);
    let kept = client.update_zap(update(None)).await.unwrap().into_inner();
    assert!(kept.signing_secret.is_empty());
    assert!(kept.zap.unwrap().signature_required);
    let unsigned = client
        .update_zap(update(Some(false)))
        .await
        .unwrap()
        .into_inner();
    assert!(!unsigned.zap.unwrap().signature_required);

    // A deleted zap's name is free again.
    client
        .delete_zap(with_key(&ada, pb::DeleteZapRequest { id: first.id }))
        .await
        .unwrap();
    client
        .create_zap(with_key(&ada, create("Orders")))
        .await
        .unwrap();
    stack.stop().await;
}

async fn runs_are_listed_by_status_and_creation_time(deployment: Deployment) {
    let stack = stack_of(deployment, StackOptions::default()).await;
    let key = new_user(&stack, "ada").await;
    let mut client = stack.zap_client().await;
    let created = client
        .create_zap(with_key(
            &key,
            pb::CreateZapRequest {
                name: "mail".into(),
                actions: vec![email_action("{{ trigger.to }}", "s", "b")],
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let ok = deliver(&created.webhook_url, &json!({"to": "a@example.com"})).await;
    let failed = deliver(&created.webhook_url, &json!({})).await;
    wait_for_run(&stack, &key, &ok, pb::RunStatus::Succeeded).await;
    wait_for_run(&stack, &key, &failed, pb::RunStatus::Failed).await;

    let list = |statuses: Vec<pb::RunStatus>, start_time, end_time| {
        with_key(
            &key,
            pb::ListRunsRequest {
                statuses: statuses.into_iter().map(|s| s as i32).collect(),
                start_time,
                end_time,
                ..Default::default()
            },
        )
    };
    let ids = |reply: pb::ListRunsResponse| -> Vec<String> {
        reply.runs.into_iter().map(|run| run.id).collect()
    };
    let reply = client
        .list_runs(list(vec![pb::RunStatus::Failed], None, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(reply), std::slice::from_ref(&failed));
    let both = vec![pb::RunStatus::Failed, pb::RunStatus::Succeeded];
    let reply = client
        .list_runs(list(both, None, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(reply), [failed.clone(), ok.clone()], "newest first");

    let now = std::time::SystemTime::now();
    let later = prost_types::Timestamp::from(now + std::time::Duration::from_secs(60));
    let earlier = prost_types::Timestamp::from(now - std::time::Duration::from_secs(600));
    let reply = client
        .list_runs(list(vec![], Some(later), None))
        .await
        .unwrap()
        .into_inner();
    assert!(reply.runs.is_empty(), "nothing created after now");
    let reply = client
        .list_runs(list(vec![], Some(earlier), Some(later)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.runs.len(), 2);

    let unspecified = client
        .list_runs(list(vec![pb::RunStatus::Unspecified], None, None))
        .await
        .unwrap_err();
    assert_eq!(unspecified.code(), Code::InvalidArgument);
    stack.stop().await;
}
