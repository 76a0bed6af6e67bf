//! How the CLI fails: a user error exits 1, a connection failure exits 2, both
//! with one clear line.

use std::fmt;

/// A failed command.
#[derive(Debug)]
pub enum CliError {
    /// The command or its input is wrong.
    User(String),
    /// A server could not be reached or failed.
    Connection(String),
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::User(m) | CliError::Connection(m) => f.write_str(m),
        }
    }
}

impl CliError {
    /// The process exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::User(_) => 1,
            CliError::Connection(_) => 2,
        }
    }
}

impl From<tonic::Status> for CliError {
    fn from(status: tonic::Status) -> CliError {
        use tonic::Code;
        // Some failures (an older server without the call) carry no message.
        let message = if status.message().is_empty() {
            format!("the server answered {:?} with no message", status.code())
        } else {
            status.message().to_owned()
        };
        match status.code() {
            Code::Unavailable | Code::DeadlineExceeded | Code::Internal | Code::Unknown => {
                CliError::Connection(message)
            }
            _ => CliError::User(message),
        }
    }
}

impl From<tonic::transport::Error> for CliError {
    fn from(e: tonic::transport::Error) -> CliError {
        CliError::Connection(format!("cannot connect: {e}"))
    }
}
