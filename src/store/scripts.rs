//! Every Lua script the store runs, each written once. A script reads and writes its keys
//! atomically; the keys of one script share a hash tag, so it runs on Redis Cluster too.
//! Clocks are Redis' own (`TIME`), so the pool's clocks need not agree.

use std::sync::LazyLock;

use redis::Script;

/// The lease/done protocol ([`super::ledger::Claim`]) when the record exists. KEYS: record.
/// ARGV: owner, lease ms. Values are `P<owner>` (a lease) or `D<payload>` (done). Returns
/// `{0, ''}` claimed (the record had gone, or the lease is ours and is extended), `{1, payload}`
/// done, `{2, ms}` leased by another for `ms` more.
pub(super) static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local v = redis.call('GET', KEYS[1])
        if not v then
            redis.call('SET', KEYS[1], 'P' .. ARGV[1], 'PX', ARGV[2])
            return {0, ''}
        end
        local kind = string.sub(v, 1, 1)
        if kind == 'D' then return {1, string.sub(v, 2)} end
        if v == 'C' then return {3, ''} end
        if v == 'P' .. ARGV[1] then
            redis.call('PEXPIRE', KEYS[1], ARGV[2])
            return {0, ''}
        end
        return {2, tostring(redis.call('PTTL', KEYS[1]))}
        ",
    )
});

/// Cancels a job whose record is free: `C` in place of a lease, for ARGV[1] ms. KEYS: the job's
/// record. Returns {0} cancelled, {1} cancelled before, {2, result} already done, {3, ms} held
/// by a worker now.
pub(super) static CANCEL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local v = redis.call('GET', KEYS[1])
        if not v then
            redis.call('SET', KEYS[1], 'C', 'PX', ARGV[1])
            return {0, ''}
        end
        if v == 'C' then return {1, ''} end
        if string.sub(v, 1, 1) == 'D' then return {2, string.sub(v, 2)} end
        return {3, tostring(redis.call('PTTL', KEYS[1]))}
        ",
    )
});

/// Extends a lease only if it is still ours. KEYS: record. ARGV: owner, lease ms. Returns 1
/// when extended.
pub(super) static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        if redis.call('GET', KEYS[1]) == 'P' .. ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
        return 0
        ",
    )
});

/// Deletes a key only if it still holds the given value: a lease or a lock given up by its
/// holder, never by someone who took it over. KEYS: key. ARGV: value. Returns 1 when deleted.
pub(super) static COMPARE_AND_DELETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
        return 0
        ",
    )
});

/// Reads the token, the failure mark and the refusal mark of an appid in one round trip.
/// KEYS: token, failure, refusal. Returns {token, token PTTL, failure, now ms, refusal,
/// refusal PTTL}.
pub(super) static READ_TOKEN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local t = redis.call('TIME')
        return {redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1]), redis.call('GET', KEYS[2]),
                t[1] * 1000 + math.floor(t[2] / 1000), redis.call('GET', KEYS[3]), redis.call('PTTL', KEYS[3])}
        ",
    )
});

/// Stores a token as `fetched_at_ms:token` by Redis' clock (one clock for the whole pool), and
/// clears the failure and refusal marks. KEYS: token, failure, refusal. ARGV: token, lifetime
/// ms. Returns the fetch time.
pub(super) static STORE_TOKEN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local t = redis.call('TIME')
        local now = t[1] * 1000 + math.floor(t[2] / 1000)
        redis.call('SET', KEYS[1], now .. ':' .. ARGV[1], 'PX', ARGV[2])
        redis.call('DEL', KEYS[2], KEYS[3])
        return now
        ",
    )
});

/// Deletes the token only if its value part is the failed token (the stored value is
/// `fetched_at_ms:token`). KEYS: token. ARGV: the failed token. Returns 1 when deleted.
pub(super) static INVALIDATE_TOKEN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local v = redis.call('GET', KEYS[1])
        if v and string.sub(v, string.find(v, ':', 1, true) + 1) == ARGV[1] then
            return redis.call('DEL', KEYS[1])
        end
        return 0
        ",
    )
});

/// The pool-wide gate of forced refreshes: at most one per interval (KEYS[1] lives that long)
/// and at most ARGV[2] a day (KEYS[2] counts them). ARGV: interval ms, budget, day left ms.
/// Returns {granted, retry_after_ms, used}.
pub(super) static FORCE_GATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local used = tonumber(redis.call('GET', KEYS[2]) or '0')
        local wait = redis.call('PTTL', KEYS[1])
        if wait > 0 then return {0, wait, used} end
        if used >= tonumber(ARGV[2]) then return {0, tonumber(ARGV[3]), used} end
        redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
        used = redis.call('INCR', KEYS[2])
        redis.call('PEXPIRE', KEYS[2], ARGV[3])
        return {1, 0, used}
        ",
    )
});

/// Records a failed fetch as `streak:until_ms:message` by Redis' clock; kept 10 minutes past
/// its back-off, so that the streak keeps doubling. KEYS: failure. ARGV: streak, back-off ms,
/// message.
pub(super) static STORE_TOKEN_FAILURE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local t = redis.call('TIME')
        local now = t[1] * 1000 + math.floor(t[2] / 1000)
        local backoff = tonumber(ARGV[2])
        redis.call('SET', KEYS[1], ARGV[1] .. ':' .. (now + backoff) .. ':' .. ARGV[3], 'PX', backoff + 600000)
        return 1
        ",
    )
});

/// Sets the pause unless a longer one is already set: a 45011 must not shorten a 45009
/// parking. KEYS: pause. ARGV: ms, value. Returns 1 when set.
pub(super) static PAUSE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local ttl = redis.call('PTTL', KEYS[1])
        if ttl < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[1]) return 1 end
        return 0
        ",
    )
});

/// GCRA (one stored number per account: the theoretical arrival time, in µs of Redis' clock)
/// and the daily count, in one round trip. KEYS: rate, quota. ARGV: emission interval µs (0 =
/// no rate), burst tolerance µs, quota (0 = none), quota TTL s. Returns {0, 0} granted, {1, µs}
/// wait, {2, used} quota spent.
pub(super) static ADMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local t = redis.call('TIME')
        local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
        local quota = tonumber(ARGV[3])
        if quota > 0 then
            local used = tonumber(redis.call('GET', KEYS[2]) or '0')
            if used >= quota then return {2, used} end
        end
        local interval = tonumber(ARGV[1])
        if interval > 0 then
            local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
            if tat < now then tat = now end
            local new_tat = tat + interval
            local allow_at = new_tat - tonumber(ARGV[2])
            if now < allow_at then return {1, allow_at - now} end
            -- %.0f keeps all digits; tostring would round a 16-digit number.
            redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
        end
        if quota > 0 then
            redis.call('INCR', KEYS[2])
            redis.call('EXPIRE', KEYS[2], ARGV[4])
        end
        return {0, 0}
        ",
    )
});
