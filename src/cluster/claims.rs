//! Owned keys with expiry: the failure-episode claim and the prober lease.
//!
//! Both are "exactly one holder, and a dead holder's claim runs out": a key set only if absent
//! (`SET NX PX`, in a script that also reports the current holder), extended and deleted only by
//! its holder (compare-and-`PEXPIRE`, compare-and-`DEL`), so a holder whose claim already expired
//! and was taken over can never extend or delete its successor's.
//!
//! * **Episode** (SPEC §5.4 across the cluster): however many instances see an endpoint fail at
//!   once, one [`ClusterLink::claim_episode`] wins; the winner opens the failure-queue entry and
//!   publishes the ejection carrying the episode token, the others join that episode. The token is
//!   unique per claim (`holder:n`), so the entry can be keyed by it in every instance's database.
//!   Whoever sees the endpoint recover closes the episode by token; the TTL only bounds a claim
//!   whose closer died, so keep it above the longest probe backoff and extend it while probing.
//! * **Prober lease**: recovery probes for an endpoint run where [`ClusterLink::acquire_prober_lease`]
//!   won; the holder renews it before each probe and releases it when the endpoint is back (or it
//!   stops probing); if the holder dies, the lease expires and another instance's next attempt
//!   takes it over. The lease token is this process's holder id, so acquiring again is re-entrant.

use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::Value;

use crate::cluster::keys::EndpointId;
use crate::cluster::link::{ClusterError, ClusterLink};
use crate::cluster::scripts;

/// The result of a claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// This instance holds it now; `token` proves it to [`ClusterLink::extend_episode`] and
    /// friends.
    Won {
        /// The value stored in the key.
        token: String,
    },
    /// Someone else holds it.
    Held {
        /// The holder's token (an episode token, or a holder id for a lease).
        by: String,
        /// Time until it expires unless renewed.
        expires_in: Duration,
    },
}

impl Claim {
    /// Whether this instance won.
    pub fn won(&self) -> bool {
        matches!(self, Self::Won { .. })
    }

    /// The token of whoever holds it (this instance or another).
    pub fn token(&self) -> &str {
        match self {
            Self::Won { token } => token,
            Self::Held { by, .. } => by,
        }
    }
}

fn ms(d: Duration) -> u64 {
    (d.as_millis() as u64).max(1)
}

impl ClusterLink {
    async fn claim(
        &self,
        key: String,
        token: String,
        ttl: Duration,
    ) -> Result<Claim, ClusterError> {
        let reply: Vec<Value> = self
            .call(|mut c| async move {
                scripts::CLAIM
                    .key(key)
                    .arg(token)
                    .arg(ms(ttl))
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        let bad = || ClusterError::Decode("claim reply".to_owned());
        let [won, holder, pttl] = reply.as_slice() else {
            return Err(bad());
        };
        let won: i64 = redis::from_redis_value_ref(won).map_err(|_| bad())?;
        let holder: String = redis::from_redis_value_ref(holder).map_err(|_| bad())?;
        let pttl: i64 = redis::from_redis_value_ref(pttl).map_err(|_| bad())?;
        Ok(if won == 1 {
            Claim::Won { token: holder }
        } else {
            Claim::Held {
                by: holder,
                // -1 (no expiry) cannot happen for keys set here; treat it as "unknown", zero.
                expires_in: Duration::from_millis(pttl.max(0) as u64),
            }
        })
    }

    async fn renew(&self, key: String, token: String, ttl: Duration) -> Result<bool, ClusterError> {
        let n: i64 = self
            .call(|mut c| async move {
                scripts::RENEW_IF_HOLDER
                    .key(key)
                    .arg(token)
                    .arg(ms(ttl))
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(n == 1)
    }

    async fn release(&self, key: String, token: String) -> Result<bool, ClusterError> {
        let n: i64 = self
            .call(|mut c| async move {
                scripts::RELEASE_IF_HOLDER
                    .key(key)
                    .arg(token)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(n == 1)
    }

    async fn holder_of(&self, key: String) -> Result<Option<String>, ClusterError> {
        self.call(|mut c| async move { redis::cmd("GET").arg(key).query_async(&mut c).await })
            .await
    }

    /// Tries to open the failure episode for `endpoint`: exactly one caller cluster-wide wins
    /// until the episode is closed or `ttl` runs out. A new unique token each call.
    pub async fn claim_episode(
        &self,
        endpoint: &EndpointId,
        ttl: Duration,
    ) -> Result<Claim, ClusterError> {
        let n = self.inner.token_seq.fetch_add(1, Ordering::Relaxed) + 1;
        let token = format!("{}:{n}", self.inner.holder);
        self.claim(self.inner.keys.episode(endpoint), token, ttl)
            .await
    }

    /// Extends the open episode while `token` is still its token.
    pub async fn extend_episode(
        &self,
        endpoint: &EndpointId,
        token: &str,
        ttl: Duration,
    ) -> Result<bool, ClusterError> {
        self.renew(self.inner.keys.episode(endpoint), token.to_owned(), ttl)
            .await
    }

    /// Closes the episode `token` (the endpoint recovered); a later outage is a new episode.
    /// False when that episode is no longer the open one.
    pub async fn close_episode(
        &self,
        endpoint: &EndpointId,
        token: &str,
    ) -> Result<bool, ClusterError> {
        self.release(self.inner.keys.episode(endpoint), token.to_owned())
            .await
    }

    /// The token of the open episode, if any.
    pub async fn open_episode(
        &self,
        endpoint: &EndpointId,
    ) -> Result<Option<String>, ClusterError> {
        self.holder_of(self.inner.keys.episode(endpoint)).await
    }

    /// Tries to become (or stay) the prober of `endpoint` for `ttl`.
    pub async fn acquire_prober_lease(
        &self,
        endpoint: &EndpointId,
        ttl: Duration,
    ) -> Result<Claim, ClusterError> {
        self.claim(
            self.inner.keys.prober_lease(endpoint),
            self.inner.holder.clone(),
            ttl,
        )
        .await
    }

    /// Extends the lease only if this process still holds it; false means it was lost (expired
    /// and possibly taken over): stop probing.
    pub async fn renew_prober_lease(
        &self,
        endpoint: &EndpointId,
        ttl: Duration,
    ) -> Result<bool, ClusterError> {
        self.renew(
            self.inner.keys.prober_lease(endpoint),
            self.inner.holder.clone(),
            ttl,
        )
        .await
    }

    /// Gives the lease up, only if this process holds it.
    pub async fn release_prober_lease(&self, endpoint: &EndpointId) -> Result<bool, ClusterError> {
        self.release(
            self.inner.keys.prober_lease(endpoint),
            self.inner.holder.clone(),
        )
        .await
    }

    /// The current prober's holder id, if any.
    pub async fn prober(&self, endpoint: &EndpointId) -> Result<Option<String>, ClusterError> {
        self.holder_of(self.inner.keys.prober_lease(endpoint)).await
    }
}
