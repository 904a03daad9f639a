-- Record the ledger entry, count it in flight for its round and push the broker message, atomically
-- (Ledger.record_and_push); or return the entry recorded before; or refuse a new one received after
-- the round's deadline.
-- KEYS: received entry, pending set, broker queue, round info, round inflight.
-- ARGV: entry, entry TTL, re-drive time, digest, broker message, now.
-- Returns the existing entry, 'late', or false when the entry is new and was pushed.
local seen = redis.call('GET', KEYS[1])
if seen then
  redis.call('SET', KEYS[1], seen, 'KEEPTTL')  -- a write of this connection's, so WAIT covers the entry
  return seen
end
local deadline = redis.call('HGET', KEYS[4], 'deadline')
-- an async buffer's deadline is its age limit: an update trained for it may still join a later one
local async = redis.call('HGET', KEYS[4], 'mode') == 'async'
if deadline and not async and tonumber(ARGV[6]) > tonumber(deadline) then return 'late' end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('ZADD', KEYS[2], 'NX', ARGV[3], ARGV[4])
redis.call('INCR', KEYS[5])
redis.call('EXPIRE', KEYS[5], ARGV[2])
redis.call('LPUSH', KEYS[3], ARGV[5])
return false
