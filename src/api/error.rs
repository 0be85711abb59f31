//! The one API error type: every failure becomes the contract's envelope
//! `{"error": {"code", "message"}}` with the fitting status. Internal
//! details are logged, never sent.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::domain::ParseError;
use crate::store::StoreError;

/// The body of every HTTP error: `{"error": {"code", "message"}}`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// A stable snake_case code: `invalid_request` (or a specific 400 code
    /// such as `invalid_username`, `body_too_long`), `unauthorized`,
    /// `invalid_credentials`, `forbidden`, `not_found`, `method_not_allowed`,
    /// `username_taken`, `email_taken`, `conflict`, `request_timeout`,
    /// `payload_too_large`, `rate_limited`, `unavailable`, `internal`.
    #[schema(example = "not_found")]
    pub code: &'static str,
    /// Human readable; never a stack trace.
    pub message: String,
}

/// An API failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// 400 with a specific code (`invalid_request`, `invalid_username`, ...).
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    /// 401 `unauthorized` (or a specific code such as `invalid_credentials`).
    #[error("{1}")]
    Unauthorized(&'static str, String),
    /// 403 `forbidden`.
    #[error("{0}")]
    Forbidden(String),
    /// 404 `not_found`.
    #[error("{0}")]
    NotFound(String),
    /// 405 `method_not_allowed`.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 409 with `username_taken`, `email_taken`, `conflict`.
    #[error("{1}")]
    Conflict(&'static str, String),
    /// 408 `request_timeout`: the request body stalled; the connection closes.
    #[error("the request body did not arrive in time")]
    RequestTimeout,
    /// 413 `payload_too_large`.
    #[error("request body is too large")]
    PayloadTooLarge,
    /// 429 `rate_limited` with `Retry-After` seconds.
    #[error("too many attempts; retry in {0} s")]
    RateLimited(u64),
    /// 503 `unavailable`: a dependency is down; retry.
    #[error("{0}")]
    Unavailable(String),
    /// 500: a bug. The message is logged, the client sees a generic text.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// 400 `invalid_request`.
    pub fn bad(message: impl Into<String>) -> Self {
        Error::BadRequest {
            code: "invalid_request",
            message: message.into(),
        }
    }

    /// 403 with the standard text.
    pub fn not_member() -> Self {
        Error::Forbidden("you are not a member of this room".into())
    }

    /// The contract's code (what a socket `error` frame carries).
    pub fn code(&self) -> &'static str {
        self.parts().1
    }

    fn parts(&self) -> (StatusCode, &'static str) {
        match self {
            Error::BadRequest { code, .. } => (StatusCode::BAD_REQUEST, code),
            Error::Unauthorized(code, _) => (StatusCode::UNAUTHORIZED, code),
            Error::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Error::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Error::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            Error::Conflict(code, _) => (StatusCode::CONFLICT, code),
            Error::RequestTimeout => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            Error::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            Error::RateLimited(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            Error::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Error::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (status, code) = self.parts();
        let message = match &self {
            Error::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                "internal error".to_owned()
            }
            Error::Unavailable(detail) => {
                tracing::warn!(%detail, "dependency unavailable");
                self.to_string()
            }
            other => other.to_string(),
        };
        let mut resp = (
            status,
            axum::Json(ErrorBody {
                error: ErrorDetail { code, message },
            }),
        )
            .into_response();
        match self {
            Error::RateLimited(secs) => {
                if let Ok(v) = HeaderValue::from_str(&secs.max(1).to_string()) {
                    resp.headers_mut().insert(header::RETRY_AFTER, v);
                }
            }
            // The rest of a stalled body would be read as the next request.
            Error::RequestTimeout => {
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        resp
    }
}

impl From<ParseError> for Error {
    fn from(e: ParseError) -> Self {
        Error::BadRequest {
            code: e.code,
            message: e.message,
        }
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => Error::NotFound("not found".into()),
            StoreError::Conflict(code) => Error::Conflict(code, code.replace('_', " ")),
            StoreError::Forbidden => Error::Forbidden("forbidden".into()),
            StoreError::Unavailable(m) => Error::Unavailable(format!("store unavailable: {m}")),
            StoreError::Internal(m) => Error::Internal(m),
        }
    }
}

/// Whether a body error (anywhere in its chain) is the body read timeout.
pub fn is_body_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if e.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        cur = e.source();
    }
    false
}

impl From<JsonRejection> for Error {
    fn from(r: JsonRejection) -> Self {
        if is_body_timeout(&r) {
            return Error::RequestTimeout;
        }
        match r {
            JsonRejection::BytesRejection(ref b) if b.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Error::PayloadTooLarge
            }
            JsonRejection::MissingJsonContentType(_) => {
                Error::bad("expected Content-Type: application/json")
            }
            JsonRejection::JsonSyntaxError(_) => Error::bad("body is not valid JSON"),
            JsonRejection::JsonDataError(e) => {
                Error::bad(format!("invalid body: {}", e.body_text()))
            }
            other => {
                if other.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    Error::PayloadTooLarge
                } else {
                    Error::bad(other.body_text())
                }
            }
        }
    }
}

impl From<PathRejection> for Error {
    fn from(r: PathRejection) -> Self {
        Error::bad(format!("invalid path: {}", r.body_text()))
    }
}

impl From<QueryRejection> for Error {
    fn from(r: QueryRejection) -> Self {
        Error::bad(format!("invalid query: {}", r.body_text()))
    }
}

impl From<crate::auth::AuthError> for Error {
    fn from(e: crate::auth::AuthError) -> Self {
        match e {
            crate::auth::AuthError::InvalidToken => {
                Error::Unauthorized("unauthorized", "invalid or expired access token".into())
            }
            crate::auth::AuthError::Busy => Error::Unavailable(e.to_string()),
            crate::auth::AuthError::Hash(m) => Error::Internal(m),
        }
    }
}

impl From<crate::actors::ActorError> for Error {
    fn from(e: crate::actors::ActorError) -> Self {
        match e {
            crate::actors::ActorError::NotFound => Error::NotFound("room not found".into()),
            crate::actors::ActorError::Unavailable(m) => Error::Unavailable(m),
        }
    }
}

/// Result of a handler.
pub type ApiResult<T> = Result<T, Error>;
