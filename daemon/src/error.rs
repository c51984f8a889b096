//! The one error type handlers pass around: an error kind the client can act on and
//! a message saying what exactly was wrong.

use autozyme_protocol::{ErrorKind, Response};

#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub kind: ErrorKind,
    pub message: String,
}

impl Failure {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Failure {
            kind,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadRequest, message)
    }

    pub fn bad_matrix(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadMatrix, message)
    }

    pub fn segment(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Segment, message)
    }

    pub fn into_response(self) -> Response {
        Response::Error {
            kind: self.kind,
            message: self.message,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

pub type Result<T> = std::result::Result<T, Failure>;
