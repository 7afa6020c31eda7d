//! The `email` action: a templated message sent over SMTP with lettre, or
//! written to a local mailbox directory when no SMTP server is configured.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use lettre::message::header::ContentType;
use lettre::message::{Mailbox, Mailboxes, MultiPart, SinglePart};
use lettre::{AsyncFileTransport, AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde_json::{Map, Value, json};

use crate::catalog::{ActionField, ActionType};
use crate::smtp_pool::PlainSmtp;
use crate::{ActionError, StepRef, render_field};

pub const TYPE: &str = "email";

pub const ACTION_TYPE: ActionType = ActionType {
    name: TYPE,
    description: "Sends an email. Every field is a minijinja template over trigger, headers, \
                  query, steps and run.",
    fields: &[
        ActionField {
            name: "to",
            description: "Recipients, comma-separated (`Ada <ada@example.com>, bob@example.com`).",
            required: true,
            templated: true,
        },
        ActionField {
            name: "cc",
            description: "Copy recipients, comma-separated.",
            required: false,
            templated: true,
        },
        ActionField {
            name: "reply_to",
            description: "The Reply-To address.",
            required: false,
            templated: true,
        },
        ActionField {
            name: "subject",
            description: "The subject line; line breaks become spaces.",
            required: true,
            templated: true,
        },
        ActionField {
            name: "body",
            description: "The plain-text body.",
            required: true,
            templated: true,
        },
        ActionField {
            name: "html_body",
            description: "An HTML alternative to the body.",
            required: false,
            templated: true,
        },
    ],
};

/// Checks a field given without template syntax when the zap is saved.
pub(crate) fn validate_literal(field: &str, text: &str) -> Result<(), String> {
    match field {
        "to" | "cc" | "reply_to" => parse_mailboxes(text).map(drop),
        _ => Ok(()),
    }
}

fn parse_mailboxes(text: &str) -> Result<Mailboxes, String> {
    let mailboxes: Mailboxes = text
        .parse()
        .map_err(|error| format!("not a valid email address list ({error}): {text:?}"))?;
    if mailboxes.iter().next().is_none() {
        return Err("no address given".into());
    }
    Ok(mailboxes)
}

/// Where the mail goes.
#[derive(Debug, Clone)]
pub struct EmailSettings {
    /// `smtp://host:port` (plain), `smtp://host?tls=required` (STARTTLS) or
    /// `smtps://host` (implicit TLS), credentials as `user:pass@`. `None`
    /// writes each message as an `.eml` file into `mailbox_dir`.
    pub smtp_url: Option<String>,
    pub mailbox_dir: PathBuf,
    /// The sender of every message.
    pub from: String,
    /// Bound on one SMTP conversation.
    pub timeout: Duration,
    /// Most recipients (`to` and `cc` together) one message may have: a
    /// payload must not turn one step into a mass mailing.
    pub max_recipients: usize,
}

/// The default of [`EmailSettings::max_recipients`].
pub const DEFAULT_MAX_RECIPIENTS: usize = 50;

#[derive(Clone)]
enum Transport {
    /// A plain server without login, over our own pooled connections.
    PlainSmtp(Arc<PlainSmtp>),
    /// TLS or login: lettre's transport.
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
    Mailbox(AsyncFileTransport<Tokio1Executor>),
}

/// Sends the email action's messages.
#[derive(Clone)]
pub struct Mailer {
    transport: Transport,
    from: Mailbox,
    max_recipients: usize,
}

impl Mailer {
    pub fn new(settings: &EmailSettings) -> Result<Self, String> {
        let from: Mailbox = settings
            .from
            .parse()
            .map_err(|error| format!("invalid sender address {:?}: {error}", settings.from))?;
        let transport = match &settings.smtp_url {
            Some(url) if let Some(plain) = PlainSmtp::for_url(url, settings.timeout) => {
                Transport::PlainSmtp(Arc::new(plain))
            }
            Some(url) => {
                let transport: AsyncSmtpTransport<Tokio1Executor> =
                    AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
                        .map_err(|error| format!("invalid SMTP URL: {error}"))?
                        .timeout(Some(settings.timeout))
                        .build();
                Transport::Smtp(transport)
            }
            None => {
                std::fs::create_dir_all(&settings.mailbox_dir).map_err(|error| {
                    format!(
                        "cannot create mailbox {}: {error}",
                        settings.mailbox_dir.display()
                    )
                })?;
                Transport::Mailbox(AsyncFileTransport::new(&settings.mailbox_dir))
            }
        };
        Ok(Self {
            transport,
            from,
            max_recipients: settings.max_recipients,
        })
    }

    /// The message id of a step's email: the same on every attempt, so a
    /// receiving system can drop a duplicate.
    pub fn message_id(step: StepRef) -> String {
        format!("<{}.{}@zapflow>", step.run_id, step.stage)
    }

    pub(crate) async fn send(
        &self,
        config: &Map<String, Value>,
        context: &Value,
        step: StepRef,
    ) -> Result<Value, ActionError> {
        let field = |name| render_field(config, name, context);
        let permanent =
            |name: &str, error: String| ActionError::Permanent(format!("{name}: {error}"));

        let to_text = field("to")?.unwrap_or_default();
        let to = parse_mailboxes(&to_text).map_err(|error| permanent("to", error))?;
        let cc = match field("cc")? {
            Some(cc) => Some(parse_mailboxes(&cc).map_err(|error| permanent("cc", error))?),
            None => None,
        };
        let recipients = to.iter().count() + cc.as_ref().map_or(0, |cc| cc.iter().count());
        if recipients > self.max_recipients {
            return Err(permanent(
                "to, cc",
                format!(
                    "{recipients} recipients; at most {} per email",
                    self.max_recipients
                ),
            ));
        }
        // A subject is one header line: never let a payload add a header.
        let subject = field("subject")?
            .unwrap_or_default()
            .replace(['\r', '\n'], " ");
        let body = field("body")?.unwrap_or_default();
        let message_id = Self::message_id(step);

        let mut builder = Message::builder()
            .from(self.from.clone())
            .subject(subject.clone())
            .message_id(Some(message_id.clone()));
        for mailbox in to.iter() {
            builder = builder.to(mailbox.clone());
        }
        for mailbox in cc.iter().flat_map(Mailboxes::iter) {
            builder = builder.cc(mailbox.clone());
        }
        if let Some(reply_to) = field("reply_to")? {
            let mailbox: Mailbox = reply_to
                .parse()
                .map_err(|error| permanent("reply_to", format!("{error}: {reply_to:?}")))?;
            builder = builder.reply_to(mailbox);
        }
        let message = match field("html_body")? {
            Some(html) => builder.multipart(MultiPart::alternative_plain_html(body, html)),
            None => builder.singlepart(
                SinglePart::builder()
                    .header(ContentType::TEXT_PLAIN)
                    .body(body),
            ),
        }
        .map_err(|error| ActionError::Permanent(format!("cannot build the message: {error}")))?;

        match &self.transport {
            Transport::PlainSmtp(pool) => {
                pool.send(message.envelope(), &message.formatted()).await?;
            }
            Transport::Smtp(transport) => {
                transport.send(message).await.map_err(classify_smtp_error)?;
            }
            Transport::Mailbox(transport) => {
                transport
                    .send(message)
                    .await
                    .map_err(|error| ActionError::Transient(format!("mailbox: {error}")))?;
            }
        }
        let recipients: Vec<String> = to.iter().map(ToString::to_string).collect();
        Ok(json!({ "message_id": message_id, "to": recipients, "subject": subject }))
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
