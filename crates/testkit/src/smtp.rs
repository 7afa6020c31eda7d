//! A small but real SMTP server for tests: it speaks the protocol on a
//! loopback socket and keeps every message it accepts.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// One accepted message.
#[derive(Debug, Clone)]
pub struct Mail {
    pub from: String,
    pub recipients: Vec<String>,
    /// The message as sent after DATA (headers, blank line, body).
    pub data: String,
    /// When the final "." of the message was read.
    pub received: Instant,
}

impl Mail {
    /// The first header of that name (case-insensitive), unfolded.
    pub fn header(&self, name: &str) -> Option<String> {
        let head = self.data.split("\r\n\r\n").next()?;
        let mut value: Option<String> = None;
        for line in head.split("\r\n") {
            if let Some(current) = value.as_mut() {
                if line.starts_with([' ', '\t']) {
                    current.push_str(line);
                    continue;
                }
                break;
            }
            if let Some((key, rest)) = line.split_once(':')
                && key.eq_ignore_ascii_case(name)
            {
                value = Some(rest.trim().to_owned());
            }
        }
        value
    }

    /// The body, after the headers.
    pub fn body(&self) -> &str {
        self.data
            .split_once("\r\n\r\n")
            .map_or("", |(_, body)| body)
    }
}

#[derive(Default)]
struct Shared {
    mails: Mutex<Vec<Mail>>,
    /// When set, the reply to every RCPT TO (for example "451 try later").
    reject_rcpt: Mutex<Option<String>>,
    /// How long to wait before accepting a message (a slow server).
    stall: Mutex<Duration>,
    /// Messages whose DATA has begun, accepted or not.
    data_started: std::sync::atomic::AtomicUsize,
    /// Replies to RCPT TO for particular addresses.
    reject_address: Mutex<std::collections::HashMap<String, String>>,
    arrived: Notify,
}

/// The SMTP server; it stops when dropped.
pub struct SmtpSink {
    address: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl SmtpSink {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the SMTP sink");
        let address = listener.local_addr().expect("local address");
        let shared = Arc::new(Shared::default());
        let task = tokio::spawn({
            let shared = shared.clone();
            async move {
                while let Ok((stream, _)) = listener.accept().await {
                    tokio::spawn(serve(stream, shared.clone()));
                }
            }
        });
        Self {
            address,
            shared,
            task,
        }
    }

    /// `smtp://127.0.0.1:<port>`, for `EmailSettings::smtp_url`.
    pub fn url(&self) -> String {
        format!("smtp://{}", self.address)
    }

    /// Answers every RCPT TO with `reply` (e.g. `451 4.3.0 busy`), or
    /// accepts again with `None`.
    pub fn reject_recipients(&self, reply: Option<&str>) {
        *self.shared.reject_rcpt.lock().unwrap() = reply.map(str::to_owned);
    }

    /// Answers RCPT TO for `address` with `reply` (e.g. `550 5.1.1 no such
    /// user`), or accepts it again with `None`.
    pub fn reject_address(&self, address: &str, reply: Option<&str>) {
        let mut rejected = self.shared.reject_address.lock().unwrap();
        match reply {
            Some(reply) => rejected.insert(address.to_owned(), reply.to_owned()),
            None => rejected.remove(address),
        };
    }

    /// Waits `stall` before answering each message's DATA (a slow server).
    pub fn stall(&self, stall: Duration) {
        *self.shared.stall.lock().unwrap() = stall;
    }

    /// How many messages have begun their DATA, accepted or not.
    pub fn data_started(&self) -> usize {
        self.shared
            .data_started
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn mails(&self) -> Vec<Mail> {
        self.mails_after(0)
    }

    /// The messages that arrived after the first `count`, in arrival order:
    /// a watcher that keeps count copies each message once.
    pub fn mails_after(&self, count: usize) -> Vec<Mail> {
        let mails = self.shared.mails.lock().unwrap();
        mails.get(count..).unwrap_or_default().to_vec()
    }

    /// The subjects of every message so far, sorted.
    pub fn sorted_subjects(&self) -> Vec<String> {
        let mut subjects: Vec<String> = self
            .mails()
            .iter()
            .map(|mail| mail.header("Subject").unwrap_or_default())
            .collect();
        subjects.sort();
        subjects
    }

    /// Waits until at least `count` messages arrived; panics after `timeout`.
    pub async fn wait_for(&self, count: usize, timeout: Duration) -> Vec<Mail> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let arrived = self.shared.arrived.notified();
            let mails = self.mails();
            if mails.len() >= count {
                return mails;
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                panic!(
                    "expected {count} emails within {timeout:?}, got {}: {mails:#?}",
                    mails.len()
                );
            }
        }
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(stream: TcpStream, shared: Arc<Shared>) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let (reader, writer) = stream.into_split();
    let mut reader = BufReader::new(reader);
    // Replies to commands that came together go out together, once the
    // commands read are all answered (RFC 2920, 3.2).
    let mut writer = BufWriter::new(writer);
    writer.write_all(b"220 zapflow-test-sink ESMTP\r\n").await?;
    writer.flush().await?;
    let (mut from, mut recipients) = (String::new(), Vec::new());
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let command = line.trim_end().to_owned();
        let verb = command
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_ascii_uppercase();
        let reply: String = match verb.as_str() {
            "EHLO" => {
                "250-zapflow-test-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SMTPUTF8".into()
            }
            "HELO" => "250 zapflow-test-sink".into(),
            "MAIL" => {
                from = address_of(&command);
                recipients.clear();
                "250 OK".into()
            }
            "RCPT" => {
                let address = address_of(&command);
                let rejected = shared.reject_address.lock().unwrap().get(&address).cloned();
                match rejected.or_else(|| shared.reject_rcpt.lock().unwrap().clone()) {
                    Some(reply) => reply,
                    None => {
                        recipients.push(address);
                        "250 OK".into()
                    }
                }
            }
            // As real servers do, and what a client that pipelines
            // relies on: no message without a recipient.
            "DATA" if recipients.is_empty() => "554 5.5.1 no valid recipients".into(),
            "DATA" => {
                shared
                    .data_started
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                writer.write_all(b"354 end with <CRLF>.<CRLF>\r\n").await?;
                writer.flush().await?;
                let mut data = String::new();
                loop {
                    line.clear();
                    if reader.read_line(&mut line).await? == 0 {
                        return Ok(());
                    }
                    if line == ".\r\n" {
                        break;
                    }
                    // Undo dot-stuffing.
                    data.push_str(
                        line.strip_prefix('.')
                            .filter(|_| line.starts_with(".."))
                            .unwrap_or(&line),
                    );
                }
                let received = Instant::now();
                let data = data.strip_suffix("\r\n").unwrap_or(&data).to_owned();
                let stall = *shared.stall.lock().unwrap();
                tokio::time::sleep(stall).await;
                shared.mails.lock().unwrap().push(Mail {
                    from: std::mem::take(&mut from),
                    recipients: std::mem::take(&mut recipients),
                    data,
                    received,
                });
                shared.arrived.notify_waiters();
                "250 OK queued".into()
            }
            "RSET" => {
                from.clear();
                recipients.clear();
                "250 OK".into()
            }
            "NOOP" => "250 OK".into(),
            "QUIT" => {
                writer.write_all(b"221 bye\r\n").await?;
                writer.flush().await?;
                return Ok(());
            }
            _ => "502 command not implemented".into(),
        };
        writer.write_all(format!("{reply}\r\n").as_bytes()).await?;
        if reader.buffer().is_empty() {
            writer.flush().await?;
        }
    }
}

fn address_of(command: &str) -> String {
    let start = command.find('<').map_or(0, |i| i + 1);
    let end = command[start..]
        .find('>')
        .map_or(command.len(), |i| start + i);
    command[start..end].to_owned()
}
