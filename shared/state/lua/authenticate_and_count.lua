-- A token's record, and (ARGV[3] == '1') the request counted in its rate window only if the token's
-- digest matches and it is not revoked: a stranger who knows a key id cannot spend its device's budget.
-- KEYS: token record, rate window (the record key again when not counting).
-- ARGV: the secret's sha256 digest, rate window TTL, '1' to count.
-- Returns {the record as HGETALL's flat list, the window's count or 0}.
local h = redis.call('HGETALL', KEYS[1])
local count = 0
if #h > 0 and ARGV[3] == '1' then
  local digest, revoked = nil, false
  for i = 1, #h, 2 do
    if h[i] == 'digest' then digest = h[i + 1] elseif h[i] == 'revoked_at' then revoked = true end
  end
  if digest == ARGV[1] and not revoked then
    count = redis.call('INCR', KEYS[2])
    if count == 1 then redis.call('EXPIRE', KEYS[2], ARGV[2]) end
  end
end
return {h, count}
