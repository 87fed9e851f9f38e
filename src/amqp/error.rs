//! Why talking to the broker failed, and which failures are the configuration's: one type
//! that `connect` (nodes, connections, channels) and `topology` (declarations) both return,
//! so neither needs the other's errors.

use std::time::Duration;

use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};

/// Why a connection to the broker could not be set up.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnectError {
    #[error("failed to connect to {url}: {cause}")]
    Connect { url: String, cause: lapin::Error },
    #[error(
        "the broker at {url} refused the login ({cause}): check the user and password in \
         amqp.url or amqp.urls, that the user exists (rabbitmqctl list_users), and that it may \
         connect from this host (the guest user only from localhost)"
    )]
    LoginRefused { url: String, cause: lapin::Error },
    #[error(
        "the broker at {url} refused vhost {vhost:?} ({cause}): create it (rabbitmqctl \
         add_vhost {vhost}) and let the user in (rabbitmqctl set_permissions -p {vhost} USER \
         ...), or fix the vhost in amqp.url or amqp.urls (the default vhost / is written %2f)"
    )]
    VhostRefused {
        url: String,
        vhost: String,
        cause: lapin::Error,
    },
    #[error("timed out after {timeout:?} connecting to {url}")]
    Timeout { url: String, timeout: Duration },
    #[error("failed to declare {what}: {cause}")]
    Topology { what: String, cause: lapin::Error },
    #[error(
        "exchange {exchange} does not exist on {url}: with amqp.declare = false the broker's \
         definitions must create it (see deploy/rabbitmq/definitions.json), or set \
         amqp.declare = true"
    )]
    ExchangeMissing { url: String, exchange: String },
    #[error("failed to open a publishing channel: {0}")]
    Channel(lapin::Error),
    #[error("shutdown requested while connecting to the broker")]
    Cancelled,
}

impl ConnectError {
    /// A refusal for what the configuration says, not for a passing fault: a wrong login or
    /// vhost, a topology the broker will not take (an object that exists with other
    /// arguments: PRECONDITION_FAILED; no permission: ACCESS_REFUSED), or a missing exchange
    /// the relay may not declare. Retrying cannot fix it, so startup stops with the message.
    pub fn is_fatal(&self) -> bool {
        match self {
            ConnectError::LoginRefused { .. }
            | ConnectError::VhostRefused { .. }
            | ConnectError::ExchangeMissing { .. } => true,
            ConnectError::Topology { cause, .. } => match protocol_error(cause) {
                Some(AMQPErrorKind::Soft(
                    AMQPSoftError::PRECONDITIONFAILED | AMQPSoftError::ACCESSREFUSED,
                )) => true,
                // A queue type whose feature flag is off (streams on a broker upgraded to 3.9
                // or later without enabling its new feature flags): the broker answers so
                // every time.
                Some(AMQPErrorKind::Hard(AMQPHardError::INTERNALERROR)) => {
                    cause.to_string().contains("feature flag")
                }
                _ => false,
            },
            _ => false,
        }
    }
}

/// The AMQP error code of a broker's refusal, if `err` is one.
pub(crate) fn protocol_error(err: &lapin::Error) -> Option<&AMQPErrorKind> {
    match err.kind() {
        lapin::ErrorKind::ProtocolError(err) => Some(err.kind()),
        _ => None,
    }
}
