//! The `email` action: a templated message sent over SMTP with lettre, or
//! written to a local mailbox directory when no SMTP server is configured.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use lettre::message::header::ContentType;
use lettre::message::{Mailbox, Mailboxes, MultiPart, SinglePart};
use lettre::{AsyncFileTransport, AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde_json::{Value, json};
use tracing::Instrument;
use zapflow_telemetry::trace;

use crate::action::{Action, ActionError, Completed, StepRef};
use crate::field::{ActionField, ActionType, FieldError, Fields, Template, any_text, template};
use crate::smtp_pool::{PlainSmtp, classify_smtp_error};

const TO: ActionField = ActionField {
    name: "to",
    description: "Recipients, comma-separated (`Ada <ada@example.com>, bob@example.com`).",
    required: true,
    templated: true,
};
const CC: ActionField = ActionField {
    name: "cc",
    description: "Copy recipients, comma-separated.",
    required: false,
    templated: true,
};
const REPLY_TO: ActionField = ActionField {
    name: "reply_to",
    description: "The Reply-To address.",
    required: false,
    templated: true,
};
const SUBJECT: ActionField = ActionField {
    name: "subject",
    description: "The subject line; line breaks become spaces.",
    required: true,
    templated: true,
};
const BODY: ActionField = ActionField {
    name: "body",
    description: "The plain-text body.",
    required: true,
    templated: true,
};
const HTML_BODY: ActionField = ActionField {
    name: "html_body",
    description: "An HTML alternative to the body.",
    required: false,
    templated: true,
};

/// An email action's configuration.
pub(crate) struct Email {
    to: Template,
    cc: Option<Template>,
    reply_to: Option<Template>,
    subject: Template,
    body: Template,
    html_body: Option<Template>,
}

impl Action for Email {
    const TYPE: ActionType = ActionType {
        name: "email",
        description: "Sends an email. Every field is a minijinja template over trigger, headers, \
                      query, steps and run.",
        fields: &[TO, CC, REPLY_TO, SUBJECT, BODY, HTML_BODY],
        flow: false,
    };

    type Runner = Mailer;

    fn parse(fields: &Fields<'_>) -> Result<Self, FieldError> {
        Ok(Self {
            to: fields.required(&TO, template(addresses))?,
            cc: fields.optional(&CC, template(addresses))?,
            reply_to: fields.optional(&REPLY_TO, template(addresses))?,
            subject: fields.required(&SUBJECT, template(any_text))?,
            body: fields.required(&BODY, template(any_text))?,
            html_body: fields.optional(&HTML_BODY, template(any_text))?,
        })
    }

    async fn execute(
        self,
        mailer: &Mailer,
        context: &Value,
        step: StepRef,
    ) -> Result<Completed, ActionError> {
        let (message, rendered) = self.compose(mailer, context, step)?;
        mailer.deliver(message).await?;
        let output = json!({
            "message_id": rendered.message_id,
            "to": rendered.to,
            "subject": rendered.subject,
        });
        Ok(Completed::with(output))
    }

    async fn preview(
        self,
        mailer: &Mailer,
        context: &Value,
        step: StepRef,
    ) -> Result<Completed, ActionError> {
        let (_, rendered) = self.compose(mailer, context, step)?;
        let output = serde_json::to_value(rendered).expect("rendered fields are JSON");
        Ok(Completed::with(output))
    }
}

/// An email's fields as rendered, for a preview and the step's output.
#[derive(Debug, serde::Serialize)]
struct Rendered {
    to: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    cc: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reply_to: Option<String>,
    subject: String,
    body: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    html_body: Option<String>,
    message_id: String,
}

impl Email {
    /// The message this action sends for `step` in `context`, checked as
    /// the SMTP server would not: valid addresses, not too many of them.
    fn compose(
        &self,
        mailer: &Mailer,
        context: &Value,
        step: StepRef,
    ) -> Result<(Message, Rendered), ActionError> {
        let to = self.to.render_as(context, parse_mailboxes)?;
        let cc = match &self.cc {
            Some(cc) => Some(cc.render_as(context, parse_mailboxes)?),
            None => None,
        };
        let recipients = to.iter().count() + cc.as_ref().map_or(0, |cc| cc.iter().count());
        if recipients > mailer.max_recipients {
            return Err(FieldError::new(
                format!("{}, {}", TO.name, CC.name),
                format!(
                    "{recipients} recipients; at most {} per email",
                    mailer.max_recipients
                ),
            )
            .into());
        }
        // A subject is one header line: never let a payload add a header.
        let subject = self.subject.render(context)?.replace(['\r', '\n'], " ");
        let body = self.body.render(context)?;
        let message_id = Mailer::message_id(step);

        let mut builder = Message::builder()
            .from(mailer.from.clone())
            .subject(subject.clone())
            .message_id(Some(message_id.clone()));
        for mailbox in to.iter() {
            builder = builder.to(mailbox.clone());
        }
        for mailbox in cc.iter().flat_map(Mailboxes::iter) {
            builder = builder.cc(mailbox.clone());
        }
        let mut reply_to_text = None;
        if let Some(reply_to) = &self.reply_to {
            let mailbox = reply_to.render_as(context, |text| {
                text.parse::<Mailbox>()
                    .map_err(|error| format!("{error}: {text:?}"))
            })?;
            reply_to_text = Some(mailbox.to_string());
            builder = builder.reply_to(mailbox);
        }
        let html_body = self
            .html_body
            .as_ref()
            .map(|html| html.render(context))
            .transpose()?;
        let message = match &html_body {
            Some(html) => builder.multipart(MultiPart::alternative_plain_html(
                body.clone(),
                html.clone(),
            )),
            None => builder.singlepart(
                SinglePart::builder()
                    .header(ContentType::TEXT_PLAIN)
                    .body(body.clone()),
            ),
        }
        .map_err(|error| ActionError::Permanent(format!("cannot build the message: {error}")))?;
        let rendered = Rendered {
            to: to.iter().map(ToString::to_string).collect(),
            cc: cc
                .iter()
                .flat_map(Mailboxes::iter)
                .map(ToString::to_string)
                .collect(),
            reply_to: reply_to_text,
            subject,
            body,
            html_body,
            message_id,
        };
        Ok((message, rendered))
    }
}

/// The check of an address list written without template syntax.
fn addresses(text: &str) -> Result<(), String> {
    parse_mailboxes(text).map(drop)
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

    async fn deliver(&self, message: Message) -> Result<(), ActionError> {
        let span = trace::span(|| tracing::info_span!("smtp", otel.kind = "client"));
        self.send(message).instrument(span).await
    }

    async fn send(&self, message: Message) -> Result<(), ActionError> {
        match &self.transport {
            Transport::PlainSmtp(pool) => pool.send(message.envelope(), &message.formatted()).await,
            Transport::Smtp(transport) => transport
                .send(message)
                .await
                .map(drop)
                .map_err(classify_smtp_error),
            Transport::Mailbox(transport) => transport
                .send(message)
                .await
                .map(drop)
                .map_err(|error| ActionError::Transient(format!("mailbox: {error}"))),
        }
    }
}
