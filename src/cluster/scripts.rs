//! The Lua scripts. Each runs atomically inside Redis, which is what makes a check-then-act on
//! shared state safe across instances (a `GET` followed by a `DEL` from the client is not). They
//! are invoked by hash; `redis::Script` loads them again after a server restart (`NOSCRIPT`).

use std::sync::LazyLock;

use redis::Script;

/// Claim an owned key: if free, set it to ARGV[1] with PX ARGV[2] and win; if it already holds
/// ARGV[1], extend it and win (re-entrant for the same holder); otherwise report the holder and its
/// remaining time. Returns `{won (0|1), holder, pttl}`.
pub(super) static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local cur = redis.call('GET', KEYS[1])
if cur == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {1, ARGV[1], tonumber(ARGV[2])}
end
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, cur, tonumber(ARGV[2])}
end
return {0, cur, redis.call('PTTL', KEYS[1])}
",
    )
});

/// Extend an owned key only while ARGV[1] still holds it (PX ARGV[2]). Returns 1 or 0.
pub(super) static RENEW_IF_HOLDER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
",
    )
});

/// Delete an owned key only while ARGV[1] still holds it. Returns 1 or 0.
pub(super) static RELEASE_IF_HOLDER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
",
    )
});

/// Store and publish one piece of health news. KEYS: view hash, deadline hash. ARGV: field,
/// channel, news JSON without its deadline, deadline (unix ms) or '', only-if-absent ('1'|'0').
///
/// A deadline is raised to the stored one when that is later (cooldowns only grow cluster-wide)
/// and spliced into the JSON as text, so no number ever goes through Lua's doubles; news without a
/// deadline ends the cooldown run and clears the stored deadline. Storing and publishing in one
/// script keeps the channel's order equal to the hash's. Returns the news as stored, or false when
/// only-if-absent found an entry.
pub(super) static PUBLISH_HEALTH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if ARGV[5] == '1' and redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  return false
end
local body = ARGV[3]
local d = ARGV[4]
if d ~= '' then
  local old = redis.call('HGET', KEYS[2], ARGV[1])
  if old and tonumber(old) > tonumber(d) then d = old end
  redis.call('HSET', KEYS[2], ARGV[1], d)
  body = string.sub(body, 1, -2) .. ',"cooldown_until_ms":' .. d .. '}'
else
  redis.call('HDEL', KEYS[2], ARGV[1])
end
redis.call('HSET', KEYS[1], ARGV[1], body)
redis.call('PUBLISH', ARGV[2], body)
return body
"#,
    )
});

/// Bind a session if it is unbound (first binder wins), refresh it if it already holds the same
/// endpoint. KEYS: session. ARGV: endpoint, ttl ms, channel, news JSON. Returns the binding in
/// force; publishes only a new binding.
pub(super) static BIND_SESSION: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return cur
end
if cur then return cur end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return ARGV[1]
",
    )
});

/// Move a session from ARGV[1] ('' = from whatever it holds) to ARGV[2], unless another instance
/// already moved it elsewhere (compare-and-set). KEYS: session. ARGV: from, to, ttl ms, channel,
/// news JSON. Returns the binding in force.
pub(super) static MOVE_SESSION: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[2] then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return cur
end
if cur and ARGV[1] ~= '' and cur ~= ARGV[1] then return cur end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return ARGV[2]
",
    )
});

/// Drop a session's binding only while it still holds ARGV[1]. KEYS: session. ARGV: endpoint,
/// channel, news JSON. Returns 1 or 0.
pub(super) static UNBIND_SESSION: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
",
    )
});

/// Slide the TTL of many bindings, each only while it holds its endpoint. KEYS: sessions. ARGV:
/// ttl ms, then one endpoint per key. Returns how many were refreshed.
pub(super) static REFRESH_SESSIONS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local n = 0
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[i + 1] then
    n = n + redis.call('PEXPIRE', KEYS[i], ARGV[1])
  end
end
return n
",
    )
});

/// Stamp an instance's heartbeat with Redis's clock, and note which process beats under its name.
/// KEYS: instances, instance holders. ARGV: instance, holder. Returns `{new, other}`: `new` is 1
/// when the heartbeat field was new (first beat, or the data vanished, or the instance was pruned
/// as dead); `other` is 1 when another process beat under the same name since this one last did
/// (once after a restart; at every beat while two live instances share the name).
pub(super) static HEARTBEAT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local prev = redis.call('HGET', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
local new = redis.call('HSET', KEYS[1], ARGV[1], string.format('%d', now))
local other = 0
if prev and prev ~= ARGV[2] then other = 1 end
return {new, other}
",
    )
});

/// Apply one totals batch exactly once. KEYS: cluster totals, instance totals, fence, instances.
/// ARGV: instance, holder, seq, retention ms, then field/delta pairs.
///
/// The fence remembers `holder seq` of the last batch applied per instance: a batch resent after a
/// lost reply is recognised and skipped, so nothing is counted twice; a new holder (the instance
/// restarted) starts its own row from zero while the cluster sums keep what it added before.
/// The batch is a sign of life, and refreshes the instance's heartbeat; it never creates one, so
/// that the next `HEARTBEAT` still finds the field gone after a `FLUSHALL` and the instance
/// republishes the health view. Returns 1 when applied, 0 when already applied.
pub(super) static FLUSH_TOTALS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local fence = redis.call('HGET', KEYS[3], ARGV[1])
local holder, seq = nil, 0
if fence then
  local sp = string.find(fence, ' ', 1, true)
  holder = string.sub(fence, 1, sp - 1)
  seq = tonumber(string.sub(fence, sp + 1))
end
if holder == ARGV[2] and seq >= tonumber(ARGV[3]) then return 0 end
if holder ~= ARGV[2] then redis.call('DEL', KEYS[2]) end
for i = 5, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1])
end
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2] .. ' ' .. ARGV[3])
if redis.call('HEXISTS', KEYS[4], ARGV[1]) == 1 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('HSET', KEYS[4], ARGV[1], string.format('%d', now))
end
return 1
",
    )
});

/// Drop instances not heard from for ARGV[1] ms (and their holders) and return Redis's clock and
/// the live ones. KEYS: instances, instance holders. Returns `{now, name1, heard1, ...}`.
pub(super) static LIVE_INSTANCES: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local oldest = now - tonumber(ARGV[1])
local all = redis.call('HGETALL', KEYS[1])
local out = {string.format('%d', now)}
for i = 1, #all, 2 do
  if tonumber(all[i + 1]) < oldest then
    redis.call('HDEL', KEYS[1], all[i])
    redis.call('HDEL', KEYS[2], all[i])
  else
    table.insert(out, all[i])
    table.insert(out, all[i + 1])
  end
end
return out
",
    )
});
