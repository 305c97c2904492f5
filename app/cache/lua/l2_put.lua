-- Write one L2 entry and log it for the workers' sync, in one round trip.
-- The log's score is this Redis server's clock (ms), so writers on machines whose clocks disagree still log in
-- order, and a worker's sync can ask for "everything from the newest score I saw" without a skew margin.
-- KEYS[1] entry hash, KEYS[2] partition log (same hash tag: one slot)
-- ARGV[1] entry id, ARGV[2] ttl seconds, then field/value pairs for the entry hash (s, q, a, and t if known)
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local ttl = tonumber(ARGV[2])
local fields = {}
for i = 3, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
fields[#fields + 1] = 'x'
fields[#fields + 1] = string.format('%.3f', now_ms / 1000 + ttl)
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('ZADD', KEYS[2], now_ms, ARGV[1])
-- Members older than twice this TTL point at expired entries (each writer trims by its own TTL).
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now_ms - ttl * 2000)
if redis.call('TTL', KEYS[2]) < ttl then
  redis.call('EXPIRE', KEYS[2], ttl * 2)
end
return now_ms
