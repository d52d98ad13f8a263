//! Shared session affinity: a session's binding (session key → endpoint) lives in Redis with the
//! configured TTL, and every change to it is published, so a session whose requests alternate
//! between instances stays on one endpoint.
//!
//! Redis stays off the request path: each instance keeps its local affinity map as the one it
//! reads per request, feeds it from [`ClusterEvent::Session`](super::ClusterEvent::Session), and
//! writes through from a background task. Races resolve in Redis: the first binder of a new
//! session wins ([`ClusterLink::bind_session`] returns the binding in force, which the loser
//! adopts); a move is a compare-and-set from the endpoint that left rotation
//! ([`ClusterLink::move_session`]), so two instances moving one session at once end on the same
//! endpoint; a drop deletes only the binding it expects. TTLs slide like the local map's: the
//! background task refreshes bindings used since its last pass ([`ClusterLink::refresh_sessions`]).

use std::time::Duration;

use crate::cluster::keys::EndpointId;
use crate::cluster::link::{ClusterError, ClusterLink};
use crate::cluster::news::SessionNews;
use crate::cluster::scripts;

fn ms(d: Duration) -> u64 {
    (d.as_millis() as u64).max(1)
}

fn parse_binding(s: String) -> Result<EndpointId, ClusterError> {
    EndpointId::parse_wire(&s).ok_or_else(|| ClusterError::Decode(format!("session binding {s:?}")))
}

impl ClusterLink {
    fn session_news(&self, session: &str, endpoint: Option<&EndpointId>, ttl: Duration) -> String {
        let news = SessionNews {
            session: session.to_owned(),
            endpoint: endpoint.map(EndpointId::wire),
            ttl_ms: ms(ttl),
            origin: self.inner.config.instance.clone(),
        };
        serde_json::to_string(&news).unwrap_or_default()
    }

    /// Binds `session` to `endpoint` unless it is already bound: returns the binding in force
    /// (the earlier binder's endpoint when this instance lost the race).
    pub async fn bind_session(
        &self,
        session: &str,
        endpoint: &EndpointId,
        ttl: Duration,
    ) -> Result<EndpointId, ClusterError> {
        let key = self.inner.keys.session(session);
        let channel = self.inner.keys.session_channel();
        let news = self.session_news(session, Some(endpoint), ttl);
        let wire = endpoint.wire();
        let bound: String = self
            .call(|mut c| async move {
                scripts::BIND_SESSION
                    .key(key)
                    .arg(wire)
                    .arg(ms(ttl))
                    .arg(channel)
                    .arg(news)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        parse_binding(bound)
    }

    /// Moves `session` to `to` if it is still bound to `from` (or to nothing; `from: None` moves
    /// it whatever it holds). Returns the binding in force: `to`, or where another instance
    /// already moved it.
    pub async fn move_session(
        &self,
        session: &str,
        from: Option<&EndpointId>,
        to: &EndpointId,
        ttl: Duration,
    ) -> Result<EndpointId, ClusterError> {
        let key = self.inner.keys.session(session);
        let channel = self.inner.keys.session_channel();
        let news = self.session_news(session, Some(to), ttl);
        let from = from.map(EndpointId::wire).unwrap_or_default();
        let to = to.wire();
        let bound: String = self
            .call(|mut c| async move {
                scripts::MOVE_SESSION
                    .key(key)
                    .arg(from)
                    .arg(to)
                    .arg(ms(ttl))
                    .arg(channel)
                    .arg(news)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        parse_binding(bound)
    }

    /// Drops the binding of `session` if it still holds `endpoint`. True when dropped.
    pub async fn unbind_session(
        &self,
        session: &str,
        endpoint: &EndpointId,
    ) -> Result<bool, ClusterError> {
        let key = self.inner.keys.session(session);
        let channel = self.inner.keys.session_channel();
        let news = self.session_news(session, None, Duration::ZERO);
        let wire = endpoint.wire();
        let n: i64 = self
            .call(|mut c| async move {
                scripts::UNBIND_SESSION
                    .key(key)
                    .arg(wire)
                    .arg(channel)
                    .arg(news)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(n == 1)
    }

    /// The binding of `session`, if any.
    pub async fn session_binding(&self, session: &str) -> Result<Option<EndpointId>, ClusterError> {
        let key = self.inner.keys.session(session);
        let bound: Option<String> = self
            .call(|mut c| async move { redis::cmd("GET").arg(key).query_async(&mut c).await })
            .await?;
        bound.map(parse_binding).transpose()
    }

    /// Slides the TTL of bindings used since the last pass, each only while it still holds the
    /// endpoint given (one pipeline). Returns how many were refreshed.
    pub async fn refresh_sessions(
        &self,
        used: &[(&str, &EndpointId)],
        ttl: Duration,
    ) -> Result<usize, ClusterError> {
        if used.is_empty() {
            return Ok(0);
        }
        let mut inv = scripts::REFRESH_SESSIONS.prepare_invoke();
        inv.arg(ms(ttl));
        for (session, endpoint) in used {
            inv.key(self.inner.keys.session(session))
                .arg(endpoint.wire());
        }
        let done: i64 = self
            .call(|mut c| async move { inv.invoke_async(&mut c).await })
            .await?;
        Ok(done as usize)
    }
}
