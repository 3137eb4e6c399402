//! Identifiers that cross service boundaries, parsed once at the edge.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Why a textual id was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    #[error("{what} must not be empty")]
    Empty { what: &'static str },
    #[error("{what} is longer than {max} characters")]
    TooLong { what: &'static str, max: usize },
    #[error("{what} may only contain a-z, A-Z, 0-9, '-' and '_' (got {value:?})")]
    BadCharacter { what: &'static str, value: String },
    #[error("not a valid job id: {0}")]
    NotUuid(String),
}

/// A job's id: a UUID v7, so ids sort by creation time.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(transparent)]
#[schema(value_type = String, format = Uuid)]
pub struct JobId(Uuid);

impl JobId {
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl schemars::JsonSchema for JobId {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "JobId".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "string", "format": "uuid", "description": "UUID v7: sorts by creation time"})
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.as_hyphenated().fmt(f)
    }
}

impl fmt::Debug for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JobId({self})")
    }
}

impl FromStr for JobId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s)
            .map(Self)
            .map_err(|_| IdError::NotUuid(s.chars().take(64).collect()))
    }
}

/// Checks a name that becomes one NATS subject token, one KV key segment and
/// one object-store path segment: it must not contain `.`, `*`, `>`, `/` or
/// whitespace, so a restricted alphabet is the simplest safe rule.
fn validate_token(what: &'static str, value: &str, max: usize) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty { what });
    }
    if value.len() > max {
        return Err(IdError::TooLong { what, max });
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(IdError::BadCharacter {
            what,
            value: value.chars().take(max).collect(),
        });
    }
    Ok(())
}

macro_rules! token_id {
    ($(#[$doc:meta])* $name:ident, $what:literal, $max:literal) => {
        $(#[$doc])*
        #[derive(
            Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
        )]
        #[serde(try_from = "String", into = "String")]
        #[schema(value_type = String, pattern = "^[A-Za-z0-9_-]+$")]
        pub struct $name(String);

        impl $name {
            pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                validate_token($what, &value, $max)?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(value: String) -> Result<Self, Self::Error> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl schemars::JsonSchema for $name {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($name).into()
            }
            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!({
                    "type": "string",
                    "pattern": concat!("^[A-Za-z0-9_-]{1,", $max, "}$")
                })
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({:?})"), self.0)
            }
        }
    };
}

token_id!(
    /// The tenant that owns a job; every job, event and object is scoped by it.
    TenantId,
    "tenant id",
    64
);
token_id!(
    /// A pool of runners that share dispatch consumers (for example one GPU model).
    PoolName,
    "pool name",
    64
);
token_id!(
    /// A runner's stable name: its registration key and its ComfyUI `client_id`.
    RunnerId,
    "runner id",
    64
);

impl PoolName {
    pub fn default_pool() -> Self {
        Self("default".to_owned())
    }
}

impl Default for PoolName {
    fn default() -> Self {
        Self::default_pool()
    }
}

impl RunnerId {
    /// A fresh random id, for runners not given a name.
    pub fn random() -> Self {
        Self(Uuid::new_v4().simple().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_refuse_subject_syntax() {
        for bad in ["", "a.b", "a*", ">", "a b", "a/b", "ü"] {
            assert!(TenantId::new(bad).is_err(), "{bad:?} accepted");
        }
        assert!(TenantId::new("acme-prod_1").is_ok());
        assert!(TenantId::new("x".repeat(65)).is_err());
    }

    #[test]
    fn job_ids_round_trip_and_sort_by_time() {
        let first = JobId::new();
        let second = JobId::new();
        assert!(first < second);
        let parsed: JobId = first.to_string().parse().expect("own id parses");
        assert_eq!(parsed, first);
        assert!("nope".parse::<JobId>().is_err());
    }

    #[test]
    fn serde_validates() {
        assert!(serde_json::from_str::<TenantId>("\"ok\"").is_ok());
        assert!(serde_json::from_str::<TenantId>("\"no.pe\"").is_err());
    }
}
