//! The email action against SMTP servers that behave in ways the test kit's
//! sink does not: here, one that hangs up after every message.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use zapflow_actions::{EmailSettings, Executor, Mailer};
use zapflow_core::ActionSpec;

/// An SMTP server on loopback that accepts one message per connection and
/// then closes it; counts connections and messages.
async fn one_message_per_connection() -> (u16, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (connections, messages) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let counters = (connections.clone(), messages.clone());
    tokio::spawn(async move {
        loop {
            let (socket, _) = listener.accept().await.unwrap();
            counters.0.fetch_add(1, Ordering::SeqCst);
            let messages = counters.1.clone();
            tokio::spawn(async move {
                let (read, mut write) = socket.into_split();
                let mut lines = BufReader::new(read).lines();
                write.write_all(b"220 sink ready\r\n").await.unwrap();
                let mut in_data = false;
                while let Ok(Some(line)) = lines.next_line().await {
                    let reply: &[u8] = if in_data {
                        if line != "." {
                            continue;
                        }
                        messages.fetch_add(1, Ordering::SeqCst);
                        // Accepted, then the server hangs up.
                        let _ = write.write_all(b"250 queued\r\n").await;
                        return;
                    } else if line.starts_with("EHLO") {
                        b"250-sink\r\n250 8BITMIME\r\n"
                    } else if line == "DATA" {
                        in_data = true;
                        b"354 go on\r\n"
                    } else {
                        b"250 ok\r\n"
                    };
                    if write.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, connections, messages)
}

#[tokio::test]
async fn a_server_that_hangs_up_after_each_message_costs_no_attempt() {
    let (port, connections, messages) = one_message_per_connection().await;
    let mailer = Mailer::new(&EmailSettings {
        smtp_url: Some(format!("smtp://127.0.0.1:{port}")),
        mailbox_dir: std::env::temp_dir(),
        from: "zapflow@localhost".into(),
        timeout: Duration::from_secs(5),
        max_recipients: zapflow_actions::DEFAULT_MAX_RECIPIENTS,
    })
    .unwrap();
    let executor = Executor::new(mailer);
    let action = ActionSpec {
        action_type: "email".into(),
        config: json!({"to": "bob@example.com", "subject": "s", "body": "b"})
            .as_object()
            .unwrap()
            .clone(),
        retry: None,
    };
    for stage in 0..3 {
        let step = zapflow_actions::StepRef {
            run_id: uuid::Uuid::now_v7(),
            stage,
        };
        let sent = executor.execute(&action, &json!({}), step).await;
        assert!(sent.is_ok(), "message {stage}: {sent:?}");
        // Let the server's hang-up land before the next message.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(messages.load(Ordering::SeqCst), 3);
    assert_eq!(
        connections.load(Ordering::SeqCst),
        3,
        "one each: none reused dead"
    );
}
