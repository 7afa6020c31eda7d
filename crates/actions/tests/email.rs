//! The email action against SMTP servers that behave in ways the test kit's
//! sink does not: one that hangs up after every message, and one that
//! answers a message's commands only once they have all arrived.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use zapflow_actions::{ActionError, EmailSettings, Executor, Mailer};
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

/// What a pipelining server saw.
#[derive(Default)]
struct Seen {
    connections: AtomicUsize,
    /// Each accepted message's data, dot-stuffing undone.
    messages: Mutex<Vec<String>>,
    /// Messages whose DATA was answered 354 and whose sender hung up
    /// before the closing dot.
    abandoned: AtomicUsize,
}

/// An SMTP server on loopback that says it pipelines (RFC 2920) and holds
/// its answers to MAIL, RCPT and DATA until all three have arrived: a
/// client that waits for each answer before its next command gets none.
/// It refuses every recipient at `refused.example.com`.
async fn answering_only_whole_pipelines() -> (u16, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Seen::default());
    let server = seen.clone();
    tokio::spawn(async move {
        loop {
            let (socket, _) = listener.accept().await.unwrap();
            server.connections.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(pipelined_session(socket, server.clone()));
        }
    });
    (port, seen)
}

async fn pipelined_session(socket: tokio::net::TcpStream, seen: Arc<Seen>) {
    let (read, mut write) = socket.into_split();
    let mut lines = BufReader::new(read).lines();
    write.write_all(b"220 sink ready\r\n").await.unwrap();
    let mut answers = String::new();
    let mut accepted = 0;
    while let Ok(Some(line)) = lines.next_line().await {
        if line.starts_with("EHLO") {
            answers.push_str("250-sink\r\n250-PIPELINING\r\n250 8BITMIME\r\n");
        } else if line.starts_with("MAIL") {
            answers.push_str("250 ok\r\n");
            accepted = 0;
            continue;
        } else if line.starts_with("RCPT") {
            if line.contains("@refused.example.com") {
                answers.push_str("550 5.1.1 no such user\r\n");
            } else {
                accepted += 1;
                answers.push_str("250 ok\r\n");
            }
            continue;
        } else if line == "DATA" && accepted == 0 {
            answers.push_str("554 5.5.1 no valid recipients\r\n");
        } else if line == "DATA" {
            answers.push_str("354 go on\r\n");
            write.write_all(answers.as_bytes()).await.unwrap();
            answers.clear();
            let mut data = Vec::new();
            loop {
                match lines.next_line().await {
                    Ok(Some(line)) if line == "." => break,
                    Ok(Some(line)) => {
                        let unstuffed = line.strip_prefix('.').filter(|_| line.starts_with(".."));
                        data.push(unstuffed.unwrap_or(&line).to_owned());
                    }
                    _ => {
                        seen.abandoned.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                }
            }
            seen.messages.lock().unwrap().push(data.join("\n"));
            answers.push_str("250 queued\r\n");
        } else {
            answers.push_str("250 ok\r\n");
        }
        if write.write_all(answers.as_bytes()).await.is_err() {
            return;
        }
        answers.clear();
    }
}

fn executor_for(port: u16) -> Executor {
    let mailer = Mailer::new(&EmailSettings {
        smtp_url: Some(format!("smtp://127.0.0.1:{port}")),
        mailbox_dir: std::env::temp_dir(),
        from: "zapflow@localhost".into(),
        timeout: Duration::from_secs(5),
        max_recipients: zapflow_actions::DEFAULT_MAX_RECIPIENTS,
    })
    .unwrap();
    Executor::new(mailer)
}

fn email(config: serde_json::Value) -> ActionSpec {
    ActionSpec {
        action_type: "email".into(),
        config: config.as_object().unwrap().clone(),
        retry: None,
    }
}

async fn send(executor: &Executor, action: &ActionSpec) -> Result<(), ActionError> {
    let step = zapflow_actions::StepRef {
        run_id: uuid::Uuid::now_v7(),
        stage: 0,
    };
    executor.execute(action, &json!({}), step).await.map(drop)
}

#[tokio::test]
async fn a_server_that_pipelines_gets_a_messages_commands_in_one_write() {
    let (port, seen) = answering_only_whole_pipelines().await;
    let executor = executor_for(port);
    // Lines that begin with a dot, one of them alone, go through whole.
    let body = ".profile\n.\nend";
    let action =
        email(json!({"to": "bob@example.com, eve@example.com", "subject": "s", "body": body}));
    for message in 0..2 {
        let sent = tokio::time::timeout(Duration::from_secs(10), send(&executor, &action)).await;
        assert!(
            matches!(sent, Ok(Ok(()))),
            "message {message}: {sent:?} (a client that waits for each answer gets none here)"
        );
    }
    let messages = seen.messages.lock().unwrap().clone();
    assert_eq!(messages.len(), 2);
    for message in &messages {
        assert!(message.ends_with("\n\n.profile\n.\nend\n"), "{message:?}");
    }
    assert_eq!(
        seen.connections.load(Ordering::SeqCst),
        1,
        "both on one connection"
    );
}

#[tokio::test]
async fn a_recipient_refused_in_a_pipeline_sends_no_message_and_the_connection_is_dropped() {
    let (port, seen) = answering_only_whole_pipelines().await;
    let executor = executor_for(port);
    // The server takes one recipient and so answers DATA with 354; the
    // body must not follow, or the refused recipient's message would go to
    // the other alone.
    let partly_refused = email(json!({
        "to": "bob@example.com, gone@refused.example.com", "subject": "s", "body": "b",
    }));
    let refused = send(&executor, &partly_refused).await;
    assert!(
        matches!(&refused, Err(ActionError::Permanent(error)) if error.contains("no such user")),
        "{refused:?}"
    );
    let abandoned = async {
        while seen.abandoned.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), abandoned)
        .await
        .expect("the mailer hangs up on the server waiting for the body");

    let accepted = email(json!({"to": "bob@example.com", "subject": "s", "body": "b"}));
    send(&executor, &accepted).await.unwrap();
    assert_eq!(
        seen.messages.lock().unwrap().len(),
        1,
        "only the second message"
    );
    assert_eq!(
        seen.connections.load(Ordering::SeqCst),
        2,
        "the first connection is not reused"
    );
}

#[tokio::test]
async fn a_server_that_hangs_up_after_each_message_costs_no_attempt() {
    let (port, connections, messages) = one_message_per_connection().await;
    let executor = executor_for(port);
    let action = email(json!({"to": "bob@example.com", "subject": "s", "body": "b"}));
    for stage in 0..3 {
        let sent = send(&executor, &action).await;
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
