-- Accept one update exactly once (Accounting.accept); concurrent accepts into a round serialise here.
-- KEYS: message, round info, updates, reported, received, inflight, fed stats, global stats, unfolded,
--       claims, uncapped, async bases, async joined.
-- ARGV: device, record, message TTL, sample count, reference sample size, base version (async
--       rounds; '' otherwise: a device's base versions must then rise, one update per base), the
--       buffer's base version (async; noted for the device's next participation weight).
-- Returns {outcome, reported, cohort size, reference claim or ""}. The accept that completes the
-- first REFERENCE_SAMPLE claims of a round without a reference claim fixes it (their median);
-- devices accepted before that are noted as uncapped.
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HINCRBY', KEYS[8], 'redelivered', 1)
  return {'redelivered', 0, 0, ''}
end
local status = redis.call('HGET', KEYS[2], 'status')
local cohort = tonumber(redis.call('HGET', KEYS[2], 'cohort_size') or '0')
local count = redis.call('SCARD', KEYS[4])
if status ~= 'open' then return {'stale_round', count, cohort, ''} end
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then return {'already_submitted', count, cohort, ''} end
if ARGV[6] ~= '' then
  local last = redis.call('HGET', KEYS[12], ARGV[1])
  if last and tonumber(last) >= tonumber(ARGV[6]) then return {'duplicate_base_version', count, cohort, ''} end
  redis.call('HSET', KEYS[12], ARGV[1], ARGV[6])
  redis.call('HSET', KEYS[13], ARGV[1], ARGV[7])
end
if redis.call('EXISTS', KEYS[5]) == 1 then redis.call('DECR', KEYS[6]) end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
count = count + redis.call('SADD', KEYS[4], ARGV[1])
redis.call('SET', KEYS[1], 'accepted', 'EX', ARGV[3])
redis.call('HINCRBY', KEYS[7], 'received', 1)
redis.call('HINCRBY', KEYS[7], 'accepted', 1)
redis.call('SADD', KEYS[9], ARGV[1])
redis.call('ZADD', KEYS[10], ARGV[4], ARGV[1])
local ref = redis.call('HGET', KEYS[2], 'reference_claim')
if not ref then
  local n = redis.call('ZCARD', KEYS[10])
  if n >= tonumber(ARGV[5]) then
    local lo = redis.call('ZRANGE', KEYS[10], math.floor((n - 1) / 2), math.floor((n - 1) / 2), 'WITHSCORES')
    local hi = redis.call('ZRANGE', KEYS[10], math.floor(n / 2), math.floor(n / 2), 'WITHSCORES')
    ref = tostring((tonumber(lo[2]) + tonumber(hi[2])) / 2)
    redis.call('HSET', KEYS[2], 'reference_claim', ref)
  else
    redis.call('SADD', KEYS[11], ARGV[1])
    ref = ''
  end
end
return {'accepted', count, cohort, ref}
