//! Plain SMTP (`smtp://host[:port]`, no TLS, no login) over connections of
//! our own: TCP_NODELAY set, and kept open between messages.
//!
//! lettre's transport leaves Nagle's algorithm on and writes a message's
//! body and its closing "." in separate writes, so every message waits out
//! the server's delayed ACK (about 40 ms on Linux): one worker could not
//! send more than a couple of dozen emails a second per connection. Here
//! lettre still speaks SMTP (`AsyncSmtpConnection`); only the socket and the
//! pool are ours. TLS and authenticated servers keep lettre's transport.

use std::io::ErrorKind;
use std::os::fd::AsFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lettre::address::Envelope;
use lettre::transport::smtp::client::AsyncSmtpConnection;
use lettre::transport::smtp::extension::ClientId;
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
}

impl Connection {
    /// Whether the server said nothing since its last answer: no hang-up,
    /// no unasked-for reply (a 421 before closing). Sockets are
    /// non-blocking, so the peek returns at once.
    fn quiet(&self) -> bool {
        matches!(self.socket.peek(&mut [0; 1]), Err(error) if error.kind() == ErrorKind::WouldBlock)
    }
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
        let sent = connection.smtp.send(envelope, message);
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
        Ok(Connection { smtp, socket })
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
