//! The action types a zap can run, and the catalog that describes them.
//!
//! Each action type is one module whose typed configuration implements
//! `Action`: its fields, how a configuration is read and checked, and how
//! it renders and runs. The registry lists the types; the catalog, the
//! validation of zaps and the [`Executor`] derive from that list. Each
//! action renders its templated fields against the run's context and
//! performs one effect. Errors say whether trying again could help.

mod action;
mod email;
mod field;
mod flow;
mod http;
mod registry;
mod smtp_pool;
pub mod ssrf;

pub use action::{ActionError, Completed, Next, StepRef};
pub use email::{DEFAULT_MAX_RECIPIENTS, EmailSettings, Mailer};
pub use field::{ActionField, ActionType, FieldError};
pub use flow::MAX_DELAY;
pub use http::{HttpClient, HttpSettings};
pub use registry::{Executor, catalog, validate_actions};
pub use ssrf::IpNet;
