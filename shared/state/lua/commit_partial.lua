-- Commit a partial sum and take its members out of `unfolded` (Partials.commit_partial).
-- KEYS: round info, partials, unfolded.
-- ARGV: slot, entry, members...
-- Returns 1 committed, 2 this very entry was committed before (a retry whose first reply was lost),
-- 0 refused (the round is no longer open), -1 a member is not unfolded (it would count twice).
if redis.call('HGET', KEYS[2], ARGV[1]) == ARGV[2] then return 2 end
if redis.call('HGET', KEYS[1], 'status') ~= 'open' then return 0 end
for i = 3, #ARGV do
  if redis.call('SISMEMBER', KEYS[3], ARGV[i]) == 0 then return -1 end
end
for i = 3, #ARGV do redis.call('SREM', KEYS[3], ARGV[i]) end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
