//! API keys → tenants. Keys are compared by their SHA-256, so neither the
//! configuration nor memory needs the plain key.

use std::collections::HashMap;

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use comfyq_shared::ids::TenantId;
use sha2::{Digest, Sha256};

use crate::config::IngressConfig;
use crate::problem::Problem;
use crate::state::AppState;

#[derive(Clone, Debug, Default)]
pub struct Authenticator {
    tenants_by_hash: HashMap<[u8; 32], TenantId>,
    open_tenant: Option<TenantId>,
}

impl Authenticator {
    pub fn from_config(config: &IngressConfig) -> Self {
        let mut tenants_by_hash = HashMap::new();
        for key in &config.api_keys {
            // Validated at load: tenant ids parse, hashes are 64 hex digits.
            let Ok(tenant) = TenantId::new(key.tenant.clone()) else {
                continue;
            };
            let hash = match (&key.key_sha256, &key.key) {
                (Some(hex_hash), _) => {
                    let mut hash = [0u8; 32];
                    if hex::decode_to_slice(hex_hash, &mut hash).is_err() {
                        continue;
                    }
                    hash
                }
                (None, Some(plain)) => Sha256::digest(plain.expose().as_bytes()).into(),
                (None, None) => continue,
            };
            tenants_by_hash.insert(hash, tenant);
        }
        Self {
            tenants_by_hash,
            open_tenant: config
                .open_tenant
                .clone()
                .and_then(|t| TenantId::new(t).ok()),
        }
    }

    pub fn tenant_for(&self, authorization: Option<&str>) -> Option<TenantId> {
        match authorization {
            Some(value) => {
                let key = value.strip_prefix("Bearer ")?.trim();
                let hash: [u8; 32] = Sha256::digest(key.as_bytes()).into();
                self.tenants_by_hash.get(&hash).cloned()
            }
            None => self.open_tenant.clone(),
        }
    }
}

/// The tenant a request acts for.
#[derive(Clone, Debug)]
pub struct Tenant(pub TenantId);

impl FromRequestParts<AppState> for Tenant {
    type Rejection = Problem;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        Ok(Tenant(admit(state, header)?))
    }
}

/// The tenant an `Authorization` value acts for, within its rate limit.
pub(crate) fn admit(state: &AppState, authorization: Option<&str>) -> Result<TenantId, Problem> {
    let tenant = state
        .auth
        .tenant_for(authorization)
        .ok_or_else(Problem::unauthorized)?;
    state.limiter.check(&tenant)?;
    Ok(tenant)
}
