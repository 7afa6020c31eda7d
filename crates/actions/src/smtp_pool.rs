//! Plain SMTP (`smtp://host[:port]`, no TLS, no login) over connections of
//! our own: TCP_NODELAY set, kept open between messages, and pipelined
//! where the server allows it.
//!
//! lettre's transport leaves Nagle's algorithm on and writes a message's
//! body and its closing "." in separate writes, so every message waits out
//! the server's delayed ACK (about 40 ms on Linux): one worker could not
//! send more than a couple of dozen emails a second per connection. It also
//! waits for each command's answer before the next. Here lettre still
//! speaks SMTP (`AsyncSmtpConnection`); the socket, the pool and the order
//! of writes are ours. TLS and authenticated servers keep lettre's
//! transport.

use std::io::ErrorKind;
use std::os::fd::AsFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lettre::address::Envelope;
use lettre::transport::smtp::Error;
use lettre::transport::smtp::client::AsyncSmtpConnection;
use lettre::transport::smtp::commands::{Data, Ehlo, Mail, Rcpt};
use lettre::transport::smtp::extension::ClientId;
use lettre::transport::smtp::response::Response;
use tokio::net::TcpStream;

use crate::action::ActionError;

/// lettre's default for `smtp://` without a port.
const SMTP_PORT: u16 = 25;
/// Idle connections kept at most.
const MAX_IDLE: usize = 64;
/// A connection used this recently is checked by looking at its socket
/// alone; one idle longer must answer a NOOP first.
const FRESH: Duration = Duration::from_secs(1);

/// A connection, with a second descriptor of its socket to look for a
/// hang-up without a round trip.
struct Connection {
    smtp: AsyncSmtpConnection,
    socket: std::net::TcpStream,
    /// Whether the server takes a message's commands in one write
    /// (PIPELINING, RFC 2920).
    pipelining: bool,
}

impl Connection {
    /// Whether the server said nothing since its last answer: no hang-up,
    /// no unasked-for reply (a 421 before closing). Sockets are
    /// non-blocking, so the peek returns at once.
    fn quiet(&self) -> bool {
        matches!(self.socket.peek(&mut [0; 1]), Err(error) if error.kind() == ErrorKind::WouldBlock)
    }

    /// Sends one message. A server that pipelines gets MAIL, every RCPT
    /// and DATA in one write and answers them together, then the message
    /// and its closing dot in another: two round trips, where one command
    /// at a time takes three and one more per recipient. After a refusal
    /// the connection must not be reused (the server may be waiting for a
    /// body that never comes); the pool drops it.
    async fn send(&mut self, envelope: &Envelope, message: &[u8]) -> Result<Response, Error> {
        let addresses = envelope.from().into_iter().chain(envelope.to());
        let ascii = message.is_ascii() && addresses.map(AsRef::<str>::as_ref).all(str::is_ascii);
        if !self.pipelining || !ascii {
            // lettre checks that the server takes what is not ASCII (and
            // asks for it by name), or says why not.
            return self.smtp.send(envelope, message).await;
        }
        let mut commands = Mail::new(envelope.from().cloned(), Vec::new()).to_string();
        for recipient in envelope.to() {
            commands.push_str(&Rcpt::new(recipient.clone(), Vec::new()).to_string());
        }
        commands.push_str(&Data.to_string());
        self.smtp.command(commands).await?;
        for _ in envelope.to() {
            self.smtp.read_response().await?;
        }
        self.smtp.read_response().await?;
        let message = std::str::from_utf8(message).expect("checked to be ASCII");
        self.smtp.command(with_closing_dot(message)).await
    }
}

/// `message` as DATA sends it, in one piece: a line that begins with a
/// dot gets a second (RFC 5321, 4.5.2), and a line with a lone dot ends it.
fn with_closing_dot(message: &str) -> String {
    let mut data = String::with_capacity(message.len() + 8);
    for line in message.split_inclusive("\r\n") {
        if line.starts_with('.') {
            data.push('.');
        }
        data.push_str(line);
    }
    data.push_str("\r\n.\r\n");
    data
}

/// A connection waiting in the pool, since its last message.
struct Idle {
    connection: Connection,
    since: Instant,
}

pub(crate) struct PlainSmtp {
    host: String,
    port: u16,
    hello: ClientId,
    timeout: Duration,
    idle: Mutex<Vec<Idle>>,
}

impl PlainSmtp {
    /// The pool for `url`, when it names a plain server without login;
    /// `None` for anything lettre's transport should handle.
    pub(crate) fn for_url(url: &str, timeout: Duration) -> Option<Self> {
        let url = reqwest::Url::parse(url).ok()?;
        let plain = url.scheme() == "smtp"
            && url.username().is_empty()
            && url.password().is_none()
            && url.query_pairs().all(|(key, _)| key != "tls");
        if !plain {
            return None;
        }
        let hello = match url.path().trim_matches('/') {
            "" => ClientId::default(),
            name => ClientId::Domain(name.to_owned()),
        };
        Some(Self {
            host: url.host_str()?.to_owned(),
            port: url.port().unwrap_or(SMTP_PORT),
            hello,
            timeout,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// Sends one message; the connection goes back to the pool only after a
    /// clean success, so no half-finished transaction is ever reused.
    pub(crate) async fn send(
        &self,
        envelope: &Envelope,
        message: &[u8],
    ) -> Result<(), ActionError> {
        let mut connection = self.checkout().await?;
        let sent = connection.send(envelope, message);
        match tokio::time::timeout(self.timeout, sent).await {
            Ok(Ok(_)) => {
                self.checkin(connection);
                Ok(())
            }
            Ok(Err(error)) => Err(classify_smtp_error(error)),
            Err(_) => Err(ActionError::Transient(format!(
                "smtp: no answer within {:?}",
                self.timeout
            ))),
        }
    }

    /// A pooled connection that is still open, or a new one. The server may
    /// have closed it since, and a message must never be the first to find
    /// out: a hang-up shows on the socket at once, and a connection idle
    /// longer than [`FRESH`] (which a network in between may have dropped
    /// without a word) must also answer a NOOP, one round trip.
    async fn checkout(&self) -> Result<Connection, ActionError> {
        loop {
            let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let Some(Idle {
                mut connection,
                since,
            }) = idle
            else {
                return self.connect().await;
            };
            if !connection.quiet() {
                continue;
            }
            if since.elapsed() >= FRESH {
                let smtp = &mut connection.smtp;
                let alive = tokio::time::timeout(self.timeout, smtp.test_connected()).await;
                if smtp.has_broken() || !matches!(alive, Ok(true)) {
                    continue;
                }
            }
            return Ok(connection);
        }
    }

    fn checkin(&self, connection: Connection) {
        if connection.smtp.has_broken() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                connection,
                since: Instant::now(),
            });
        }
    }

    async fn connect(&self) -> Result<Connection, ActionError> {
        let unreachable = |error: String| {
            ActionError::Transient(format!(
                "smtp: cannot reach {}:{}: {error}",
                self.host, self.port
            ))
        };
        let stream = tokio::time::timeout(
            self.timeout,
            TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| unreachable(format!("no connection within {:?}", self.timeout)))?
        .map_err(|error| unreachable(error.to_string()))?;
        stream
            .set_nodelay(true)
            .map_err(|error| unreachable(error.to_string()))?;
        let socket = stream
            .as_fd()
            .try_clone_to_owned()
            .map_err(|error| unreachable(error.to_string()))?
            .into();
        let smtp = tokio::time::timeout(
            self.timeout,
            AsyncSmtpConnection::connect_with_transport(Box::new(stream), &self.hello),
        )
        .await
        .map_err(|_| unreachable(format!("no greeting within {:?}", self.timeout)))?
        .map_err(classify_smtp_error)?;
        let mut connection = Connection {
            smtp,
            socket,
            pipelining: false,
        };
        // lettre keeps only the extensions it knows from its EHLO; asking
        // again (allowed at any time) shows whether the server pipelines.
        let hello = connection.smtp.command(Ehlo::new(self.hello.clone()));
        let hello = tokio::time::timeout(self.timeout, hello)
            .await
            .map_err(|_| unreachable(format!("no EHLO answer within {:?}", self.timeout)))?
            .map_err(classify_smtp_error)?;
        connection.pipelining = hello
            .message()
            .any(|line| line.eq_ignore_ascii_case("PIPELINING"));
        Ok(connection)
    }
}

/// SMTP 5xx answers are permanent; 4xx, timeouts and connection failures
/// are worth another attempt.
pub(crate) fn classify_smtp_error(error: lettre::transport::smtp::Error) -> ActionError {
    if error.is_permanent() {
        ActionError::Permanent(format!("smtp: {error}"))
    } else {
        ActionError::Transient(format!("smtp: {error}"))
    }
}
